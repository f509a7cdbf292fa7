"""Deduplication: MinHash signatures (datasketch's, bit for bit), the store's screening in the commit's transaction,
and, on real git histories through the real ingest path, a merge replaying its branch and a cherry-pick adding no
trainable examples, near-duplicates beyond the cap left out, and a repair giving back exactly what was stored."""
from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import replace
from pathlib import Path

import lmdb
import numpy as np
import pytest

from gitlora.daemon.commands.backfill import backfill
from gitlora.daemon.config import Config
from gitlora.daemon.dedup import (BANDS, NUM_PERM, SCHEME, SHA1_SCHEME, TOKEN_SCHEME, Screen, band_keys,
                                  shingle_hash, shingles, signature, signatures, similarity, tokens)
from gitlora.daemon.gitrepo import GitRepo
from gitlora.daemon.ingest import CommitProcessor
from gitlora.daemon.repair import repair_store
from gitlora.daemon.repos import OpenedRepo, open_repo
from gitlora.daemon.shards import ShardWriter
from gitlora.daemon.store import PendingCommit, Store, StoreError, example_key

from daemonutil import gitlora
from gitutil import commit_files, git, init_repo


def function(name: str, body: str = "x.wrapping_mul(3) + 1") -> str:
    return f"pub fn {name}(x: u64) -> u64 {{\n    let y = {body};\n    y.rotate_left(7) ^ 0x5bd1e995\n}}\n"


def distinct(name: str, seed: int) -> str:
    """A function unlike every other one (its own operations, not only its own names)."""
    ops = ["wrapping_add", "checked_sub", "saturating_mul", "leading_zeros", "count_ones", "swap_bytes",
           "reverse_bits", "trailing_zeros", "rotate_right", "to_be", "pow", "isqrt"]
    calls = "\n".join(f"    let v{n} = x.{ops[(seed * 5 + n * 7) % len(ops)]}({n + seed}) as u64 + v{n - 1};"
                      if n else f"    let v0 = x.{ops[seed % len(ops)]}({seed}) as u64;" for n in range(6))
    return f"pub fn {name}(x: u64) -> u64 {{\n{calls}\n    v5 ^ {seed * 977}\n}}\n"


# -- signatures ---------------------------------------------------------------------------------------------
SIGNED = [function("a"), distinct("b", 3), "fn f() { let s = \"héllo ✓\"; }", "struct S { a: u8, b: u16, c: u32 }",
          function("r", " + ".join(["x.rotate_left(1)"] * 20 + ["\"🦀\".len() as u64"])), "a b c a b c a b c",
          "let bad = \"\udcff\"; x y"]


@pytest.mark.parametrize("scheme", [SHA1_SCHEME, TOKEN_SCHEME])
@pytest.mark.parametrize("text", SIGNED)
def test_signature_is_datasketchs_minhash_bit_for_bit(text, scheme):
    """Each scheme is datasketch's MinHash with that scheme's shingle hash: SHA-1 (its default) or
    `shingle_hash`."""
    datasketch = pytest.importorskip("datasketch")
    hashfunc = {} if scheme == SHA1_SCHEME else {"hashfunc": shingle_hash}
    reference = datasketch.MinHash(num_perm=NUM_PERM, seed=1, scheme="legacy", **hashfunc)
    reference.update_batch(list(shingles(text)))
    assert np.array_equal(np.frombuffer(signature(text, scheme), "<u4").astype(np.uint64), reference.hashvalues)
    other = datasketch.MinHash(num_perm=NUM_PERM, seed=1, scheme="legacy", **hashfunc)
    other.update_batch(list(shingles(function("zzz"))))
    assert similarity(signature(text, scheme), signature(function("zzz"), scheme)) == \
        pytest.approx(reference.jaccard(other))


