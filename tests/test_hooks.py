"""gitlora.hooks: real git repos (git CLI in tmp dirs), real hooks, no mocks."""
from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from gitlora.hooks.install import (
    HOOK_NAMES,
    MARKER,
    HookConflictError,
    HooksPathSetError,
    NotAGitRepositoryError,
    install,
    installed_hooks,
    spool_path,
    uninstall,
)
from gitlora.daemon.gitenv import git_env
from gitlora.hooks.spool import SpoolEntry, parse_spool_chunk, parse_spool_line


# ----------------------------------------------------------------------------------------------- helpers

def git(cwd: Path, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], cwd=cwd, check=check, capture_output=True, text=True, input=input)


def head(cwd: Path, rev: str = "HEAD") -> str:
    return git(cwd, "rev-parse", rev).stdout.strip()


def commit(cwd: Path, name: str, content: str | None = None, *extra: str) -> str:
    (cwd / name).write_text(content if content is not None else f"{name}\n")
    git(cwd, "add", name)
    git(cwd, "commit", "-q", "-m", f"change {name}", *extra)
    return head(cwd)


def make_repo(parent: Path, name: str = "repo", *, initial: bool = True) -> Path:
    repo = parent / name
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    if initial:
        commit(repo, "README.md", "hello\n")
    return repo


def hooks_dir(repo: Path) -> Path:
    return Path(git(repo, "rev-parse", "--path-format=absolute", "--git-path", "hooks").stdout.strip())


def entries(repo: Path) -> list[SpoolEntry]:
    spool = spool_path(repo)
    if not spool.exists():
        return []
    lines = spool.read_text().splitlines(keepends=True)
    parsed = [parse_spool_line(line) for line in lines]
    assert None not in parsed, lines  # the hooks never write junk
    return parsed  # type: ignore[return-value]


def summary(repo: Path) -> list[tuple[str, str, str | None, str | None]]:
    return [(e.hook, e.new, e.old, e.info) for e in entries(repo)]


def snapshot(directory: Path) -> dict[str, tuple]:
    """Names, kinds, bytes, modes, symlink targets (and mtimes) of everything in a hooks dir."""
    out = {}
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        st = entry.stat(follow_symlinks=False)
        if entry.is_symlink():
            out[entry.name] = ("link", os.readlink(entry.path))
        elif entry.is_dir(follow_symlinks=False):
            out[entry.name] = ("dir", stat.S_IMODE(st.st_mode))
        else:
            out[entry.name] = ("file", Path(entry.path).read_bytes(), stat.S_IMODE(st.st_mode), st.st_mtime_ns)
    return out


def write_hook(path: Path, body: str, mode: int = 0o755) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(mode)
    return path


# ----------------------------------------------------------------------------------------------- events

def test_commit_writes_one_post_commit_line_and_creates_spool_dir(tmp_path):
    repo = make_repo(tmp_path)
    result = install(repo)
    assert not result.spool.parent.exists()  # created by the hook on first use
    assert {a.hook: a.action for a in result.actions} == dict.fromkeys(HOOK_NAMES, "created")
    oid = commit(repo, "a.rs", "fn a() {}\n")
    [entry] = entries(repo)
    assert (entry.hook, entry.new, entry.old, entry.info) == ("post-commit", oid, None, None)
    assert entry.time is None  # the fast path: HEAD read without starting a process, so no clock
    raw = result.spool.read_text()
    assert raw == f"post-commit\t{oid}\t\t\t\n"


def test_hook_falls_back_to_git_when_head_cannot_be_read_directly(tmp_path):
    # Git runs hooks from the work tree's top; run from elsewhere, the fast path finds no HEAD file and the
    # hook asks git instead (the same path reftable repositories or unusual layouts take).
    repo = make_repo(tmp_path)
    install(repo)
    oid = commit(repo, "a.rs", "fn a() {}\n")
    (repo / "src").mkdir()
    subprocess.run([str(hooks_dir(repo) / "post-commit")], cwd=repo / "src", env=git_env(), check=True)
    fast, slow = entries(repo)
    assert fast.new == slow.new == oid
    assert fast.time is None and slow.time is not None and abs(slow.time - __import__("time").time()) < 120


def test_fast_path_reads_worktree_and_detached_heads(tmp_path):
    repo = make_repo(tmp_path)
    install(repo)
    git(repo, "worktree", "add", "-q", "-b", "wt", str(tmp_path / "wt"))
    in_worktree = commit(tmp_path / "wt", "w.rs")
    git(repo, "checkout", "-q", "--detach")
    detached = commit(repo, "d.rs")
    assert [(e.new, e.time) for e in entries(repo)] == [(in_worktree, None), (detached, None)]


