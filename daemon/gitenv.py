"""The environment for a `git` gitlora spawns: the one policy for which `GIT_*` variables it inherits.

git exports GIT_DIR, GIT_INDEX_FILE, GIT_WORK_TREE, GIT_PREFIX… into the hooks it runs, and a user's shell may
hold any other `GIT_*`: inherited, they would point a `git -C OTHER` (or a daemon started from a hook) at the
committing repository, or change what git prints. So every `GIT_*` goes, except those that say how git itself
is set up on this machine, never which repository it works on:

- GIT_EXEC_PATH: where git finds its own sub-commands (a git installed outside the usual prefix needs it);
- GIT_CONFIG_NOSYSTEM, GIT_CONFIG_GLOBAL, GIT_CONFIG_SYSTEM: which config files the user chose git to read
  (sandboxes, CI and test suites isolate git with them; dropping them would read configs they excluded);
- GIT_CEILING_DIRECTORIES: where repository discovery must stop (slow network mounts, nested checkouts).

Standard library only: the hook installer imports it from the CLI.
"""
from __future__ import annotations

import os
from collections.abc import Collection

KEPT = frozenset({"GIT_EXEC_PATH", "GIT_CONFIG_NOSYSTEM", "GIT_CONFIG_GLOBAL", "GIT_CONFIG_SYSTEM",
                  "GIT_CEILING_DIRECTORIES"})


def git_env(keep: Collection[str] = KEPT, **overrides: str) -> dict[str, str]:
    """`os.environ` without `GIT_*` but the `keep` ones, then `overrides` set (GIT_AUTHOR_NAME=… for a demo).

    `keep=()` drops even the machine's git setup: for a fully isolated git (benchmarks, which bring their own).
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_") or k in keep}
    env.update(overrides)
    return env