@pytest.mark.parametrize("scheme", [SHA1_SCHEME, TOKEN_SCHEME])
def test_signatures_of_many_texts_are_each_ones_alone(scheme):
    texts = SIGNED + ["", "a b", function("a")] + [distinct(f"d{n}", n) for n in range(300)]  # > one group
    assert signatures(texts, scheme) == [signature(text, scheme) for text in texts]
    assert signatures(texts, scheme)[len(SIGNED):len(SIGNED) + 2] == [None, None]
    assert signatures([], scheme) == []
    assert signature(function("a"), SHA1_SCHEME) != signature(function("a"), TOKEN_SCHEME)
    with pytest.raises(ValueError, match="unknown sketch scheme"):
        signatures(["a b c"], "md5")


def test_shingles_are_the_token_trigrams_whitespace_blind():
    assert shingles("let x =\n  a.b(é);") == {b"let x =", b"x = a", b"= a .", b"a . b", b". b (", b"b ( \xc3\xa9",
                                               "( é )".encode(), "é ) ;".encode()}
    assert shingles("f ( )") == {b"f ( )"} and shingles("f ()") == {b"f ( )"}
    assert shingles("a b") == set() == shingles("")


def test_tokens_are_the_token_patterns_whatever_the_characters():
    """ASCII texts take a faster path than the regular expression that defines the tokens: the same tokens."""
    rng = random.Random(11)
    alphabet = [chr(c) for c in range(128)] + ["é", "ß", "\u00a0", "\u2028", "✓", "🦀", "\u0301", "٣"]
    texts = SIGNED + [function("a") + "\x1c\x1f\x0b\x0c\x00 r#\"raw\"# 'c' 0x1F_u8 a::b<'a>"]
    texts += ["".join(rng.choice(alphabet if n % 2 else alphabet[:128]) for _ in range(rng.randint(0, 60)))
              for n in range(2000)]
    for text in texts:
        assert tokens(text) == re.findall(r"\w+|[^\w\s]", text), text


@pytest.mark.parametrize("scheme", [SHA1_SCHEME, TOKEN_SCHEME])
def test_similar_targets_share_bands_and_unrelated_ones_do_not(scheme):
    def signature_(text: str) -> bytes | None:
        return signature(text, scheme)

    base = signature_(function("a"))
    assert similarity(base, signature_(function("a"))) == 1.0
    assert band_keys(base) == band_keys(signature_(function("a")))
    assert len(band_keys(base)) == BANDS and len(set(band_keys(base))) == BANDS
    # whitespace does not matter; one changed name among a long body matters little; another body a lot
    assert signature_(function("a").replace("    ", "\t")) == base
    long_body = " + ".join(f"x.rotate_left({n})" for n in range(30))
    assert similarity(signature_(function("a", long_body)), signature_(function("b", long_body))) > 0.85
    assert similarity(base, signature_(distinct("a", 1))) < 0.3
    assert not set(band_keys(base)) & set(band_keys(signature_(distinct("a", 1))))
    assert signature_("a b") is None and signature_("") is None


# -- the store's screening -------------------------------------------------------------------------------
def example(commit: str, name: str, after: str, message: str = "m") -> dict:
    return {"commit": commit, "path": "src/lib.rs", "qualified_name": name, "after": after, "message": message}


def pending(n: int, examples: list[dict], *, cap: int = 0, threshold: float = 0.9, message: str | None = None,
            limit: int = 0, enforce: bool = True, scheme: str = SCHEME) -> PendingCommit:
    oid = f"{n:040x}"
    for e in examples:
        e["commit"] = oid
    screen = Screen(tuple(signature(e["after"], scheme) for e in examples),
                    message.encode() if message else None, cap, threshold, limit, enforce, scheme=scheme)
    return PendingCommit(bytes.fromhex(oid), {"status": "ingested"}, examples, screen)


def test_store_leaves_out_exact_duplicates_across_and_within_commits(tmp_path):
    with Store(tmp_path / "store") as store:
        store.write([pending(1, [example("", "a", function("a")), example("", "b", function("b"))])])
        result = store.write([pending(2, [example("", "a", function("a")), example("", "c", function("c")),
                                          example("", "c", function("c"))])])
        assert result.examples == 1
        record = store.get_commit(bytes.fromhex(f"{2:040x}"))
        assert record["examples"] == 1 and record["skipped_items"] == {"duplicate": 2}
        assert record["duplicate_of"] == [f"{1:040x}"]
        assert [e["qualified_name"] for _, e in store.iter_examples()] == ["a", "b", "c"]
        # same text under another name, or another text under the same name: not a duplicate
        store.write([pending(3, [example("", "z", function("a")), example("", "a", function("a", "x"))])])
        assert store.get_commit(bytes.fromhex(f"{3:040x}"))["examples"] == 2