def test_amend_fires_post_commit_and_post_rewrite_amend(tmp_path):
    repo = make_repo(tmp_path)
    install(repo)
    old = commit(repo, "a.rs")
    (repo / "a.rs").write_text("fn a() { 1 }\n")
    git(repo, "commit", "-q", "-a", "--amend", "-m", "amended")
    new = head(repo)
    assert old != new
    assert summary(repo) == [
        ("post-commit", old, None, None),
        ("post-commit", new, None, None),
        ("post-rewrite", new, old, "amend"),
    ]


def test_merge_commit_fires_post_merge(tmp_path):
    repo = make_repo(tmp_path)
    git(repo, "checkout", "-q", "-b", "topic")
    commit(repo, "topic.rs")
    git(repo, "checkout", "-q", "main")
    commit(repo, "main.rs")
    install(repo)
    git(repo, "merge", "-q", "--no-edit", "topic")
    merge = head(repo)
    assert len(git(repo, "rev-list", "--parents", "-n1", "HEAD").stdout.split()) == 3
    assert summary(repo) == [("post-merge", merge, None, None)]


def test_squash_merge_marks_squash(tmp_path):
    repo = make_repo(tmp_path)
    git(repo, "checkout", "-q", "-b", "topic")
    commit(repo, "topic.rs")
    git(repo, "checkout", "-q", "main")
    before = head(repo)
    install(repo)
    git(repo, "merge", "-q", "--squash", "topic")
    assert summary(repo) == [("post-merge", before, None, "squash")]


def test_fast_forward_pull_from_second_clone_fires_post_merge(tmp_path):
    upstream = make_repo(tmp_path, "upstream")
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(upstream), str(clone))
    install(clone)
    tip = commit(upstream, "new.rs")
    git(clone, "pull", "-q", "--ff-only")
    assert head(clone) == tip
    assert summary(clone) == [("post-merge", tip, None, None)]
    assert entries(upstream) == []  # other repo, other spool, no hooks


def test_rebase_fires_post_commit_per_pick_and_post_rewrite_rebase(tmp_path):
    repo = make_repo(tmp_path)
    git(repo, "checkout", "-q", "-b", "topic")
    t1 = commit(repo, "t1.rs")
    t2 = commit(repo, "t2.rs")
    git(repo, "checkout", "-q", "main")
    commit(repo, "m.rs")
    git(repo, "checkout", "-q", "topic")
    install(repo)
    git(repo, "rebase", "-q", "main")
    n2 = head(repo)
    n1 = head(repo, "HEAD~1")
    assert summary(repo) == [
        ("post-commit", n1, None, None),
        ("post-commit", n2, None, None),
        ("post-rewrite", n1, t1, "rebase"),
        ("post-rewrite", n2, t2, "rebase"),
    ]


def test_cherry_pick_fires_post_commit(tmp_path):
    repo = make_repo(tmp_path)
    git(repo, "checkout", "-q", "-b", "topic")
    picked = commit(repo, "t.rs")
    git(repo, "checkout", "-q", "main")
    commit(repo, "m.rs")
    install(repo)
    git(repo, "cherry-pick", picked)
    new = head(repo)
    assert new != picked
    assert summary(repo) == [("post-commit", new, None, None)]


def test_git_am_fires_post_applypatch(tmp_path):
    repo = make_repo(tmp_path)
    git(repo, "checkout", "-q", "-b", "topic")
    commit(repo, "patched.rs")
    patch = git(repo, "format-patch", "-1", "--stdout").stdout
    git(repo, "checkout", "-q", "main")
    install(repo)
    git(repo, "am", "-q", input=patch)
    assert summary(repo) == [("post-applypatch", head(repo), None, None)]


def test_linked_worktree_shares_hooks_and_spool(tmp_path):
    repo = make_repo(tmp_path)
    result = install(repo)
    wt = tmp_path / "wt"
    git(repo, "worktree", "add", "-q", "-b", "feature", str(wt))
    assert hooks_dir(wt) == result.hooks_dir
    assert spool_path(wt) == result.spool
    assert not install(wt).changed  # same hooks dir: nothing to do
    oid = commit(wt, "wt.rs")
    assert summary(repo) == [("post-commit", oid, None, None)]
    assert head(repo) != oid  # the main worktree's HEAD did not move: the line names the worktree's commit
    assert {s.state for s in installed_hooks(wt).values()} == {"installed"}


def test_detached_head_commit(tmp_path):
    repo = make_repo(tmp_path)
    install(repo)
    git(repo, "checkout", "-q", "--detach")
    oid = commit(repo, "d.rs")
    assert git(repo, "symbolic-ref", "-q", "HEAD", check=False).returncode != 0
    assert summary(repo) == [("post-commit", oid, None, None)]


def test_install_ignores_git_env_of_the_calling_process(tmp_path, monkeypatch):
    repo = make_repo(tmp_path)
    other = make_repo(tmp_path, "other")
    monkeypatch.setenv("GIT_DIR", str(other / ".git"))  # as when called from inside a hook of another repo
    monkeypatch.setenv("GIT_INDEX_FILE", str(other / ".git" / "index"))
    assert "GIT_DIR" not in git_env()
    result = install(repo)
    assert result.hooks_dir == repo / ".git" / "hooks"
    assert not (other / ".git" / "hooks" / "post-commit").exists()



