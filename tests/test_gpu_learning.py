"""bench/gpu_learning.py's pieces that run here: the degenerate-loop count, the completions kept from the product's
own FIM scoring (tiny StarCoder2, real tokenizer), the newest-commits selection of a store's shards, and that
pretrain_tiny's GPU options leave the CPU benchmark's cache key as it was."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import gpu_learning  # noqa: E402
import pretrain_tiny  # noqa: E402


def test_degenerate_counts_loops_not_code():
    assert gpu_learning.degenerate("    let mut mut mut mut mut mut mut mut")
    assert gpu_learning.degenerate("    ///\n" * 25)
    assert not gpu_learning.degenerate("    let meta = crate::telemetry::snapshot();\n    if meta.is_empty() {\n")
    assert not gpu_learning.degenerate("None")  # too short to be a repeat
    assert not gpu_learning.degenerate("")


def test_completions_are_what_the_products_fim_scoring_decoded(tmp_path):
    import torch
    from transformers import AutoTokenizer

    from gitlora.trainer import evaluate, metrics, plan as planlib, round as rnd, tiny

    model_dir = tiny.build_tiny_model(tmp_path / "tiny")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = rnd.load_base(str(model_dir), planlib.make_plan(model_dir), torch)
    body = "".join(f"    let v{i} = self.get(v{i - 1}).unwrap();\n" for i in range(1, 9))
    records = [dict(repo="demo", commit=f"{n:040x}", commit_time=n, message="m", path=f"src/m{n}.rs", kind="fn",
                    qualified_name=f"m::f{n}", change_kind="added", before="", imports=[],
                    after=f"pub fn f{n}(&self, v0: u64) -> u64 {{\n{body}    v8\n}}\n") for n in range(3)]
    es = evaluate.prepare(records, tokenizer, 512, fim_samples=3)
    assert len(es.fim) == 3
    recorder = gpu_learning.RecordingTokenizer(tokenizer)
    scores = evaluate.score_fim(model, recorder, es, torch, torch.device("cpu"), max_new_tokens=8)
    assert len(recorder.decoded) == len(es.fim)
    assert [metrics.fim_score(item.commit, text, item.reference) for item, text in zip(es.fim, recorder.decoded)] \
        == scores


def test_newest_train_records_follow_the_products_commit_order(tmp_path):
    state = tmp_path / "state"
    (state / "shards").mkdir(parents=True)

    def rec(commit: str, n: int, **kw) -> dict:
        return {"repo": "r", "commit": commit, "path": f"src/{commit}{n}.rs", "kind": "fn",
                "qualified_name": f"{commit}::{n}", "change_kind": "modified", "before": "fn a() {}",
                "after": f"fn a() {{ {n} }}", **kw}

    # shard 1 holds c1 (oldest) and c3 (newest by time); shard 2 holds c2 and the duplicate d
    (state / "shards" / "000001.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (
        rec("c1", 0), rec("c3", 0), rec("c3", 1), rec("c3", 2, change_kind="deleted", after=""))))
    (state / "shards" / "000002.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (rec("c2", 0), rec("d", 0))))
    fact = lambda c, t, dup=False: {"commit": c, "examples": 1, "time": t, "duplicate": dup}  # noqa: E731
    manifest = {"shards": [{"id": 1, "file": "000001.jsonl", "commits": [fact("c1", 10), fact("c3", 30)]},
                           {"id": 2, "file": "000002.jsonl", "commits": [fact("c2", 20), fact("d", 40, True)]}]}
    (state / "manifest.json").write_text(json.dumps(manifest))

    records, commits = gpu_learning.newest_train_records(state, 10**9, exclude=set())
    assert commits == ["c3", "c2", "c1"]  # newest first; the duplicate never
    assert [r["qualified_name"] for r in records] == ["c3::0", "c3::1", "c2::0", "c1::0"]  # deleted left out

    one = len(json.dumps(records[0])) + 1
    records, commits = gpu_learning.newest_train_records(state, 3 * one, exclude={"c2"})
    assert commits == ["c3", "c1"] and len(records) == 3  # whole commits within the cap; excluded ones skipped
    records, commits = gpu_learning.newest_train_records(state, 1, exclude=set())
    assert commits == ["c3"]  # the newest commit always, even over the cap


def test_gpu_options_leave_the_cpu_cache_key_unchanged(tmp_path):
    corpus_dir = tmp_path / "corpus"
    corpus_dir.mkdir()
    (corpus_dir / "lib.rs").write_text("pub fn answer() -> u32 {\n    42\n}\n")
    corpus = pretrain_tiny.load_corpus([corpus_dir])
    # the settings as the CPU benchmark has always hashed them (bench/README's runs are cached under this key)
    old = dict(cpu_budget_s=600.0, seq_len=512, batch=8, lr=1.5e-3, vocab_size=8192, fim_rate=0.5, seed=0,
               size=pretrain_tiny.SIZE, version=1)
    cached = tmp_path / "cache" / f"base-{pretrain_tiny.settings_key(corpus, old)}"
    cached.mkdir(parents=True)
    (cached / "bench-base.json").write_text(json.dumps({"params": 1, "tokens_seen": 1, "final_loss": 1.0}))
    path, meta = pretrain_tiny.pretrain([corpus_dir], cache_dir=tmp_path / "cache", cpu_budget_s=600.0,
                                        log=lambda m: None)
    assert path == cached and meta["cached"]
