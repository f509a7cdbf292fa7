"""bench/ablate_examples.py's pure parts: variants and their parsing, the commits every variant's step cap
reaches, and the context budget by part, measured on the trainer's real renderings with the tiny tokenizer."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from gitlora.trainer import data, tiny
from gitlora.trainer.spec import DEFAULTS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import ablate_examples as ab  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return tiny.build_tokenizer()


def markers(tok) -> ab.Markers:
    ids = tok.convert_tokens_to_ids
    return ab.Markers(ids(data.FIM_PREFIX), ids(data.FIM_SUFFIX), ids(data.FIM_MIDDLE), ids("<file_sep>"))


def n_tokens(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=False)["input_ids"])


# -- variants --------------------------------------------------------------------------------------------------
def test_standard_variants_are_issue_12s_cumulative_list():
    today, fim, xf, dedup, context = ab.standard_variants(DEFAULTS)
    assert [v.name for v in (today, fim, xf, dedup, context)] == ["today", "fim", "cross_file", "dedup", "context"]
    # the file around a gap as a weak target only in the last, which is the product's defaults
    assert [v.settings["context_token_weight"] for v in (today, fim, xf, dedup)] == [0.0] * 4
    assert context.settings == {**dedup.settings, "context_token_weight": DEFAULTS["context_token_weight"]}
    assert DEFAULTS["context_token_weight"] > 0 and context.store == "screened"
    # today: the old FIM share under the synthetic header (no file context), unweighted edits, no screening
    assert today.strip == ("new_context", "cross_file") and today.store == "plain"
    assert today.settings["edit_share"] == pytest.approx(1 - ab.OLD_FIM_SHARE)
    assert today.settings["copied_token_weight"] == 1.0
    assert fim.settings["edit_share"] == DEFAULTS["edit_share"] and fim.strip == ("cross_file",)
    assert fim.settings["copied_token_weight"] == DEFAULTS["copied_token_weight"]
    assert xf.needs == "cross_file" and xf.cross_file and not fim.cross_file and not today.cross_file
    assert dedup.store == "screened" and dedup.cross_file and fim.store == xf.store == "plain"


def test_a_variant_from_the_command_line_changes_its_base_settings():
    known = ab.standard_variants(DEFAULTS)
    half = ab.parse_variant("half=edit_share=0.5", known)
    assert half.base == "context" and half.store == "screened"
    assert half.settings == {**known[-1].settings, "edit_share": 0.5}
    old = ab.parse_variant("old2=base=today,edit_share=0.5,copied_token_weight=0.3,cross_file_context=false", known)
    assert old.base == "today" and old.strip == known[0].strip and not old.cross_file
    assert old.settings["copied_token_weight"] == 0.3 and old.settings["edit_share"] == 0.5
    assert ab.parse_variant("same=base=fim", known).settings == known[1].settings
    # JSON values may hold commas
    assert ab.parse_variant("l=seeds=[1,2],edit_share=0.4", known).settings["seeds"] == [1, 2]
    for bad, why in [("noequals", "NAME=key"), ("x=edit_share=half", "not JSON"), ("fim=edit_share=0.5", "exists"),
                     ("x=base=nope", "no variant named 'nope'"), ("x=edit_share", "not key=value"),
                     ("a b=edit_share=1", "NAME=key")]:
        with pytest.raises(ValueError, match=why):
            ab.parse_variant(bad, known)


def test_settings_the_trainer_lacks_are_left_out_and_named():
    kept, dropped = ab.known_settings({"edit_share": 0.5, "cross_file_context": True}, ["edit_share", "seed"])
    assert kept == {"edit_share": 0.5} and dropped == ["cross_file_context"]


def test_stripping_removes_fields_without_touching_the_record():
    rec = {"after": "x", "new_context": {"above": "a"}, "cross_file": [{"path": "p", "text": "t"}]}
    assert ab.stripped(rec, ("new_context", "cross_file")) == {"after": "x"}
    assert rec["new_context"] == {"above": "a"} and ab.stripped({"after": "x"}, ("cross_file",)) == {"after": "x"}


# -- equal budget ------------------------------------------------------------------------------------------
def test_the_common_commits_fit_every_variants_cap():
    order = ["c5", "c4", "c3", "c2", "c1"]
    tokens = {"a": {"c5": 10, "c4": 10, "c3": 10, "c2": 10, "c1": 10},
              "b": {"c5": 20, "c4": 20, "c3": 20, "c2": 20, "c1": 20}}
    asked = []

    def count(variant, commit):
        asked.append((variant, commit))
        return tokens[variant][commit]

    assert ab.common_commits(order, ["a", "b"], count, cap=45) == 2  # a reaches 4 commits, b 2
    assert ("b", "c3") in asked and ("b", "c2") not in asked  # counted only as far as needed
    assert ab.common_commits(order, ["b", "a"], lambda v, c: tokens[v][c], cap=45) == 2  # order-free
    assert ab.common_commits(order, ["a"], lambda v, c: tokens[v][c], cap=1000) == 5
    assert ab.common_commits(order, ["b"], lambda v, c: tokens[v][c], cap=5) == 1  # the newest always
    assert ab.common_commits([], ["a"], lambda v, c: 0, cap=5) == 0


def test_shards_give_commits_newest_first_without_wholly_duplicate_ones(tmp_path):
    def rec(commit, t, name):
        return {"commit": commit, "commit_time": t, "qualified_name": name, "after": "fn f() {}"}

    (tmp_path / "000001.jsonl").write_text("".join(json.dumps(r) + "\n" for r in
                                                   [rec("a", 1, "x"), rec("b", 3, "y"), rec("b", 3, "z")]))
    (tmp_path / "000002.jsonl").write_text("".join(json.dumps(r) + "\n" for r in
                                                   [rec("b", 3, "w"), rec("c", 3, "v"), rec("d", 2, "u")]))
    entries = [{"file": "000001.jsonl", "commits": [{"commit": "a", "time": 1}, {"commit": "b", "time": 3}]},
               {"file": "000002.jsonl", "commits": [{"commit": "b", "time": 3}, {"commit": "c", "time": 3},
                                                    {"commit": "d", "time": 2, "duplicate": True}]}]
    shards = ab.Shards(tmp_path, entries)
    assert shards.newest_first() == ["b", "c", "a"]
    assert [r["qualified_name"] for r in shards.records("b")] == ["y", "z", "w"]  # across two shards
    assert shards.records("nope") == []



def test_a_kept_manifest_splits_into_the_trained_part_and_the_test_commits(tmp_path):
    entries = [{"file": "000001.jsonl", "commits": [{"commit": "a"}, {"commit": "b"}]},
               {"file": "000002.jsonl", "commits": [{"commit": "c"}]},
               {"file": "000003.jsonl", "commits": [{"commit": "t1"}, {"commit": "t2"}]}]
    (tmp_path / "manifest.json").write_text(json.dumps({"shards": entries, "groups": []}))
    trained, test = ab.kept_entries(tmp_path / "manifest.json", {"t1", "t2"})
    assert [e["file"] for e in trained] == ["000001.jsonl", "000002.jsonl"]
    assert [e["file"] for e in test] == ["000003.jsonl"]

# -- the context budget ----------------------------------------------------------------------------------------
FILE = ("use std::fmt;\n\npub struct Peer { addr: String }\n\nimpl Peer {\n    pub fn connect(addr: &str) -> Peer {\n"
        "        let a = addr.trim();\n        Peer { addr: a.to_string() }\n    }\n\n    pub fn close(&self) {}\n}\n")


def in_file_record(**kw) -> dict:
    item = FILE[FILE.index("pub fn connect"):FILE.index("\n    }\n") + len("\n    }")]
    start = FILE.index(item)
    rec = dict(repo="the-block", commit="ab" * 20, commit_time=1, message="Trim addresses", path="node/src/peer.rs",
               kind="method", qualified_name="Peer::connect", change_kind="modified",
               before=item.replace("addr.trim()", "addr"), after=item, imports=["use std::fmt;"],
               new_context={"above": FILE[:start], "below": FILE[start + len(item):]})
    rec.update(kw)
    return rec


def test_fim_parts_are_counted_from_the_real_rendering(tok):
    rec = in_file_record()
    r = data.rendering(rec, data.RenderOptions(edit_share=0.0), 0)
    assert r.kind == data.FIM
    t, cut = data.tokenize_rendering(tok, r, 4096)
    assert not cut
    prompt_len = sum(1 for x in t.labels if x == data.IGNORE)
    parts = ab.part_tokens(t.input_ids, prompt_len, markers(tok), n_tokens(tok, rec["path"] + "\n"))
    assert parts["prefix"] == n_tokens(tok, r.fim.prefix) and parts["suffix"] == n_tokens(tok, r.fim.suffix)
    assert parts["middle"] == n_tokens(tok, r.fim.middle + data.EOS)
    assert parts["header"] == n_tokens(tok, r.fim.head) + 2  # the header and the <fim_suffix>/<fim_middle> markers
    assert parts["cross_file"] == parts["edit_prompt"] == parts["target"] == 0
    assert sum(parts.values()) == len(t.input_ids)


def test_cross_file_blocks_before_the_file_are_counted_apart(tok):
    block = "<file_sep>node/src/ledger.rs\npub struct Ledger { total: u64 }\n"
    plain = data.fim_parts(in_file_record(), 0)
    parts_xf = data.FimParts("<repo_name>the-block" + block + plain.head[len("<repo_name>the-block"):],
                             plain.prefix, plain.middle, plain.suffix)
    t, _ = data.tokenize_fim(tok, parts_xf, 4096)
    prompt_len = sum(1 for x in t.labels if x == data.IGNORE)
    parts = ab.part_tokens(t.input_ids, prompt_len, markers(tok), n_tokens(tok, "node/src/peer.rs\n"))
    assert parts["cross_file"] == n_tokens(tok, block)
    assert parts["prefix"] == n_tokens(tok, plain.prefix) and sum(parts.values()) == len(t.input_ids)


def test_edit_parts_are_header_prompt_and_target(tok):
    rec = in_file_record()
    r = data.rendering(rec, data.RenderOptions(edit_share=1.0), 0)
    assert r.kind == data.EDIT
    t, _ = data.tokenize_rendering(tok, r, 4096)
    prompt_len = sum(1 for x in t.labels if x == data.IGNORE)
    parts = ab.part_tokens(t.input_ids, prompt_len, markers(tok), n_tokens(tok, rec["path"] + "\n"))
    assert parts["header"] == n_tokens(tok, data.header(rec)) and parts["target"] == n_tokens(tok, r.target)
    assert parts["edit_prompt"] == prompt_len - parts["header"] > 0
    assert parts["prefix"] == parts["middle"] == parts["cross_file"] == 0


def test_budget_shares_average_over_examples_as_a_share_of_the_context():
    rows = [{"prefix": 100, "middle": 20, "header": 12}, {"header": 12, "edit_prompt": 200, "target": 168}]
    shares = ab.budget_shares(rows, 512)
    assert shares["mean_tokens"]["prefix"] == 50 and shares["mean_tokens"]["header"] == 12
    assert shares["context_share"]["target"] == pytest.approx(84 / 512, abs=1e-4)
    assert shares["filled"] == pytest.approx(256 / 512) and shares["examples"] == 2
    assert ab.budget_shares([], 512)["filled"] == 0


def test_context_budget_of_a_variant_counts_what_the_trainer_trains(tok):
    recs = [in_file_record(commit=f"{i:040x}", qualified_name=f"Peer::connect{i}") for i in range(40)]
    cfg = {**DEFAULTS, "edit_share": 0.5, "seed": 0}
    out = ab.context_budget(recs, tok, 256, cfg, limit=30, seed=0)
    assert out["examples"] == 30 and 0 < out["fim_examples"] < 1
    assert out["mean_tokens"]["prefix"] > 0 and out["mean_tokens"]["edit_prompt"] > 0
    assert 0 < out["filled"] <= 1
    old = ab.context_budget([ab.stripped(r, ("new_context",)) for r in recs], tok, 256, cfg, limit=0, seed=0)
    assert old["examples"] == 40 and old["mean_tokens"]["suffix"] < out["mean_tokens"]["suffix"]