def test_git_env_drops_where_git_points_and_keeps_how_git_is_set_up(monkeypatch):
    monkeypatch.setenv("GIT_DIR", "/elsewhere/.git")
    monkeypatch.setenv("GIT_PREFIX", "src/")
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", "/mnt")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", "/etc/isolated.gitconfig")
    env = git_env(GIT_AUTHOR_NAME="Demo")
    assert "GIT_DIR" not in env and "GIT_PREFIX" not in env
    assert env["GIT_CEILING_DIRECTORIES"] == "/mnt" and env["GIT_CONFIG_GLOBAL"] == "/etc/isolated.gitconfig"
    assert env["GIT_AUTHOR_NAME"] == "Demo" and env["HOME"] == os.environ["HOME"]
    assert not [k for k in git_env(keep=()) if k.startswith("GIT_")]

def test_not_a_repository(tmp_path):
    with pytest.raises(NotAGitRepositoryError):
        install(tmp_path)


# ----------------------------------------------------------------------------------------------- chaining

USER_POST_REWRITE = """\
echo "user post-rewrite args: $*"
echo "user stderr" >&2
cat > "$(dirname "$0")/../user-rewrite-stdin"
exit 3
"""


def test_chained_user_post_rewrite_keeps_stdin_stdout_and_status(tmp_path):
    repo = make_repo(tmp_path)
    hd = hooks_dir(repo)
    user = write_hook(hd / "post-rewrite", USER_POST_REWRITE)
    original = user.read_bytes()
    result = install(repo)
    actions = {a.hook: a for a in result.actions}
    assert actions["post-rewrite"].action == "chained"
    assert actions["post-rewrite"].chained == hd / "post-rewrite.pre-gitlora"
    assert (hd / "post-rewrite.pre-gitlora").read_bytes() == original
    assert MARKER in (hd / "post-rewrite").read_bytes()

    old = commit(repo, "a.rs")
    proc = git(repo, "commit", "-q", "--amend", "-m", "again")
    new = head(repo)
    # git runs post-* hooks with stdout sent to stderr and ignores their status
    assert "user post-rewrite args: amend" in proc.stderr + proc.stdout
    assert "user stderr" in proc.stderr
    assert (repo / ".git" / "user-rewrite-stdin").read_text() == f"{old} {new}\n"
    assert ("post-rewrite", new, old, "amend") in summary(repo)

    # run our hook file directly: same stdout, same stdin to the chained hook, its exit status
    a, b = "1" * 40, "2" * 40
    stdin = f"{a} {b}\n{b} {'3' * 40} extra\n"
    direct = subprocess.run([str(hd / "post-rewrite"), "rebase"], cwd=repo, input=stdin, capture_output=True,
                            text=True)
    assert direct.returncode == 3
    assert direct.stdout == "user post-rewrite args: rebase\n"
    assert direct.stderr == "user stderr\n"
    assert (repo / ".git" / "user-rewrite-stdin").read_text() == stdin
    assert summary(repo)[-2:] == [("post-rewrite", b, a, "rebase"), ("post-rewrite", "3" * 40, b, "rebase")]


def test_post_rewrite_stdin_without_trailing_newline_reaches_chained_hook_verbatim(tmp_path):
    repo = make_repo(tmp_path)
    hd = hooks_dir(repo)
    write_hook(hd / "post-rewrite", 'cat > "$(dirname "$0")/../got"\n')
    install(repo)
    stdin = f"{'a' * 40} {'b' * 40}\n\n{'c' * 40} {'d' * 40}"  # blank line, no final newline
    subprocess.run([str(hd / "post-rewrite"), "amend"], cwd=repo, input=stdin, text=True, check=True)
    assert (repo / ".git" / "got").read_text() == stdin
    assert summary(repo) == [("post-rewrite", "b" * 40, "a" * 40, "amend"),
                             ("post-rewrite", "d" * 40, "c" * 40, "amend")]


def test_post_rewrite_large_stdin_with_chained_hook_that_ignores_it(tmp_path):
    repo = make_repo(tmp_path)
    hd = hooks_dir(repo)
    write_hook(hd / "post-rewrite", "exit 5\n")  # never reads stdin: the pipe to it fills up and breaks
    install(repo)
    pairs = [(f"{i:040x}", f"{i + 1:040x}") for i in range(3000)]  # ~246 KB, far over a pipe buffer
    stdin = "".join(f"{old} {new}\n" for old, new in pairs)
    proc = subprocess.run([str(hd / "post-rewrite"), "rebase"], cwd=repo, input=stdin, capture_output=True,
                          text=True, timeout=60)
    assert (proc.returncode, proc.stderr) == (5, "")
    assert summary(repo) == [("post-rewrite", new, old, "rebase") for old, new in pairs]


