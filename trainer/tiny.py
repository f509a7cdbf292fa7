"""A tiny StarCoder2 built locally, so tests, the demo and CI exercise the real code path without a model hub.

The directory it writes is indistinguishable (to transformers/peft) from a downloaded StarCoder2 checkpoint:
`config.json` + `model.safetensors` via `save_pretrained`, and a byte-level BPE `tokenizer.json` carrying
StarCoder2's special tokens at StarCoder2's ids (0..37), so the renderer in `data.py` is exercised with the
same token strings as the real 3B model. The vocabulary is never resized afterwards (an adapter trained
against a resized vocabulary would be unservable without `modules_to_save`).

Everything is seeded: two builds give byte-identical weights and tokenizer.
"""
from __future__ import annotations

import json
import random
import shutil
import tempfile
from pathlib import Path

from gitlora.daemon.fsutil import publish_dir

# StarCoder2's special tokens in StarCoder2's order (ids 0..37 in bigcode/starcoder2-3b's tokenizer.json).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>", "<repo_name>", "<file_sep>",
    "<issue_start>", "<issue_comment>", "<issue_closed>", "<jupyter_start>", "<jupyter_text>", "<jupyter_code>",
    "<jupyter_output>", "<jupyter_script>", "<empty_output>", "<code_to_intermediate>", "<intermediate_to_code>",
    "<pr>", "<pr_status>", "<pr_is_merged>", "<pr_base>", "<pr_file>", "<pr_base_code>", "<pr_diff>",
    "<pr_diff_hunk>", "<pr_comment>", "<pr_event_id>", "<pr_review>", "<pr_review_state>", "<pr_review_comment>",
    "<pr_in_reply_to_review_id>", "<pr_in_reply_to_comment_id>", "<pr_diff_hunk_comment_line>", "<NAME>",
    "<EMAIL>", "<KEY>", "<PASSWORD>",
]

TINY_NAME = "tiny-starcoder2"
VOCAB_SIZE = 4096
SEED = 1234

