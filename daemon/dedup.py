"""Near-duplicate targets: MinHash signatures of a target's token shingles, and LSH band keys that find the
cluster a new target belongs to (DESIGN.md, *Hygiene and deduplication*). Pure; the store applies them.

The signature is datasketch's `MinHash(num_perm=64, seed=1, scheme="legacy")` of the target's shingles, bit
for bit (tests/test_dedup.py checks it against datasketch). It is computed here with numpy rather than by
importing datasketch, because importing datasketch imports scipy (its LSH parameter search), some 50 MB of
resident memory the daemon would keep for good after its first commit, beyond its idle memory bound. The
layout of the bands is fixed (not derived from the threshold), so a changed threshold applies to the clusters
already stored: the bands only propose candidates, the signature's estimated similarity decides.
"""
from __future__ import annotations

import hashlib
import re
from array import array
from dataclasses import dataclass
from functools import lru_cache
from operator import methodcaller
from typing import Any

NUM_PERM = 64
SEED = 1
# 12 bands of 5 rows (60 of the 64 values): a pair with Jaccard similarity s shares a band with probability
# 1 - (1 - s^5)^12: 0.998 at s = 0.85, 0.93 at 0.7, and 0.31 at 0.5 (a candidate the signature then rejects).
BANDS = 12
ROWS = 5
SHINGLE_TOKENS = 3
_TOKEN = re.compile(r"\w+|[^\w\s]")
_MERSENNE_PRIME = (1 << 61) - 1
_MAX_HASH = (1 << 32) - 1
_SHA1_WORDS = 5  # a SHA-1 digest is five 32-bit words
_DIGEST = methodcaller("digest")


@dataclass(frozen=True)
class Screen:
    """What the store's screening of one commit needs besides its examples (made by ingest; applied by the
    store in the commit's own transaction, so each decision is made once, in commit order)."""

    sketches: tuple[bytes | None, ...]  # per example: its target's signature (None: not sketched)
    message_key: bytes | None  # the message's repetition key (None: empty, or already left out)
    near_cap: int  # examples kept per near-duplicate cluster; 0 = no cap
    near_threshold: float  # estimated Jaccard similarity from which a target joins a cluster
    repeated_message_limit: int  # a message stored this many times before is left out; 0 = off
    enforce: bool = True  # False (repair re-storing shard bytes): index and count, leave out and change nothing
    # With enforce False: the example keys of what the store left out when it first stored the commit (repair
    # re-derives them), so the rebuilt record counts them again by reason.
    left_out: tuple[bytes, ...] = ()


def shingles(text: str) -> set[bytes]:
    """The target's token 3-grams (identifiers, numbers, single punctuation), whitespace-blind."""
    return {shingle.encode("utf-8", "surrogatepass") for shingle in _shingle_texts(text)}


def _shingle_texts(text: str) -> set[str]:
    """`shingles`, not yet encoded; built by C-level map/zip rather than a slice per token."""
    tokens = _TOKEN.findall(text)
    return set(map(" ".join, zip(*(tokens[i:] for i in range(SHINGLE_TOKENS)))))


@lru_cache(maxsize=1)
def _permutations() -> tuple[Any, Any]:
    import numpy as np  # only a process that sketches pays for numpy

    gen = np.random.RandomState(SEED)
    pairs = np.array([(gen.randint(1, _MERSENNE_PRIME, dtype=np.uint64),
                       gen.randint(0, _MERSENNE_PRIME, dtype=np.uint64)) for _ in range(NUM_PERM)],
                     dtype=np.uint64).T
    return pairs[0], pairs[1]


def signature(text: str) -> bytes | None:
    """The MinHash signature of a target (NUM_PERM little-endian uint32), or None when it has too few tokens
    to have a shingle."""
    found = _shingle_texts(text)
    if not found:
        return None
    import numpy as np

    a, b = _permutations()
    # datasketch's hash of a shingle is the first 4 bytes of its SHA-1, little-endian. One encode for all the
    # shingles (a token holds no whitespace, so "\n" separates them), and the digests read by numpy, leave only
    # the SHA-1 calls per shingle in Python.
    encoded = "\n".join(found).encode("utf-8", "surrogatepass").split(b"\n")
    digests = b"".join(map(_DIGEST, map(hashlib.sha1, encoded)))
    hashes = np.frombuffer(digests, "<u4")[::_SHA1_WORDS].astype(np.uint64)
    with np.errstate(over="ignore"):  # uint64 wraps around, as in datasketch's legacy scheme
        values = (np.outer(hashes, a) + b) % np.uint64(_MERSENNE_PRIME) & np.uint64(_MAX_HASH)
    return values.min(axis=0).astype("<u4").tobytes()


def band_keys(sig: bytes) -> list[bytes]:
    """One key per band: the band's number and a digest of its rows."""
    width = ROWS * 4
    return [bytes([band]) + hashlib.blake2b(sig[band * width:(band + 1) * width], digest_size=7).digest()
            for band in range(BANDS)]


def similarity(sig_a: bytes, sig_b: bytes) -> float:
    """Estimated Jaccard similarity of two signatures' shingle sets."""
    first, second = array("I"), array("I")
    first.frombytes(sig_a)
    second.frombytes(sig_b)
    if len(first) != len(second) or not first:
        return 0.0
    return sum(x == y for x, y in zip(first, second)) / len(first)