def test_post_rewrite_with_empty_stdin_falls_back_to_head(tmp_path):
    repo = make_repo(tmp_path)
    install(repo)
    subprocess.run([str(hooks_dir(repo) / "post-rewrite"), "amend"], cwd=repo, input="", text=True, check=True)
    assert summary(repo) == [("post-rewrite", head(repo), None, "amend")]


def test_chained_post_commit_status_and_output_when_run_directly(tmp_path):
    repo = make_repo(tmp_path)
    hd = hooks_dir(repo)
    write_hook(hd / "post-commit", 'echo "pc out $#"\necho "pc err" >&2\nexit 7\n')
    install(repo)
    proc = subprocess.run([str(hd / "post-commit")], cwd=repo, capture_output=True, text=True)
    assert (proc.returncode, proc.stdout, proc.stderr) == (7, "pc out 0\n", "pc err\n")
    assert summary(repo) == [("post-commit", head(repo), None, None)]
    # through git: the commit succeeds regardless
    oid = commit(repo, "b.rs")
    assert summary(repo)[-1] == ("post-commit", oid, None, None)


def test_symlinked_user_hook_is_preserved_and_still_runs(tmp_path):
    repo = make_repo(tmp_path)
    hd = hooks_dir(repo)
    scripts = repo / ".git" / "my-hooks"
    scripts.mkdir()
    write_hook(scripts / "pc", 'echo ran >> "$(git rev-parse --git-dir)/symlink-ran"\n')
    os.symlink("../my-hooks/pc", hd / "post-commit")  # relative: resolved from the hooks dir
    before = snapshot(hd)
    install(repo)
    assert os.readlink(hd / "post-commit.pre-gitlora") == "../my-hooks/pc"
    assert not (hd / "post-commit").is_symlink()
    oid = commit(repo, "a.rs")
    assert (repo / ".git" / "symlink-ran").read_text() == "ran\n"
    assert summary(repo) == [("post-commit", oid, None, None)]
    uninstall(repo)
    assert snapshot(hd) == before
    assert (scripts / "pc").read_text().endswith("symlink-ran\"\n")  # the target was never touched


def test_non_executable_existing_hook_is_kept_but_not_run(tmp_path):
    repo = make_repo(tmp_path)
    hd = hooks_dir(repo)
    write_hook(hd / "post-commit", 'echo ran > "$(git rev-parse --git-dir)/ran"\n', mode=0o644)
    before = snapshot(hd)
    install(repo)
    commit(repo, "a.rs")
    assert not (repo / ".git" / "ran").exists()  # git would not have run it either
    assert len(entries(repo)) == 1
    uninstall(repo)
    assert snapshot(hd) == before


def test_paths_with_spaces_and_quotes_are_quoted_for_sh(tmp_path):
    repo = make_repo(tmp_path, "it's a \"repo\" $HOME `x`")
    hd = hooks_dir(repo)
    write_hook(hd / "post-commit", 'echo chained >> "$(git rev-parse --git-dir)/chained"\n')
    install(repo)
    oid = commit(repo, "a.rs")
    assert (repo / ".git" / "chained").read_text() == "chained\n"
    assert summary(repo) == [("post-commit", oid, None, None)]


# ----------------------------------------------------------------------------------------------- install state

def _populate_hooks(hd: Path, tmp_path: Path) -> None:
    write_hook(hd / "post-commit", "echo user post-commit\n", mode=0o700)
    target = tmp_path / "elsewhere-post-merge"
    write_hook(target, "exit 0\n")
    os.symlink(target, hd / "post-merge")
    write_hook(hd / "post-rewrite", "exit 1\n", mode=0o640)
    write_hook(hd / "pre-commit", "exit 0\n")  # not ours to touch
    os.symlink(tmp_path / "dangling", hd / "post-applypatch")


def test_install_twice_is_idempotent_byte_for_byte(tmp_path):
    repo = make_repo(tmp_path)
    hd = hooks_dir(repo)
    _populate_hooks(hd, tmp_path)
    first = install(repo)
    assert first.changed
    after_first = snapshot(hd)
    second = install(repo)
    assert not second.changed
    assert {a.action for a in second.actions} == {"unchanged"}
    assert snapshot(hd) == after_first  # bytes, modes, links and mtimes
    assert {s.state for s in installed_hooks(repo).values()} == {"installed"}


def test_uninstall_round_trip_is_byte_identical(tmp_path):
    repo = make_repo(tmp_path)
    hd = hooks_dir(repo)
    _populate_hooks(hd, tmp_path)
    before = snapshot(hd)
    install(repo)
    assert snapshot(hd) != before
    result = uninstall(repo)
    assert {a.hook: a.action for a in result.actions} == dict.fromkeys(HOOK_NAMES, "restored")
    assert snapshot(hd) == before
    assert {s.state for s in installed_hooks(repo).values()} == {"absent"}
    assert {a.action for a in uninstall(repo).actions} == {"absent"}  # second uninstall: nothing to do