def test_store_caps_near_duplicate_clusters_and_counts_the_rest(tmp_path):
    long_body = " + ".join(f"x.rotate_left({n})" for n in range(30))
    with Store(tmp_path / "store") as store:
        family = [example("", f"f{n}", function(f"f{n}", long_body)) for n in range(5)]
        store.write([pending(1, family[:2], cap=3)])
        store.write([pending(2, family[2:] + [example("", "other", distinct("other", 2))], cap=3)])
        record = store.get_commit(bytes.fromhex(f"{2:040x}"))
        assert record["skipped_items"] == {"near-duplicate": 2} and record["examples"] == 2
        assert [e["qualified_name"] for _, e in store.iter_examples()] == ["f0", "f1", "f2", "other"]
        # a stricter threshold than the family's similarity keeps them all
        store.write([pending(3, [example("", f"g{n}", function(f"g{n}", long_body)) for n in range(3)],
                             cap=3, threshold=1.0)])
        assert store.get_commit(bytes.fromhex(f"{3:040x}"))["examples"] == 3


def test_store_leaves_out_a_repeated_message_after_the_limit(tmp_path):
    with Store(tmp_path / "store") as store:
        for n in range(4):
            store.write([pending(n + 1, [example("", f"f{n}", function(f"f{n}", f"x + {n}"), "Fix it")],
                                 message="fix it", limit=2)])
        found = {e["qualified_name"]: (e["message"], e.get("message_omitted")) for _, e in store.iter_examples()}
        assert found == {"f0": ("Fix it", None), "f1": ("Fix it", None), "f2": ("", "repeated"),
                         "f3": ("", "repeated")}
        assert store.get_commit(bytes.fromhex(f"{3:040x}"))["message_omitted"] == "repeated"


def test_without_enforcement_the_store_keeps_every_byte_and_still_counts(tmp_path):
    with Store(tmp_path / "store") as store:
        store.write([pending(1, [example("", "a", function("a"))], message="same", limit=1)])
        store.write([pending(2, [example("", "a", function("a"))], message="same", limit=1, enforce=False)])
        # issue 11's marking for what is stored anyway: the commit's duplicates
        assert store.get_commit(bytes.fromhex(f"{2:040x}"))["duplicates"] == 1
        assert store.next_seq() == 2
        store.write([pending(3, [example("", "b", function("b"))], message="same", limit=1)])
        assert [e.get("message_omitted") for _, e in store.iter_examples()] == [None, None, "repeated"]


def test_the_store_keeps_the_sketch_scheme_it_started_with(tmp_path):
    long_body = " + ".join(f"x.rotate_left({n})" for n in range(30))
    with Store(tmp_path / "store") as store:
        assert store.sketch_scheme() is None
        store.write([pending(1, [example("", "a", function("a", long_body))], cap=1)])
        assert store.sketch_scheme() == SCHEME == TOKEN_SCHEME
        # a target sketched with another scheme would be compared with unrelated numbers: refused, nothing stored
        other = pending(2, [example("", "b", function("b", long_body))], cap=1, scheme=SHA1_SCHEME)
        with pytest.raises(StoreError, match="never compared silently"):
            store.write([other])
        assert not store.has_commit(other.oid) and store.next_seq() == 1
        store.write([pending(3, [example("", "c", function("c", long_body))], cap=1)])
        assert store.get_commit(bytes.fromhex(f"{3:040x}"))["skipped_items"] == {"near-duplicate": 1}


