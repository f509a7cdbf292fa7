"""Parser pool workers never outlive the process that owns the pool."""
from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

from gitutil import synthetic_history


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat fields after the command name (state first), or None once the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def pool_workers(parent: int) -> dict[int, str]:
    """The parent's spawned multiprocessing children: pid -> start time (which tells a reused pid apart)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat(int(entry))
        if fields is None or int(fields[1]) != parent:
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmdline:
            found[int(entry)] = fields[19]
    return found


def alive(pid: int, started: str) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[19] == started and fields[0] not in ("Z", "X")


def test_pool_workers_exit_when_a_backfill_is_sigkilled(tmp_path, isolated_home):
    repo = synthetic_history(tmp_path / "syn", commits=300, files=10, functions=80)
    config = isolated_home / ".config/gitlora/config.toml"
    config.parent.mkdir(parents=True)
    config.write_text("[ingest]\nbatch_commits = 2\nworkers = 2\n")  # many chunks: the pool, two workers
    proc = subprocess.Popen([sys.executable, "-m", "gitlora.daemon", "backfill", "--no-progress", str(repo)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        workers: dict[int, str] = {}
        while len(workers) < 2 and proc.poll() is None and time.monotonic() < deadline:
            workers = pool_workers(proc.pid)
            time.sleep(0.02)
        assert len(workers) == 2, f"no pool of two workers appeared (backfill exit {proc.poll()})"
        proc.send_signal(signal.SIGKILL)  # the backfill alone, not its process group
        proc.wait()
        deadline = time.monotonic() + 30
        while any(alive(pid, started) for pid, started in workers.items()) and time.monotonic() < deadline:
            time.sleep(0.05)
        survivors = [pid for pid, started in workers.items() if alive(pid, started)]
        assert survivors == [], f"pool workers outlived their parent: {survivors}"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the session (the old code's workers)
        except ProcessLookupError:
            pass


def test_a_commit_that_kills_its_parser_process_is_its_own_skip_and_the_rest_goes_on(tmp_path, isolated_home):
    """A file whose parse needs more memory than the process may have (tree-sitter then crashes the process):
    the pool breaks, the commit is retried alone, dies again and is stored as skipped; all others are stored."""
    from gitutil import commit_files, init_repo
    from test_ingest_memory import generated_bindings
    from daemonutil import store_commits

    repo = init_repo(tmp_path / "poison")
    oids = [commit_files(repo, {"src/lib.rs": "pub fn base() {}\n"}, "base"),
            commit_files(repo, {"src/a.rs": "pub fn a() {}\n"}, "before"),
            commit_files(repo, {"src/huge.rs": generated_bindings(0, 0, target_bytes=40_000_000),
                                "src/b.rs": "pub fn b() {}\n"}, "poison"),
            commit_files(repo, {"src/c.rs": "pub fn c() {}\n"}, "after"),
            commit_files(repo, {"src/d.rs": "pub fn d() {}\n"}, "after that")]
    config = isolated_home / ".config/gitlora/config.toml"
    config.parent.mkdir(parents=True)
    config.write_text("[ingest]\nbatch_commits = 1\nworkers = 2\nmax_file_bytes = 64000000\n")

    def limit_memory() -> None:  # the huge file's syntax tree needs well over this; everything else fits
        resource.setrlimit(resource.RLIMIT_AS, (700 << 20, 700 << 20))

    done = subprocess.run([sys.executable, "-m", "gitlora.daemon", "backfill", "--no-progress", str(repo)],
                          capture_output=True, text=True, preexec_fn=limit_memory, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    commits = store_commits(repo)
    assert set(commits) == set(oids)
    assert commits[oids[2]]["status"] == "skipped" and commits[oids[2]]["reason"].startswith("parser-died")
    assert [commits[o]["status"] for o in oids[:2] + oids[3:]] == ["ingested"] * 4


def test_a_commit_that_crashes_an_in_process_parse_is_parsed_apart_on_the_next_run(tmp_path, isolated_home):
    """In-process parsing (one worker; the daemon's small commits) that crashes the whole process: the next run
    knows which commits were being parsed, parses them in a spawned process, and a second death there costs
    that commit only. Without this every restart would crash on the same commit."""
    from gitutil import commit_files, init_repo
    from test_ingest_memory import generated_bindings
    from daemonutil import store_commits

    repo = init_repo(tmp_path / "poison")
    oids = [commit_files(repo, {"src/lib.rs": "pub fn base() {}\n"}, "base"),
            commit_files(repo, {"src/huge.rs": generated_bindings(0, 0, target_bytes=40_000_000),
                                "src/b.rs": "pub fn b() {}\n"}, "poison"),
            commit_files(repo, {"src/c.rs": "pub fn c() {}\n"}, "after")]
    config = isolated_home / ".config/gitlora/config.toml"
    config.parent.mkdir(parents=True)
    config.write_text("[ingest]\nbatch_commits = 1\nworkers = 1\nmax_file_bytes = 64000000\n")

    def limit_memory() -> None:  # the huge file's syntax tree needs well over this; everything else fits
        resource.setrlimit(resource.RLIMIT_AS, (700 << 20, 700 << 20))

    def backfill() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "gitlora.daemon", "backfill", "--no-progress", str(repo)],
                              capture_output=True, text=True, preexec_fn=limit_memory, timeout=300)

    crashed = backfill()
    assert crashed.returncode < 0, (crashed.returncode, crashed.stderr[-2000:])  # killed by its own parser
    assert set(store_commits(repo)) == {oids[0]}
    done = backfill()
    assert done.returncode == 0, done.stderr[-2000:]
    commits = store_commits(repo)
    assert set(commits) == set(oids)
    assert commits[oids[1]]["status"] == "skipped" and commits[oids[1]]["reason"].startswith("parser-died")
    assert commits[oids[0]]["status"] == commits[oids[2]]["status"] == "ingested"


def test_pool_workers_take_runs_of_consecutive_chunks_so_a_blob_is_parsed_about_once(tmp_path):
    """A commit's old blobs are mostly the previous chunk's new ones: the worker that parsed them takes the next
    chunk too, so a blob is parsed again by another worker only where a run of chunks starts (with chunks handed
    to whichever worker is free, about every chunk boundary parses its files twice). Each commit carries the
    definitions of the blobs its worker parsed for it, so a blob parsed twice shows up in two commits."""
    from collections import Counter
    from math import ceil

    from gitlora.daemon import ingest
    from gitlora.daemon.config import IngestConfig
    from gitlora.daemon.gitrepo import GitRepo
    from gitlora.daemon.ingest import Ingestor
    from gitlora.daemon.store import Store

    files = 4
    repo = synthetic_history(tmp_path / "syn", commits=161, files=files)
    with Store(tmp_path / "store") as store:
        ingestor = Ingestor(GitRepo(repo), store, IngestConfig(batch_commits=2), workers=2)
        oids = ingestor.pending()
        built = list(ingestor.derive(oids))
    assert [pending.oid.hex() for pending in built] == oids  # in order, each once
    parsed = Counter(blob for pending in built for blob in pending.definitions)
    parsed_again = sum(times - 1 for times in parsed.values())
    runs = len(list(ingest._runs(ceil(len(oids) / 2), 2)))
    assert runs < ceil(len(oids) / 2) / 2  # runs, not single chunks
    assert parsed_again <= (runs - 1) * files, f"{parsed_again} blobs parsed twice in {runs} runs"