def test_uninstall_round_trip_with_no_prior_hooks(tmp_path):
    repo = make_repo(tmp_path)
    hd = hooks_dir(repo)
    before = snapshot(hd)
    install(repo)
    assert {a.action for a in uninstall(repo).actions} == {"removed"}
    assert snapshot(hd) == before


def test_reinstall_updates_stale_script_in_place(tmp_path):
    repo = make_repo(tmp_path)
    hd = hooks_dir(repo)
    write_hook(hd / "post-commit", "exit 0\n")
    install(repo)
    ours = hd / "post-commit"
    ours.write_bytes(re.sub(rb"template v\d+", b"template v0", ours.read_bytes()))  # an older gitlora's script
    assert installed_hooks(repo)["post-commit"].state == "stale"
    result = install(repo)
    assert {a.hook: a.action for a in result.actions}["post-commit"] == "updated"
    assert installed_hooks(repo)["post-commit"].state == "installed"
    assert (hd / "post-commit.pre-gitlora").read_text() == "#!/bin/sh\nexit 0\n"


def test_foreign_hook_that_replaced_ours_is_left_alone(tmp_path):
    repo = make_repo(tmp_path)
    hd = hooks_dir(repo)
    write_hook(hd / "post-commit", "echo original\n")
    install(repo)
    write_hook(hd / "post-commit", "echo someone else\n")  # e.g. a tool that overwrites hooks
    assert installed_hooks(repo)["post-commit"].state == "replaced"
    result = uninstall(repo)
    [foreign] = result.foreign
    assert foreign.hook == "post-commit" and "left" in foreign.detail
    assert (hd / "post-commit").read_text() == "#!/bin/sh\necho someone else\n"
    assert (hd / "post-commit.pre-gitlora").read_text() == "#!/bin/sh\necho original\n"
    with pytest.raises(HookConflictError, match="pre-gitlora"):
        install(repo)
    assert not (hd / "post-merge").exists()  # the conflict was found before anything was written


def test_core_hooks_path_refused_then_overridden(tmp_path):
    repo = make_repo(tmp_path)
    git(repo, "config", "core.hooksPath", ".githooks")
    with pytest.raises(HooksPathSetError) as info:
        install(repo)
    message = str(info.value)
    assert "\n" not in message and "core.hooksPath" in message and "allow_hooks_path" in message
    assert not (repo / ".githooks").exists()
    assert not (repo / ".git" / "hooks" / "post-commit").exists()

    result = install(repo, allow_hooks_path=True)
    assert result.hooks_dir == repo / ".githooks" and result.hooks_path_override
    oid = commit(repo, "a.rs")
    git(repo, "commit", "-q", "--amend", "-m", "amended")
    new = head(repo)
    assert summary(repo) == [("post-commit", oid, None, None), ("post-commit", new, None, None),
                             ("post-rewrite", new, oid, "amend")]
    uninstall(repo)
    assert list((repo / ".githooks").iterdir()) == []


def test_shared_global_hooks_path_spools_only_the_installed_repository(tmp_path):
    shared = tmp_path / "global-hooks"
    a = make_repo(tmp_path, "a")
    b = make_repo(tmp_path, "b")
    git(a, "config", "--global", "core.hooksPath", str(shared))
    with pytest.raises(HooksPathSetError):
        install(b)
    result = install(a, allow_hooks_path=True)
    assert result.hooks_dir == shared
    oid_a = commit(a, "a.rs")
    commit(b, "b.rs")  # runs the same hooks: must not land in a's spool
    (b / "c.rs").write_text("x\n")
    git(b, "add", "c.rs")
    git(b, "commit", "-q", "--amend", "-m", "amend in b")
    assert summary(a) == [("post-commit", oid_a, None, None)]
    assert not spool_path(b).exists()
    with pytest.raises(HookConflictError, match="another repository"):
        install(b, allow_hooks_path=True)
    assert not install(a, allow_hooks_path=True).changed
    assert {s.state for s in installed_hooks(a).values()} == {"installed"}
    uninstall(a)
    assert list(shared.iterdir()) == []


def _share_hooks_dir(shared: Path, scope: str, *repos: Path) -> None:
    """Point the repositories at one hooks dir: through the global config, or each one's own config."""
    if scope == "global":
        git(repos[0], "config", "--global", "core.hooksPath", str(shared))
    else:
        for repo in repos:
            git(repo, "config", "core.hooksPath", str(shared))


