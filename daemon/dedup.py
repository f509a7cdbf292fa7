"""Near-duplicate targets: MinHash signatures of a target's token shingles, and LSH band keys that find the
cluster a new target belongs to (DESIGN.md, *Hygiene and deduplication*). Pure; the store applies them.

The signature is datasketch's `MinHash(num_perm=64, seed=1, scheme="legacy", hashfunc=...)` of the target's
shingles, bit for bit (tests/test_dedup.py checks it against datasketch), with the shingle hash of the store's
sketch scheme:

- `SHA1_SCHEME` (datasketch's default hash: the first 4 bytes of a shingle's SHA-1): what stores written before
  the schemes existed hold. One SHA-1 per shingle, called from Python, made MinHash the largest cost of backfill.
- `TOKEN_SCHEME` (`shingle_hash`): each token hashed once (blake2b, cached per process, as tokens repeat), and a
  shingle's hash mixed from its three tokens' hashes, for all shingles at once in numpy.

Signatures of two schemes are unrelated numbers, so a store keeps the scheme it started with (store meta
`sketch_scheme`; the store refuses a commit sketched with another) and new stores use `TOKEN_SCHEME`.

It is computed here with numpy rather than by importing datasketch, because importing datasketch imports scipy
(its LSH parameter search), some 50 MB of resident memory the daemon would keep for good after its first
commit, beyond its idle memory bound. The
layout of the bands is fixed (not derived from the threshold), so a changed threshold applies to the clusters
already stored: the bands only propose candidates, the signature's estimated similarity decides.
"""
from __future__ import annotations

import hashlib
import re
from array import array
from dataclasses import dataclass
from functools import lru_cache
from itertools import chain
from operator import eq, methodcaller
from typing import Any

from .memo import ByteLRU

NUM_PERM = 64
SEED = 1
# 12 bands of 5 rows (60 of the 64 values): a pair with Jaccard similarity s shares a band with probability
# 1 - (1 - s^5)^12: 0.998 at s = 0.85, 0.93 at 0.7, and 0.31 at 0.5 (a candidate the signature then rejects).
BANDS = 12
ROWS = 5
SHINGLE_TOKENS = 3
_TOKEN = re.compile(r"\w+|[^\w\s]")
# `_TOKEN` for an ASCII text, faster: re.ASCII's classes, which in ASCII differ from the Unicode ones only in
# that \x1c-\x1f (information separators) are not whitespace to them.
_ASCII_TOKEN = re.compile(r"\w+|[^\w\s]", re.ASCII)
_SEPARATORS = "\x1c\x1d\x1e\x1f"
_MERSENNE_PRIME = (1 << 61) - 1
_MAX_HASH = (1 << 32) - 1
_SHA1_WORDS = 5  # a SHA-1 digest is five 32-bit words
_DIGEST = methodcaller("digest")
SHA1_SCHEME = "sha1"
TOKEN_SCHEME = "token-blake2b-mix64"
SCHEMES = (SHA1_SCHEME, TOKEN_SCHEME)
SCHEME = TOKEN_SCHEME  # what a store without sketches starts with
# Odd 64-bit multipliers for the three token positions and murmur3's 64-bit finaliser (full avalanche: every bit
# of the three token hashes moves about half the bits of the shingle hash).
_MIX = (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F)
_FMIX = (0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53)
_MASK64 = (1 << 64) - 1
_GROUP_TEXTS = 256  # texts sketched together: bounds the (shingles x NUM_PERM) array
_MAX_CACHED_TOKENS = 1 << 16  # the token-hash cache is emptied when full (a few MB at most)


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
    scheme: str = SCHEME  # how `sketches` were computed (the store refuses sketches of a scheme it does not hold)
    # Per example: its `store.example_key`, computed where the example was made (the store would otherwise decode
    # every encoded example again); used only when there is one per example.
    keys: tuple[bytes, ...] = ()


def shingles(text: str) -> set[bytes]:
    """The target's token 3-grams (identifiers, numbers, single punctuation), whitespace-blind."""
    return {shingle.encode("utf-8", "surrogatepass") for shingle in _shingle_texts(text)}