def test_the_store_screens_by_the_keys_ingest_computed(tmp_path):
    """Ingest sends each example's key with it (the store would decode every example again for it): the store
    screens by those keys, and by its own where they do not match the examples one for one."""
    with Store(tmp_path / "store") as store:
        store.write([pending(1, [example("", "a", function("a"))])])
        given = pending(2, [example("", "b", function("b")), example("", "c", function("c"))])
        first_key = example_key(example(f"{1:040x}", "a", function("a")))
        store.write([replace(given, screen=replace(given.screen, keys=(first_key, example_key(given.examples[1]))))])
        assert store.get_commit(given.oid)["skipped_items"] == {"duplicate": 1}
        unmatched = pending(3, [example("", "a", function("a")), example("", "d", function("d"))])
        store.write([replace(unmatched, screen=replace(unmatched.screen, keys=(first_key,)))])
        assert store.get_commit(unmatched.oid)["skipped_items"] == {"duplicate": 1}
        assert [e["qualified_name"] for _, e in store.iter_examples()] == ["a", "c", "d"]


def test_ingest_sends_each_examples_key(tmp_path):
    repo = init_repo(tmp_path / "repo")
    commit_files(repo, {"src/lib.rs": function("a") + function("b"), "src/x.rs": distinct("x", 1)}, "two files")
    head = commit_files(repo, {"src/lib.rs": function("a", "x + 2") + function("c")}, "edit")
    made = CommitProcessor(GitRepo(repo), Config().ingest, source="test").process([head])[0]
    assert len(made.examples) == 3 and made.screen.keys == tuple(example_key(e) for e in made.examples)


def test_a_store_sketched_before_the_scheme_was_recorded_keeps_sha1(tmp_path, isolated_home, monkeypatch):
    """Stores written before sketch schemes existed hold datasketch-default (SHA-1) sketches and no record of
    it: ingest keeps sketching them with SHA-1, so a new target meets its near-duplicates there."""
    from gitlora.daemon import dedup

    config = isolated_home / ".config/gitlora/config.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text("[ingest]\nnear_duplicate_cap = 1\n")
    long_body = " + ".join(f"x.rotate_left({n})" for n in range(30))
    repo = init_repo(tmp_path / "repo")
    commit_files(repo, {"src/h0.rs": function("handler_0", long_body)}, "first handler")
    with monkeypatch.context() as patched:
        patched.setattr(dedup, "SCHEME", SHA1_SCHEME)  # the gitlora that wrote the store
        backfill(str(repo), progress=False, workers=1)
    opened = open_repo(repo, Config())
    env = lmdb.open(str(opened.paths.store), max_dbs=10)
    meta = env.open_db(b"meta")
    with env.begin(write=True) as txn:
        assert txn.pop(b"sketch_scheme", db=meta) == SHA1_SCHEME.encode()  # as a store from before the record has it
    env.close()
    with Store(opened.paths.store) as store:
        assert store.sketch_scheme() == SHA1_SCHEME

    later = commit_files(repo, {"src/h1.rs": function("handler_1", long_body)}, "second handler")
    backfill(str(repo), progress=False, workers=1)
    commits, examples = stored(repo)
    assert commits[later]["skipped_items"] == {"near-duplicate": 1} and commits[later]["examples"] == 0
    with Store(opened.paths.store, readonly=True) as store:
        assert store.sketch_scheme() == SHA1_SCHEME


# -- real histories through the real ingest path -------------------------------------------------------------
def stored(repo: Path) -> tuple[dict[str, dict], list[dict]]:
    opened = open_repo(repo, Config())
    with Store(opened.paths.store, readonly=True) as store:
        return ({oid.hex(): record for oid, record in store.iter_commits()},
                [e for _, e in store.iter_examples()])