@pytest.mark.parametrize("scope", ["global", "per-repository"])
def test_uninstall_of_another_repository_sharing_the_hooks_dir_keeps_the_owners_hooks(tmp_path, scope):
    shared = tmp_path / "shared-hooks"
    a = make_repo(tmp_path, "a")
    b = make_repo(tmp_path, "b")
    _share_hooks_dir(shared, scope, a, b)
    shared.mkdir()
    write_hook(shared / "post-commit", 'echo user >> "$(git rev-parse --git-dir)/user-ran"\n')
    install(a, allow_hooks_path=True)
    with pytest.raises(HookConflictError, match="another repository"):
        install(b, allow_hooks_path=True)
    before = snapshot(shared)
    assert {s.state for s in installed_hooks(b).values()} == {"other-repo"}

    result = uninstall(b)  # b never installed: a's hooks are not b's to remove (the old code deleted them)
    assert {a.action for a in result.actions} == {"other-repo"} and not result.changed
    assert all(str(a / ".git") in action.detail for action in result.other_repo)
    assert snapshot(shared) == before
    oid = commit(a, "a.rs")
    assert summary(a) == [("post-commit", oid, None, None)]  # a is still served
    assert (a / ".git" / "user-ran").read_text() == "user\n"  # and the user's chained hook still runs

    assert {x.action for x in uninstall(a).actions} == {"restored", "removed"}  # the owner can
    assert sorted(p.name for p in shared.iterdir()) == ["post-commit"]


def test_hooks_of_a_deleted_repository_can_be_taken_over(tmp_path):
    shared = tmp_path / "shared-hooks"
    a = make_repo(tmp_path, "a")
    b = make_repo(tmp_path, "b")
    _share_hooks_dir(shared, "global", a, b)
    install(a, allow_hooks_path=True)
    shutil.rmtree(a)  # its recorded owner is gone: nobody is left to uninstall them
    assert {s.state for s in installed_hooks(b).values()} == {"stale"}
    result = install(b, allow_hooks_path=True)
    assert {x.action for x in result.actions} == {"updated"}
    oid = commit(b, "b.rs")
    assert summary(b) == [("post-commit", oid, None, None)]
    assert {x.action for x in uninstall(b).actions} == {"removed"}
    assert list(shared.iterdir()) == []


def test_hooks_in_another_repositorys_own_hooks_dir_are_not_ours(tmp_path):
    # b points core.hooksPath at a's .git/hooks, where a installed without core.hooksPath (no repo baked in)
    a = make_repo(tmp_path, "a")
    b = make_repo(tmp_path, "b")
    install(a)
    git(b, "config", "core.hooksPath", str(hooks_dir(a)))
    before = snapshot(hooks_dir(a))
    assert {x.action for x in uninstall(b).actions} == {"other-repo"}
    assert snapshot(hooks_dir(a)) == before
    with pytest.raises(HookConflictError, match=re.escape(str(a / ".git"))):
        install(b, allow_hooks_path=True)


def test_cli_uninstall_of_a_non_owner_says_what_it_did(tmp_path):
    shared = tmp_path / "shared-hooks"
    a = make_repo(tmp_path, "a")
    b = make_repo(tmp_path, "b")
    _share_hooks_dir(shared, "global", a, b)

    def gitlora(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "gitlora.daemon", *args], capture_output=True, text=True,
                              timeout=120)

    done = gitlora("install", "--allow-hooks-path", "--no-backfill", str(a))
    assert done.returncode == 0, done.stderr
    refused = gitlora("install", "--allow-hooks-path", "--no-backfill", str(b))
    assert refused.returncode == 2 and "another repository" in refused.stderr
    before = snapshot(shared)
    done = gitlora("uninstall", str(b))
    assert done.returncode == 0, done.stderr
    assert snapshot(shared) == before
    assert "other-repo" in done.stdout and "left it" in done.stdout
    assert "unregistered" not in done.stdout and "b was not registered" in done.stdout
    from gitlora.daemon import repos

    assert repos.registered() == [str(a / ".git")]
    done = gitlora("uninstall", str(a))
    assert done.returncode == 0 and "unregistered a" in done.stdout and list(shared.iterdir()) == []
    assert repos.registered() == []


@pytest.mark.parametrize("breakage", ["spool-is-a-directory", "state-dir-is-a-file"])
def test_unwritable_spool_does_not_break_git_commit(tmp_path, breakage):
    repo = make_repo(tmp_path)
    hd = hooks_dir(repo)
    write_hook(hd / "post-commit", 'echo "chained still runs"\n')
    result = install(repo)
    if breakage == "spool-is-a-directory":
        result.spool.mkdir(parents=True)  # `>> spool` fails (also as root)
    else:
        result.spool.parent.parent.mkdir(parents=True)
        result.spool.parent.write_text("not a dir")  # mkdir -p fails
    (repo / "a.rs").write_text("x\n")
    git(repo, "add", "a.rs")
    proc = subprocess.run(["git", "commit", "-m", "a"], cwd=repo, capture_output=True, text=True)
    assert proc.returncode == 0
    assert "chained still runs" in proc.stderr
    assert "spool" not in proc.stderr and "gitlora" not in proc.stderr  # our errors are swallowed
    # directly: status is the chained hook's (0), and nothing of ours on stderr
    direct = subprocess.run([str(hd / "post-commit")], cwd=repo, capture_output=True, text=True)
    assert (direct.returncode, direct.stderr) == (0, "")
    amend = subprocess.run(["git", "commit", "--amend", "-m", "b"], cwd=repo, capture_output=True, text=True)
    assert amend.returncode == 0 and amend.stderr.count("\n") <= 1