def tokens(text: str) -> list[str]:
    """A text's tokens: identifiers and numbers (runs of word characters), and single punctuation characters."""
    if text.isascii() and not any(separator in text for separator in _SEPARATORS):
        return _ASCII_TOKEN.findall(text)
    return _TOKEN.findall(text)


def _shingle_texts(text: str) -> set[str]:
    """`shingles`, not yet encoded; built by C-level map/zip rather than a slice per token."""
    found = tokens(text)
    return set(map(" ".join, zip(*(found[i:] for i in range(SHINGLE_TOKENS)))))


@lru_cache(maxsize=1)
def _permutations() -> tuple[Any, Any]:
    import numpy as np  # only a process that sketches pays for numpy

    gen = np.random.RandomState(SEED)
    pairs = np.array([(gen.randint(1, _MERSENNE_PRIME, dtype=np.uint64),
                       gen.randint(0, _MERSENNE_PRIME, dtype=np.uint64)) for _ in range(NUM_PERM)],
                     dtype=np.uint64).T
    return pairs[0], pairs[1]


def token_hash(token: str) -> int:
    """A token's 32-bit hash in `TOKEN_SCHEME`: the first 4 bytes of its blake2b, little-endian."""
    return int.from_bytes(hashlib.blake2b(token.encode("utf-8", "surrogatepass"), digest_size=4).digest(), "little")


def shingle_hash(shingle: bytes) -> int:
    """`TOKEN_SCHEME`'s hash of one shingle (its tokens joined by a space, as `shingles` gives them): the hashfunc
    that makes datasketch's MinHash equal `signature(text, TOKEN_SCHEME)`. Plain Python, for that check; ingest
    computes the same numbers for all of a target's shingles at once."""
    first, second, third = (token_hash(t.decode("utf-8", "surrogatepass")) for t in shingle.split(b" "))
    x = (first * _MIX[0] + second * _MIX[1] + third) & _MASK64
    x ^= x >> 33
    x = (x * _FMIX[0]) & _MASK64
    x ^= x >> 33
    x = (x * _FMIX[1]) & _MASK64
    x ^= x >> 33
    return x >> 32


class _TokenHashes(dict):
    """token -> token_hash(token), filled on a miss (a dict lookup per token, in C, for the tokens seen before)."""

    def __missing__(self, token: str) -> int:
        if len(self) >= _MAX_CACHED_TOKENS:
            self.clear()
        value = self[token] = token_hash(token)
        return value


_token_hashes = _TokenHashes()
_NOT_MEMOISED = object()


def signature(text: str, scheme: str = SCHEME) -> bytes | None:
    """The MinHash signature of a target (NUM_PERM little-endian uint32) in `scheme`, or None when it has too
    few tokens to have a shingle."""
    return signatures([text], scheme)[0]


def signatures(texts: list[str], scheme: str = SCHEME, memo: ByteLRU | None = None) -> list[bytes | None]:
    """`signature` of each text, computed together: numpy's fixed cost per call, paid once for all of a file's
    targets, was most of a small target's cost. A text sketched recently (in `memo`, the caller's own:
    `memo.TextMemos.sketches`) is not sketched again (merges replay their branches, cherry-picks repeat targets)."""
    if scheme == TOKEN_SCHEME:
        hashes = _token_shingle_hashes
    elif scheme == SHA1_SCHEME:
        hashes = _sha1_shingle_hashes
    else:
        raise ValueError(f"unknown sketch scheme {scheme!r} (known: {', '.join(SCHEMES)})")
    memo = memo if memo is not None else ByteLRU(0)
    out: list[bytes | None] = [memo.get((scheme, text), _NOT_MEMOISED) for text in texts]  # type: ignore[misc]
    todo = [i for i, found in enumerate(out) if found is _NOT_MEMOISED]
    for start in range(0, len(todo), _GROUP_TEXTS):
        group = todo[start:start + _GROUP_TEXTS]
        for i, sketch in zip(group, _min_hashes(*hashes([texts[i] for i in group]))):
            out[i] = sketch
            memo.put((scheme, texts[i]), sketch, len(texts[i]))
    return out