# A few KB of ordinary Rust: the shapes the daemon extracts (fns, methods, structs, enums, traits, impls,
# macros, consts, uses) so BPE merges look like a code tokenizer's.
RUST_SEED = r'''
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::io::{self, BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use serde::{Deserialize, Serialize};

pub const MAX_BLOCK_SIZE: usize = 1_048_576;
static GLOBAL_COUNTER: AtomicU64 = AtomicU64::new(0);
pub type Result<T> = std::result::Result<T, Error>;

/// A block header as stored on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockHeader {
    pub height: u64,
    pub parent: [u8; 32],
    pub timestamp: u64,
    pub difficulty: u128,
    pub nonce: u64,
}

#[derive(Debug)]
pub enum Error {
    Io(io::Error),
    InvalidHeight { expected: u64, found: u64 },
    Parse(String),
    NotFound,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io(e) => write!(f, "io error: {}", e),
            Error::InvalidHeight { expected, found } => {
                write!(f, "invalid height: expected {expected}, found {found}")
            }
            Error::Parse(msg) => write!(f, "parse error: {msg}"),
            Error::NotFound => f.write_str("not found"),
        }
    }
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error::Io(e)
    }
}

pub trait Storage: Send + Sync {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>>;
    fn put(&mut self, key: &[u8], value: Vec<u8>) -> Result<()>;
    fn delete(&mut self, key: &[u8]) -> Result<bool>;
}

#[derive(Default)]
pub struct MemoryStorage {
    inner: HashMap<Vec<u8>, Vec<u8>>,
}

impl Storage for MemoryStorage {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.inner.get(key).cloned())
    }

    fn put(&mut self, key: &[u8], value: Vec<u8>) -> Result<()> {
        self.inner.insert(key.to_vec(), value);
        Ok(())
    }

    fn delete(&mut self, key: &[u8]) -> Result<bool> {
        Ok(self.inner.remove(key).is_some())
    }
}

impl BlockHeader {
    pub fn new(height: u64, parent: [u8; 32]) -> Self {
        Self { height, parent, timestamp: 0, difficulty: 1, nonce: 0 }
    }

    pub fn hash(&self) -> [u8; 32] {
        let mut hasher = blake3::Hasher::new();
        hasher.update(&self.height.to_le_bytes());
        hasher.update(&self.parent);
        hasher.update(&self.timestamp.to_le_bytes());
        hasher.update(&self.nonce.to_le_bytes());
        *hasher.finalize().as_bytes()
    }

    pub fn validate(&self, prev: &BlockHeader) -> Result<()> {
        if self.height != prev.height + 1 {
            return Err(Error::InvalidHeight { expected: prev.height + 1, found: self.height });
        }
        if self.parent != prev.hash() {
            return Err(Error::Parse("parent hash mismatch".to_string()));
        }
        Ok(())
    }
}

pub fn read_lines(path: &Path) -> io::Result<Vec<String>> {
    let file = std::fs::File::open(path)?;
    let reader = io::BufReader::new(file);
    reader.lines().collect()
}

pub async fn fetch_peers(client: &Client, limit: usize) -> anyhow::Result<Vec<PeerInfo>> {
    let response = client.get("/peers").query(&[("limit", limit)]).send().await?;
    let peers: Vec<PeerInfo> = response.json().await?;
    Ok(peers.into_iter().filter(|p| p.is_active()).collect())
}

macro_rules! ensure {
    ($cond:expr, $err:expr) => {
        if !$cond {
            return Err($err);
        }
    };
}

pub mod mempool {
    use super::*;

    pub struct Mempool {
        txs: BTreeMap<u64, Transaction>,
        seen: HashSet<[u8; 32]>,
        capacity: usize,
    }

    impl Mempool {
        pub fn with_capacity(capacity: usize) -> Self {
            Self { txs: BTreeMap::new(), seen: HashSet::new(), capacity }
        }

        pub fn insert(&mut self, tx: Transaction) -> bool {
            if self.txs.len() >= self.capacity || !self.seen.insert(tx.id()) {
                return false;
            }
            self.txs.insert(tx.fee, tx);
            true
        }

        pub fn pop_best(&mut self) -> Option<Transaction> {
            let key = *self.txs.keys().next_back()?;
            self.txs.remove(&key)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_roundtrip() {
        let h = BlockHeader::new(1, [0u8; 32]);
        let bytes = bincode::serialize(&h).unwrap();
        let back: BlockHeader = bincode::deserialize(&bytes).unwrap();
        assert_eq!(h, back);
    }
}
'''

_NOUNS = ["block", "header", "peer", "account", "ledger", "tx", "state", "config", "node", "shard", "receipt",
          "balance", "token", "vote", "epoch", "chain", "storage", "index", "cache", "queue", "session"]
_VERBS = ["get", "set", "load", "store", "validate", "apply", "compute", "encode", "decode", "verify", "insert",
          "remove", "update", "sync", "flush", "parse", "build", "open", "close", "spawn"]
_TYPES = ["u8", "u32", "u64", "u128", "i64", "usize", "bool", "String", "Vec<u8>", "Option<u64>", "&str",
          "[u8; 32]", "f64", "Arc<Mutex<State>>"]


def _camel(word: str) -> str:
    return "".join(part.capitalize() for part in word.split("_"))


_SYLLABLES = ["ac", "al", "ber", "con", "da", "del", "en", "ex", "fi", "gen", "ha", "in", "ka", "lo", "mer",
              "min", "no", "or", "pa", "pro", "qu", "re", "sa", "sta", "ter", "tra", "un", "va", "xo", "ze"]


