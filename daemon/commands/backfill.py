"""`gitlora backfill [REPO]`: ingest all history the store lacks, resumable after Ctrl-C or kill -9."""
from __future__ import annotations

import argparse
import sys

from tqdm import tqdm

from .. import config as config_mod
from .. import log, memory
from ..ingest import IngestSummary, Ingestor
from ..repos import open_repo
from ..store import Store


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("backfill", help="ingest all history not yet stored (resumable)")
    p.add_argument("repo", nargs="?", default=".")
    p.add_argument("--workers", type=int, default=None, help="parser processes (default: config, else cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def backfill(repo_path: str, *, workers: int | None = None, progress: bool = True) -> IngestSummary:
    config = config_mod.load()
    opened = open_repo(repo_path, config)
    log.configure(opened.paths.log, console=False)
    logger = log.get("gitlora.backfill")
    with Store(opened.paths.store) as store:
        ingestor = Ingestor(opened.git, store, config.ingest, workers=workers)
        oids = ingestor.pending()
        logger.info("backfill_start", repo=str(opened.git.common_dir), pending=len(oids))
        bar = tqdm(total=len(oids), unit="commit", disable=not progress or not oids, dynamic_ncols=True,
                   desc=f"backfill {opened.git.name}", file=sys.stderr)
        examples = 0

        def on_batch(commits: int, new_examples: int) -> None:
            nonlocal examples
            examples += new_examples
            bar.update(commits)
            bar.set_postfix(examples=examples, refresh=False)

        try:
            summary = ingestor.run(oids, on_batch=on_batch)
        finally:
            bar.close()
        logger.info("backfill_done", commits=summary.commits, examples=summary.examples,
                    skipped=summary.skipped, seconds=round(summary.seconds, 2))
        return summary


def run(args: argparse.Namespace) -> int:
    memory.collect_cycles_rarely()  # this process is the writer of a batch: its heap (symbol index, plans) only grows
    try:
        summary = backfill(args.repo, workers=args.workers, progress=not args.no_progress)
    except KeyboardInterrupt:
        print("\ninterrupted: everything committed so far is stored; rerun `gitlora backfill` to continue",
              file=sys.stderr)
        return 130
    rate = summary.commits / summary.seconds if summary.seconds else 0.0
    print(f"stored {summary.commits - summary.already_present} commits ({summary.skipped} skipped), "
          f"{summary.examples} examples in {summary.seconds:.1f}s ({rate:.1f} commits/s)")
    return 0