def _token_shingle_hashes(texts: list[str]) -> tuple[Any, Any, int]:
    """`TOKEN_SCHEME`'s shingle hashes of the texts: (hashes, the text each belongs to, how many texts)."""
    import numpy as np

    tokenized = list(map(tokens, texts))
    counts = np.fromiter(map(len, tokenized), np.int64, len(tokenized))
    t = np.fromiter(map(_token_hashes.__getitem__, chain.from_iterable(tokenized)), np.uint64, int(counts.sum()))
    owner = np.repeat(np.arange(len(texts), dtype=np.uint64), counts)
    # A shingle is three consecutive tokens of one text: those that span two texts are dropped.
    whole = owner[:-2] == owner[2:]
    with np.errstate(over="ignore"):  # uint64 wraps around: arithmetic modulo 2**64, as in `shingle_hash`
        x = t[:-2] * np.uint64(_MIX[0]) + t[1:-1] * np.uint64(_MIX[1]) + t[2:]
        x ^= x >> np.uint64(33)
        x *= np.uint64(_FMIX[0])
        x ^= x >> np.uint64(33)
        x *= np.uint64(_FMIX[1])
        x ^= x >> np.uint64(33)
    return x[whole] >> np.uint64(32), owner[:-2][whole], len(texts)


def _sha1_shingle_hashes(texts: list[str]) -> tuple[Any, Any, int]:
    """`SHA1_SCHEME`'s shingle hashes: the first 4 bytes of each shingle's SHA-1, little-endian. One encode for
    all the shingles (a token holds no whitespace, so "\n" separates them), and the digests read by numpy,
    leave only the SHA-1 calls per shingle in Python."""
    import numpy as np

    found = [_shingle_texts(text) for text in texts]
    counts = np.fromiter(map(len, found), np.int64, len(found))
    if not counts.sum():
        return np.zeros(0, np.uint64), np.zeros(0, np.uint64), len(texts)
    encoded = "\n".join(chain.from_iterable(found)).encode("utf-8", "surrogatepass").split(b"\n")
    digests = b"".join(map(_DIGEST, map(hashlib.sha1, encoded)))
    hashes = np.frombuffer(digests, "<u4")[::_SHA1_WORDS].astype(np.uint64)
    return hashes, np.repeat(np.arange(len(texts), dtype=np.uint64), counts), len(texts)


def _min_hashes(hashes: Any, owner: Any, texts: int) -> list[bytes | None]:
    """Each text's signature: datasketch's legacy permutations, `(a * h + b) % (2**61 - 1) & (2**32 - 1)` in
    wrapping uint64, of its shingles' 32-bit hashes (`hashes[owner == text]`), minimised; None for a text with
    no shingle. Each distinct (text, hash) once (a repeat cannot change a minimum), and the remainder by the
    Mersenne prime taken with shifts and masks, not a division."""
    import numpy as np

    out: list[bytes | None] = [None] * texts
    if not len(hashes):
        return out
    keys = np.sort((owner << np.uint64(32)) | hashes)  # by text, then hash
    keys = keys[np.concatenate(([True], keys[1:] != keys[:-1]))]
    owners = keys >> np.uint64(32)
    a, b = _permutations()
    prime = np.uint64(_MERSENNE_PRIME)
    with np.errstate(over="ignore"):
        values = np.multiply.outer(keys & np.uint64(_MAX_HASH), a)
        values += b
    # x mod (2**61 - 1) for any uint64 x: (x & p) + (x >> 61) is congruent to x and at most p + 7, so one
    # subtraction of p where it is still >= p finishes it.
    reduced = values & prime
    values >>= np.uint64(61)
    reduced += values
    reduced[reduced >= prime] -= prime
    reduced &= np.uint64(_MAX_HASH)
    starts = np.flatnonzero(np.concatenate(([True], owners[1:] != owners[:-1])))
    minima = np.minimum.reduceat(reduced, starts, axis=0).astype("<u4")
    for index, row in zip(owners[starts].tolist(), minima):
        out[index] = row.tobytes()
    return out


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
    return sum(map(eq, first, second)) / len(first)  # the rows that agree; map(eq) compares in C