def test_a_merge_replaying_its_branch_adds_no_trainable_examples(tmp_path):
    repo = init_repo(tmp_path / "repo")
    commit_files(repo, {"src/lib.rs": function("base")}, "base")
    git(repo, "checkout", "-q", "-b", "feature")
    branch = [commit_files(repo, {"src/net.rs": function("connect", f"x + {n}")}, f"feature {n}") for n in range(3)]
    git(repo, "checkout", "-q", "main")
    commit_files(repo, {"src/lib.rs": function("base", "x * 7")}, "main moves on")
    git(repo, "merge", "-q", "--no-ff", "-m", "Bring the network layer in", "feature")
    merge = git(repo, "rev-parse", "HEAD")
    # a merge that also resolves something of its own: only that is new
    git(repo, "checkout", "-q", "-b", "second", "HEAD~1")
    theirs = commit_files(repo, {"src/util.rs": function("util")}, "util")
    git(repo, "checkout", "-q", "main")
    git(repo, "merge", "-q", "--no-ff", "--no-commit", "second")
    (repo / "src/glue.rs").write_text(function("glue"))
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "Merge second, with glue")
    merge_with_glue = git(repo, "rev-parse", "HEAD")

    backfill(str(repo), progress=False, workers=1)
    commits, examples = stored(repo)
    assert commits[merge]["examples"] == 0 and commits[merge]["skipped_items"] == {"duplicate": 1}
    assert commits[merge]["duplicate_of"] == [branch[-1]]
    assert commits[merge_with_glue]["examples"] == 1 and commits[merge_with_glue]["duplicate_of"] == [theirs]
    assert {e["qualified_name"] for e in examples if e["commit"] == merge_with_glue} == {"glue::glue"}
    assert not any(e["commit"] == merge for e in examples)
    opened = open_repo(repo, Config())
    with Store(opened.paths.store) as store:
        ShardWriter(opened.paths.shards, opened.paths.manifest, store).flush(shard_size=3)
    facts = {f["commit"] for e in json.loads(opened.paths.manifest.read_text())["shards"] for f in e["commits"]}
    assert merge not in facts and merge_with_glue in facts and set(branch) <= facts


def test_a_cherry_pick_adds_no_trainable_examples(tmp_path):
    repo = init_repo(tmp_path / "repo")
    commit_files(repo, {"src/lib.rs": function("base")}, "base")
    git(repo, "checkout", "-q", "-b", "fix")
    original = commit_files(repo, {"src/lib.rs": function("base") + function("fixed")}, "Fix overflow")
    git(repo, "checkout", "-q", "main")
    commit_files(repo, {"src/other.rs": function("other")}, "other work")
    git(repo, "cherry-pick", original)
    picked = git(repo, "rev-parse", "HEAD")
    assert picked != original

    backfill(str(repo), progress=False, workers=1)
    commits, _ = stored(repo)
    assert commits[original]["examples"] == 1
    assert commits[picked]["examples"] == 0 and commits[picked]["duplicate_of"] == [original]
    assert commits[picked]["skipped_items"] == {"duplicate": 1}


def test_near_duplicates_beyond_the_cap_are_left_out_and_counted(tmp_path, isolated_home):
    config = isolated_home / ".config/gitlora/config.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text("[ingest]\nnear_duplicate_cap = 2\n")
    long_body = " + ".join(f"x.rotate_left({n})" for n in range(30))
    repo = init_repo(tmp_path / "repo")
    first = commit_files(repo, {f"src/h{n}.rs": function(f"handler_{n}", long_body) for n in range(5)} |
                         {f"src/d{n}.rs": distinct(f"unlike_{n}", n) for n in range(4)}, "handlers")
    later = commit_files(repo, {"src/h9.rs": function("handler_9", long_body)}, "one more handler")
    backfill(str(repo), progress=False, workers=1)
    commits, examples = stored(repo)
    assert commits[first]["skipped_items"] == {"near-duplicate": 3} and commits[first]["examples"] == 6
    assert commits[later]["skipped_items"] == {"near-duplicate": 1} and commits[later]["examples"] == 0
    assert sum(e["qualified_name"].endswith(tuple(f"unlike_{n}" for n in range(4))) for e in examples) == 4
    stats = json.loads(gitlora("stats", "--json", str(repo)).stdout)
    assert stats["item_skip_reasons"] == {"near-duplicate": 4}


