"""Real git repositories for tests, built with the git CLI (never mocked)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path


def git(cwd: Path, *args: str, input: str | bytes | None = None, check: bool = True) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE")}
    done = subprocess.run(["git", *args], cwd=cwd, env=env, check=check, capture_output=True,
                          input=input.encode() if isinstance(input, str) else input)
    return done.stdout.decode("utf-8", "replace").strip()


def init_repo(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    git(path, "init", "-q", "-b", "main")
    return path


def commit_files(repo: Path, files: dict[str, str | bytes | None], message: str) -> str:
    """Write (or delete, for None) files and commit them; returns the new commit's oid."""
    for rel, content in files.items():
        target = repo / rel
        if content is None:
            target.unlink()
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(content)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "--allow-empty", "-m", message)
    return git(repo, "rev-parse", "HEAD")


def rust_module(index: int, version: int, functions: int = 6) -> str:
    """A Rust file whose functions change one at a time as `version` grows."""
    parts = [f"use std::collections::HashMap;\n\npub struct State{index} {{ pub values: Vec<u64> }}\n"]
    for fn in range(functions):
        body_version = version if fn == version % functions else 0
        parts.append(
            f"pub fn f{index}_{fn}(x: u64) -> u64 {{\n    let mut m = HashMap::new();\n"
            f"    m.insert(x, {body_version});\n    x.wrapping_mul({fn + 1}) + {body_version}\n}}\n"
        )
    return "\n".join(parts)


def synthetic_history(repo: Path, commits: int, files: int = 8, functions: int = 6) -> Path:
    """A linear history where each commit edits two Rust files, written fast with `git fast-import`."""
    init_repo(repo)
    stream: list[bytes] = []
    mark = 0
    for n in range(commits):
        changed = {} if n else {i: rust_module(i, 0, functions) for i in range(files)}
        if n:
            for i in (n % files, (n * 7 + 3) % files):
                changed[i] = rust_module(i, n, functions)
        mark += 1
        message = f"change {n}".encode()
        lines = [b"commit refs/heads/main", f"mark :{mark}".encode(),
                 f"committer Dev <dev@example.com> {1_700_000_000 + n * 60} +0000".encode(),
                 f"data {len(message)}".encode(), message]
        if n:
            lines.append(f"from :{mark - 1}".encode())
        for i, text in changed.items():
            data = text.encode()
            lines += [f"M 100644 inline src/mod{i}.rs".encode(), f"data {len(data)}".encode(), data]
        stream.append(b"\n".join(lines) + b"\n")
    git(repo, "fast-import", "--quiet", input=b"".join(stream))
    git(repo, "reset", "-q", "--hard", "main")
    return repo