def _words(rng: random.Random, n: int) -> list[str]:
    """A deterministic pool of made-up identifiers, so BPE sees a code-like long tail of names."""
    pool = set(_NOUNS) | set(_VERBS)
    while len(pool) < n:
        pool.add("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))))
    return sorted(pool)


def rust_corpus(n_generated: int = 6000, seed: int = SEED) -> list[str]:
    """The seed file plus deterministic generated Rust items (fns, structs, impls, enums) for BPE training."""
    rng = random.Random(seed)
    words = _words(rng, 2500)
    weights = [1.0 / (rank + 1) ** 0.6 for rank in range(len(words))]  # Zipf-ish, like real identifiers
    docs = [RUST_SEED] * 5
    for i in range(n_generated):
        noun, noun2, verb = (w.lower() for w in rng.choices(words, weights, k=3))
        ty, ty2 = rng.choice(_TYPES), rng.choice(_TYPES)
        shape = i % 4
        if shape == 0:
            docs.append(
                f"pub fn {verb}_{noun}(&self, {noun2}: {ty}) -> Result<{ty2}> {{\n"
                f"    let {noun} = self.{noun}s.get(&{noun2}).ok_or(Error::NotFound)?;\n"
                f"    if {noun}.len() > MAX_{noun.upper()}_SIZE {{\n"
                f"        return Err(Error::Parse(format!(\"{noun} too large: {{}}\", {noun}.len())));\n"
                f"    }}\n    Ok({noun}.{verb}())\n}}\n")
        elif shape == 1:
            docs.append(
                f"#[derive(Debug, Clone, Default)]\npub struct {_camel(noun)}{_camel(noun2)} {{\n"
                f"    pub {noun}_id: u64,\n    pub {noun2}: {ty},\n    {verb}_count: usize,\n}}\n")
        elif shape == 2:
            docs.append(
                f"impl {_camel(noun)} {{\n    pub fn {verb}(&mut self, value: {ty}) {{\n"
                f"        self.{noun2} = value;\n        self.dirty = true;\n    }}\n\n"
                f"    pub fn is_{noun2}(&self) -> bool {{\n        matches!(self.kind, Kind::{_camel(noun2)})\n    }}\n}}\n")
        else:
            docs.append(
                f"pub enum {_camel(noun)}Event {{\n    {_camel(verb)}d {{ {noun2}: {ty} }},\n"
                f"    {_camel(noun2)}Changed({ty2}),\n    Closed,\n}}\n\n"
                f"for (i, {noun}) in self.{noun}s.iter().enumerate() {{\n"
                f"    println!(\"{{}}: {{:?}}\", i, {noun});\n}}\n")
    return docs


def build_tokenizer(vocab_size: int = VOCAB_SIZE):
    """Byte-level BPE trained on Rust, StarCoder2's special tokens first (ids 0..37), wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    tok.train_from_iterator(rust_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>",
        pad_token="<|endoftext|>", additional_special_tokens=SPECIAL_TOKENS[1:], model_max_length=16384,
        clean_up_tokenization_spaces=False)


def tiny_config(vocab_size: int, **overrides):
    """StarCoder2 shape in miniature: GQA (4 heads, 2 kv heads), biases, tied embeddings, gelu MLP."""
    from transformers import Starcoder2Config

    kw = dict(vocab_size=vocab_size, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, sliding_window=None,
              bos_token_id=0, eos_token_id=0, pad_token_id=0, use_bias=True, tie_word_embeddings=True,
              initializer_range=0.02)
    return Starcoder2Config(**{**kw, **overrides})


def default_dir() -> Path:
    from gitlora.daemon import paths

    return paths.models_dir() / TINY_NAME


def build_tiny_model(dest: Path | None = None, force: bool = False, **config_overrides) -> Path:
    """Build (once) the tiny model directory at `dest` and return it; an existing complete build is reused.

    `config_overrides` (hidden_size=1024, num_hidden_layers=8, ...) make a bigger random StarCoder2 for benchmarks.
    Written into a temp sibling and renamed into place, so a killed build never leaves a half model behind.
    """
    dest = Path(dest) if dest is not None else default_dir()
    if (dest / "config.json").exists() and (dest / "tokenizer.json").exists() and not force:
        return dest
    import torch
    from transformers import AutoModelForCausalLM

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        tokenizer = build_tokenizer()
        torch.manual_seed(SEED)
        config = tiny_config(len(tokenizer), **config_overrides)
        model = AutoModelForCausalLM.from_config(config)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "gitlora-tiny.json").write_text(json.dumps(
            {"seed": SEED, "params": sum(p.numel() for p in model.parameters()), "note": "built by gitlora"}))
        publish_dir(tmp, dest, replace=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


if __name__ == "__main__":  # python -m gitlora.trainer.tiny [DEST]
    import sys

    print(build_tiny_model(Path(sys.argv[1]) if len(sys.argv) > 1 else None, force="--force" in sys.argv))