# ----------------------------------------------------------------------------------------------- spool parser

OID_A, OID_B = "a" * 40, "b" * 40


@pytest.mark.parametrize("line,expected", [
    (f"post-commit\t{OID_A}\t1700000000\t\t\n", SpoolEntry("post-commit", OID_A, 1700000000)),
    (f"post-commit\t{OID_A}\t1700000000", SpoolEntry("post-commit", OID_A, 1700000000)),  # old 3-field form
    (f"post-rewrite\t{OID_B}\t5\t{OID_A}\tamend\r\n", SpoolEntry("post-rewrite", OID_B, 5, OID_A, "amend")),
    (f"post-rewrite\t{OID_B}\t5\t\trebase\n", SpoolEntry("post-rewrite", OID_B, 5, None, "rebase")),
    (f"post-merge\t{OID_A}\t5\t\tsquash\tfuture\tfields\n", SpoolEntry("post-merge", OID_A, 5, None, "squash")),
    (f"post-applypatch\t{'c' * 64}\t5\t\t\n", SpoolEntry("post-applypatch", "c" * 64, 5)),  # sha256 repo
    (f"post-commit\t{OID_A.upper()}\t5\t\t\n", SpoolEntry("post-commit", OID_A, 5)),
    ("", None),
    ("\n", None),
    ("garbage", None),
    (f"pre-commit\t{OID_A}\t5\t\t\n", None),  # not one of ours
    (f"post-commit\t{OID_A[:20]}", None),  # torn line
    (f"post-commit\t{OID_A}\t", SpoolEntry("post-commit", OID_A, None)),  # an empty time is allowed
    (f"post-commit\t{OID_A}\t\t\t\n", SpoolEntry("post-commit", OID_A, None)),  # the hooks' no-process fast path
    (f"post-commit\t{OID_A}\tsoon\t\t\n", None),
    (f"post-commit\t{OID_A}\t-5\t\t\n", None),
    (f"post-commit\t{OID_A}\t５\t\t\n", None),  # non-ASCII digit
    (f"post-rewrite\t{OID_B}\t5\tnot-an-oid\tamend\n", None),
    (f"post-commit\t{OID_A}\t5\t\t$(rm -rf)\n", None),
    (f"post-commit {OID_A} 5", None),
])
def test_parse_spool_line(line, expected):
    assert parse_spool_line(line) == expected


def test_parse_spool_line_never_raises_on_non_str():
    assert parse_spool_line(None) is None  # type: ignore[arg-type]
    assert parse_spool_line(b"post-commit") is None  # type: ignore[arg-type]


def test_spool_entry_round_trips_through_to_line():
    for entry in (SpoolEntry("post-commit", OID_A, 1), SpoolEntry("post-rewrite", OID_B, 2, OID_A, "rebase")):
        assert parse_spool_line(entry.to_line()) == entry
    assert SpoolEntry("post-rewrite", OID_B, 2, OID_A, "rebase").rewrite_type == "rebase"
    assert SpoolEntry("post-merge", OID_B, 2, None, "squash").rewrite_type is None


def test_parse_spool_chunk_leaves_the_torn_tail():
    good = SpoolEntry("post-commit", OID_A, 1).to_line().encode()
    data = good + b"junk\n\xff\xfe\n" + good + b"post-commit\tabc"
    parsed, consumed = parse_spool_chunk(data)
    assert parsed == [SpoolEntry("post-commit", OID_A, 1)] * 2
    assert data[consumed:] == b"post-commit\tabc"
    assert parse_spool_chunk(b"") == ([], 0)
    assert parse_spool_chunk(b"no newline yet") == ([], 0)


# ----------------------------------------------------------------------------------------------- pre-commit

def _pre_commit_exe() -> str | None:
    found = shutil.which("pre-commit")
    if found:
        return found
    candidate = Path(sys.executable).parent / "pre-commit"
    return str(candidate) if candidate.exists() else None


PRE_COMMIT = _pre_commit_exe()
needs_pre_commit = pytest.mark.skipif(PRE_COMMIT is None, reason="the `pre-commit` executable is not installed")


def _pre_commit(repo: Path, *args: str) -> None:
    assert PRE_COMMIT is not None
    subprocess.run([PRE_COMMIT, *args], cwd=repo, check=True, capture_output=True, env=git_env())


def _pre_commit_repo(tmp_path: Path) -> Path:
    """A repo whose committed .pre-commit-config.yaml has one local post-commit hook (nothing downloaded)."""
    repo = make_repo(tmp_path, initial=False)
    write_hook(tmp_path / "mark.sh", 'echo pre-commit-ran >> "$(git rev-parse --git-dir)/pre-commit-ran"\n')
    (repo / ".pre-commit-config.yaml").write_text(
        "repos:\n"
        "- repo: local\n"
        "  hooks:\n"
        "  - id: mark\n"
        "    name: mark\n"
        f"    entry: {tmp_path / 'mark.sh'}\n"
        "    language: system\n"
        "    stages: [post-commit]\n"
        "    always_run: true\n"
        "    pass_filenames: false\n"
    )
    git(repo, "add", ".pre-commit-config.yaml")
    git(repo, "commit", "-q", "-m", "pre-commit config")
    return repo


