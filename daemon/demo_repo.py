"""Builds the demo repository: a small Rust crate whose history exercises every ingest path.

Used by `gitlora demo` and by the tests (so the demo shows exactly what is tested). Built with the git CLI,
with fixed dates and identities, so commit ids are the same on every machine.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

from .gitenv import git_env

LIB_V1 = '''use std::collections::HashMap;
use std::fmt;

/// Runtime configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub name: String,
    pub retries: u32,
}

impl Config {
    pub fn new(name: &str) -> Self {
        Config { name: name.to_string(), retries: 3 }
    }
}

impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.name)
    }
}

pub fn parse(input: &str) -> HashMap<String, String> {
    input
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}
'''

LIB_V2 = LIB_V1.replace(
    "        .filter_map(|line| line.split_once('='))\n",
    "        .filter(|line| !line.trim_start().starts_with('#'))\n        .filter_map(|line| line.split_once('='))\n",
) + '''
/// How the node runs.
pub enum Mode {
    Full,
    Light { peers: usize },
}
'''

LIB_V3 = LIB_V2 + '''
pub const DEFAULT_PORT: u16 = 7070;
pub static BANNER: &str = "the-demo";
pub type Peers = Vec<String>;

pub mod limits {
    pub fn max_peers() -> usize {
        64
    }
}
'''

UTIL = '''/// Clamp a value into a range.
pub fn clamp(value: i64, low: i64, high: i64) -> i64 {
    value.max(low).min(high)
}

pub fn is_even(value: i64) -> bool {
    value % 2 == 0
}
'''

RENDER = '''pub trait Render {
    fn render(&self) -> String;
    fn width(&self) -> usize {
        self.render().len()
    }
}

impl Render for u32 {
    fn render(&self) -> String {
        format!("{self}")
    }
}
'''

NET = '''use crate::Config;

macro_rules! log_peer {
    ($peer:expr) => {
        println!("peer: {}", $peer)
    };
}

pub union Word {
    pub int: u32,
    pub float: f32,
}

pub fn connect(config: &Config) -> Result<(), String> {
    log_peer!(config.name);
    if config.retries == 0 {
        return Err("no retries left".into());
    }
    Ok(())
}
'''

BROKEN = '''pub fn fine() -> u8 {
    1
}

pub fn broken( -> u8 {
    2
'''

# Latin-1 bytes (not UTF-8): "café" with a 0xE9 byte.
LATIN1 = b"// caf\xe9\npub fn latin() -> u8 { 0 }\n"
BINARY_RS = b"pub fn looks_rusty() {}\n\x00\x01\x02\x03binary payload\n"
PNG = bytes.fromhex("89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c489") + b"\x00" * 16

# What ingest must find, commit by commit (subject -> list of (change_kind, kind, qualified_name)), and the
# skip reasons it must record. The tests assert exactly this, with the default [ingest] hygiene: items under
# 50 bytes are left out (EXPECTED_ITEM_SKIPS), and the merge's items, its branch's replayed, are duplicates.
EXPECTED: dict[str, list[tuple[str, str, str]]] = {
    "Initial crate: config parsing and helpers": [
        ("added", "struct", "Config"), ("added", "impl", "impl Config"), ("added", "method", "Config::new"),
        ("added", "impl", "impl fmt::Display for Config"), ("added", "method", "<Config as fmt::Display>::fmt"),
        ("added", "fn", "parse"), ("added", "fn", "util::clamp"), ("added", "fn", "util::is_even"),
    ],
    "Skip comment lines when parsing; add run modes": [("modified", "fn", "parse"), ("added", "enum", "Mode")],
    "Add a Render trait": [
        ("added", "trait", "render::Render"), ("added", "method", "render::Render::width"), ("added", "impl", "render::impl Render for u32"),
        ("added", "method", "render::<u32 as Render>::render"),
    ],
    "Rename util to helpers": [],
    "Add networking": [
        ("added", "macro", "net::log_peer"), ("added", "union", "net::Word"), ("added", "fn", "net::connect"),
    ],
    "Add defaults and limits": [("added", "mod", "limits")],
    "Merge branch 'feature/net'": [],
    "Drop the Render trait": [
        ("deleted", "trait", "render::Render"), ("deleted", "method", "render::Render::width"), ("deleted", "impl", "render::impl Render for u32"),
        ("deleted", "method", "render::<u32 as Render>::render"),
    ],
    "Add a logo and a generated blob": [],
    "Work in progress: half-written function": [],
    "Add a Latin-1 encoded file": [],
    "Rename helpers to math and add a doc line": [("modified", "fn", "math::is_even")],
}
EXPECTED_ITEM_SKIPS = {
    "Add a Render trait": {"too-small": 1},
    "Drop the Render trait": {"too-small": 1},
    "Add defaults and limits": {"too-small": 4},
    "Merge branch 'feature/net'": {"duplicate": 3},
    "Work in progress: half-written function": {"too-small": 1},
}
EXPECTED_SKIPS = {
    "Add a logo and a generated blob": ("src/generated.rs", "binary"),
    "Add a Latin-1 encoded file": ("src/latin1.rs", "non-utf8"),
}


class DemoRepoBuilder:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._tick = 0
        self.env = git_env(GIT_AUTHOR_NAME="Demo Dev", GIT_AUTHOR_EMAIL="dev@example.com",
                           GIT_COMMITTER_NAME="Demo Dev", GIT_COMMITTER_EMAIL="dev@example.com",
                           GIT_CONFIG_NOSYSTEM="1")

    def git(self, *args: str) -> str:
        self._tick += 1
        stamp = f"{1_700_000_000 + self._tick * 3600} +0000"
        env = {**self.env, "GIT_AUTHOR_DATE": stamp, "GIT_COMMITTER_DATE": stamp}
        done = subprocess.run(["git", *args], cwd=self.path, env=env, check=True, capture_output=True, text=True)
        return done.stdout.strip()

    def write(self, rel: str, content: str | bytes) -> None:
        target = self.path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(content, encoding="utf-8")

    def commit(self, message: str) -> str:
        self.git("add", "-A")
        self.git("commit", "-q", "-m", message)
        return self.git("rev-parse", "HEAD")

    def build(self) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        self.git("init", "-q", "-b", "main")
        self.git("config", "user.name", "Demo Dev")
        self.git("config", "user.email", "dev@example.com")
        self.git("config", "commit.gpgsign", "false")
        self.write("Cargo.toml", '[package]\nname = "demo"\nversion = "0.1.0"\nedition = "2021"\n')
        self.write("README.md", "# demo\n")
        self.write("src/lib.rs", LIB_V1)
        self.write("src/util.rs", UTIL)
        self.commit("Initial crate: config parsing and helpers")
        self.write("src/lib.rs", LIB_V2)
        self.commit("Skip comment lines when parsing; add run modes")
        self.write("src/render.rs", RENDER)
        self.commit("Add a Render trait")
        self.git("mv", "src/util.rs", "src/helpers.rs")
        self.commit("Rename util to helpers")
        self.git("checkout", "-q", "-b", "feature/net")
        self.write("src/net.rs", NET)
        self.commit("Add networking")
        self.git("checkout", "-q", "main")
        self.write("src/lib.rs", LIB_V3)
        self.commit("Add defaults and limits")
        self.git("merge", "-q", "--no-ff", "-m", "Merge branch 'feature/net'", "feature/net")
        self.git("rm", "-q", "src/render.rs")
        self.commit("Drop the Render trait")
        self.write("assets/logo.png", PNG)
        self.write("src/generated.rs", BINARY_RS)
        self.commit("Add a logo and a generated blob")
        self.write("src/broken.rs", BROKEN)
        self.commit("Work in progress: half-written function")
        self.write("src/latin1.rs", LATIN1)
        self.commit("Add a Latin-1 encoded file")
        self.git("mv", "src/helpers.rs", "src/math.rs")
        self.write("src/math.rs", UTIL.replace("pub fn is_even", "/// True for even numbers.\npub fn is_even"))
        self.commit("Rename helpers to math and add a doc line")
        self.git("tag", "v0.1.0")
        return self.path


def build_demo_repo(path: Path) -> Path:
    return DemoRepoBuilder(path).build()