def snapshot(opened: OpenedRepo) -> dict:
    with Store(opened.paths.store, readonly=True) as store:
        drop = ("stored_at", "timings_ms", "source", "noticed_at", "symbol_index")
        return {"examples": dict(store.iter_raw_examples()),
                "commits": {oid.hex(): {k: v for k, v in r.items() if k not in drop} for oid, r in store.iter_commits()},
                "counters": store.counters(), "next_seq": store.next_seq(),
                "shards": {p.name: p.read_bytes() for p in sorted(opened.paths.shards.glob("*.jsonl"))}}


def test_repair_gives_back_exactly_what_the_screening_stored(tmp_path, isolated_home):
    config = isolated_home / ".config/gitlora/config.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text("[ingest]\nnear_duplicate_cap = 2\nrepeated_message_limit = 1\n")
    long_body = " + ".join(f"x.rotate_left({n})" for n in range(30))
    repo = init_repo(tmp_path / "repo")
    commit_files(repo, {f"src/h{n}.rs": function(f"handler_{n}", long_body) for n in range(4)} |
                 {"src/a.rs": distinct("a", 1)}, "Fix things")
    git(repo, "checkout", "-q", "-b", "feature")
    commit_files(repo, {"src/b.rs": distinct("b", 2)}, "Fix things")
    git(repo, "checkout", "-q", "main")
    commit_files(repo, {"src/c.rs": distinct("c", 3), "src/a.rs": distinct("a", 4)}, "Fix things")
    git(repo, "merge", "-q", "--no-ff", "-m", "Merge feature and add d", "feature")
    commit_files(repo, {"src/d.rs": distinct("d", 5), "src/b.rs": distinct("b", 2) + distinct("e", 6)}, "tail")
    backfill(str(repo), progress=False, workers=1)
    opened = open_repo(repo, Config())
    with Store(opened.paths.store) as store:
        assert ShardWriter(opened.paths.shards, opened.paths.manifest, store).flush(shard_size=2)
    before = snapshot(opened)
    screened = [r for r in before["commits"].values() if r.get("skipped_items") or r.get("message_omitted")]
    assert len(screened) >= 3  # near-duplicates, a merge's duplicates, a repeated message: all in the history

    shutil.rmtree(opened.paths.store)
    report = repair_store(opened, Config.model_validate({"ingest": {"near_duplicate_cap": 2,
                                                                    "repeated_message_limit": 1}}))
    assert report.action == "rebuilt" and report.ok and report.differed == [], report.summary()
    assert snapshot(opened) == before


def test_screening_off_stores_every_example_and_only_marks_the_replay(tmp_path, isolated_home):
    """`[ingest] dedup = false` (the examples ablation's stores without screening): a merge replaying its branch
    stores its example again, marked as issue 11's commit-level duplicate; near-duplicates and repeated messages
    are all stored."""
    config = isolated_home / ".config/gitlora/config.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text("[ingest]\ndedup = false\nnear_duplicate_cap = 1\nrepeated_message_limit = 1\n")
    long_body = " + ".join(f"x.rotate_left({n})" for n in range(30))
    repo = init_repo(tmp_path / "repo")
    first = commit_files(repo, {f"src/h{n}.rs": function(f"handler_{n}", long_body) for n in range(3)}, "Fix")
    git(repo, "checkout", "-q", "-b", "feature")
    branch = commit_files(repo, {"src/net.rs": function("connect")}, "Fix")
    git(repo, "checkout", "-q", "main")
    commit_files(repo, {"src/lib.rs": function("base", "x * 7")}, "Fix")
    git(repo, "merge", "-q", "--no-ff", "-m", "Bring the network layer in", "feature")
    merge = git(repo, "rev-parse", "HEAD")
    backfill(str(repo), progress=False, workers=1)
    commits, examples = stored(repo)
    assert commits[first]["examples"] == 3 and "skipped_items" not in commits[first]
    assert commits[merge]["examples"] == 1 and commits[merge]["duplicates"] == 1
    assert commits[merge]["duplicate_of"] == [branch] and "skipped_items" not in commits[merge]
    assert not any(r.get("message_omitted") for r in commits.values())
    assert [e["message"].strip() for e in examples if e["commit"] == branch] == ["Fix"]