def _ran(repo: Path, name: str) -> int:
    path = repo / ".git" / name
    return len(path.read_text().splitlines()) if path.exists() else 0


@needs_pre_commit
@pytest.mark.parametrize("with_user_hook", [False, True])
@pytest.mark.parametrize("uninstall_order", ["gitlora-first", "pre-commit-first"])
def test_pre_commit_installed_after_gitlora(tmp_path, with_user_hook, uninstall_order):
    repo = _pre_commit_repo(tmp_path)
    hd = hooks_dir(repo)
    if with_user_hook:
        write_hook(hd / "post-commit", 'echo user >> "$(git rev-parse --git-dir)/user-ran"\n')
    before = snapshot(hd)
    install(repo)
    _pre_commit(repo, "install", "-t", "post-commit")  # moves our hook to post-commit.legacy
    assert MARKER in (hd / "post-commit.legacy").read_bytes()
    assert installed_hooks(repo)["post-commit"].state == "nested"
    oid = commit(repo, "a.rs")
    assert summary(repo) == [("post-commit", oid, None, None)]  # pre-commit still calls us
    assert _ran(repo, "pre-commit-ran") == 1
    assert _ran(repo, "user-ran") == (1 if with_user_hook else 0)
    assert not install(repo).changed
    _pre_commit(repo, "install", "-t", "post-commit")  # re-running pre-commit's install is harmless
    commit(repo, "b.rs")
    assert (_ran(repo, "pre-commit-ran"), len(entries(repo))) == (2, 2)

    if uninstall_order == "gitlora-first":
        uninstall(repo)
        commit(repo, "c.rs")  # pre-commit (and the user's hook, now its .legacy) keep working
        assert (_ran(repo, "pre-commit-ran"), len(entries(repo))) == (3, 2)
        assert _ran(repo, "user-ran") == (3 if with_user_hook else 0)
        _pre_commit(repo, "uninstall", "-t", "post-commit")
    else:
        _pre_commit(repo, "uninstall", "-t", "post-commit")  # puts our hook back at post-commit
        assert installed_hooks(repo)["post-commit"].state == "installed"
        commit(repo, "c.rs")
        assert (_ran(repo, "pre-commit-ran"), len(entries(repo))) == (2, 3)
        uninstall(repo)
    assert _strip_mtimes(snapshot(hd)) == _strip_mtimes(before)


def _strip_mtimes(snap: dict[str, tuple]) -> dict[str, tuple]:
    return {k: v[:3] if v[0] == "file" else v for k, v in snap.items()}


@needs_pre_commit
@pytest.mark.parametrize("with_user_hook", [False, True])
@pytest.mark.parametrize("uninstall_order", ["gitlora-first", "pre-commit-first"])
def test_gitlora_installed_after_pre_commit(tmp_path, with_user_hook, uninstall_order):
    repo = _pre_commit_repo(tmp_path)
    hd = hooks_dir(repo)
    if with_user_hook:
        write_hook(hd / "post-commit", 'echo user >> "$(git rev-parse --git-dir)/user-ran"\n')
    original = snapshot(hd)
    _pre_commit(repo, "install", "-t", "post-commit")
    with_pre_commit = snapshot(hd)
    result = install(repo)
    action = {a.hook: a for a in result.actions}["post-commit"]
    assert action.action == "nested" and action.path == hd / "post-commit.legacy"
    assert b"pre-commit" in (hd / "post-commit").read_bytes()  # pre-commit's script left in place
    oid = commit(repo, "a.rs")
    assert summary(repo) == [("post-commit", oid, None, None)]
    assert _ran(repo, "pre-commit-ran") == 1  # its hook still runs
    assert _ran(repo, "user-ran") == (1 if with_user_hook else 0)
    _pre_commit(repo, "install", "-t", "post-commit")
    assert not install(repo).changed

    if uninstall_order == "gitlora-first":
        uninstall(repo)
        assert _strip_mtimes(snapshot(hd)) == _strip_mtimes(with_pre_commit)
        _pre_commit(repo, "uninstall", "-t", "post-commit")
    else:
        _pre_commit(repo, "uninstall", "-t", "post-commit")
        oid = commit(repo, "b.rs")
        assert summary(repo)[-1] == ("post-commit", oid, None, None)
        assert _ran(repo, "pre-commit-ran") == 1
        assert _ran(repo, "user-ran") == (2 if with_user_hook else 0)
        uninstall(repo)
    assert _strip_mtimes(snapshot(hd)) == _strip_mtimes(original)
