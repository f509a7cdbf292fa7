"""`gitlora status` as a person reads it (pure: a status reply -> text)."""
from __future__ import annotations

import time
from typing import Any


# -- the parts of a repository's status that the daemon and the offline view both build ---------------------
def error_entry(kind: str, message: str, now: float | None = None) -> dict[str, Any]:
    """An error as `status` shows it: what failed, the one-line message, and when."""
    now = time.time() if now is None else now
    return {"kind": kind, "error": message, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(now)),
            "time": now}


def missing_next_step(git_dir: str) -> str:
    return (f"repository not found at {git_dir}: `gitlora install NEWPATH` if it moved, "
            f"`gitlora uninstall --forget {git_dir}` if it was deleted")


def damaged_next_step(reason: str, git_dir: str) -> str:
    return f"store damaged: {reason}; run `gitlora repair {git_dir}`"


def _ago(ts: float | None) -> str:
    if not ts:
        return "-"
    seconds = max(0, time.time() - ts)
    if seconds < 90:
        return f"{seconds:.0f}s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def render_error(error: dict[str, Any] | str) -> str:
    if isinstance(error, str):
        return error
    return f"{error.get('at', '?')} {error.get('error', '')}"


def render_repo(repo: dict[str, Any]) -> list[str]:
    state = repo.get("state", "ok")
    lines = [f"{repo['name']}  ({repo['git_dir']})" + ("" if state == "ok" else f"  [{state}]")]
    if repo.get("next_step"):
        lines.append(f"  next      {repo['next_step']}")
    if "commits_ingested" in repo:
        lines.append(f"  commits   {repo['commits_ingested']} ingested, {repo['commits_skipped']} skipped"
                     f"   examples {repo['examples']}")
    last = repo.get("last_commit")
    if last:
        latency = last.get("latency_ms")
        how = (f"commit→stored {latency:.0f} ms" if latency is not None
               else f"the last of {last.get('batch', '?')} commits backfilled")
        lines.append(f"  last      {last['commit'][:12]} ({last.get('examples', 0)} examples) stored "
                     f"{_ago(last.get('stored_at'))}, {how}")
    activity = "paused" if repo.get("paused") else ("ingesting" if repo.get("ingesting") else "idle")
    if "queue_depth" in repo:
        lines.append(f"  ingest    {activity}, queue {repo['queue_depth']}   watcher {repo.get('watcher', '-')}")
    if "shards" in repo:
        lines.append(f"  shards    {repo['shards']} written, {repo.get('unflushed_examples', 0)} examples waiting")
    training = repo.get("training")
    if training:
        lines.extend("  " + line for line in render_training(training))
    for error in list(repo.get("errors", []))[-3:]:
        lines.append(f"  error     {render_error(error)}")
    return lines


def render_training(training: dict[str, Any]) -> list[str]:
    lines = []
    current = training.get("current_adapter")
    lines.append(f"adapter   {current or 'none yet'}")
    active = training.get("round")
    if active:
        step, total = active.get("step", 0), active.get("total", 0)
        loss = active.get("loss")
        eta = active.get("eta_s")
        lines.append(f"round     {active.get('state', 'running')} step {step}/{total}"
                     + (f", loss {loss:.4f}" if isinstance(loss, (int, float)) else "")
                     + (f", ETA {eta:.0f}s" if isinstance(eta, (int, float)) else ""))
    last = training.get("last_round")
    if last:
        message = (last.get("message") or "").strip().splitlines()  # the trainer's error, not a bare reason code
        lines.append(f"prev      round {last.get('round', '?')} {last.get('outcome', '?')}"
                     + (f" ({last['reason']})" if last.get("reason") else "")
                     + f" {_ago(last.get('finished_at'))}"
                     + (f": {message[0][:300]}" if message else ""))
    trigger = training.get("next_trigger")
    if trigger:
        lines.append(f"next      {trigger}")
    return lines


def render(reply: dict[str, Any]) -> str:
    lines = [f"gitlora daemon pid {reply['pid']}, up {reply['uptime_s']:.0f}s, {len(reply['repos'])} repositories"]
    for repo in reply["repos"]:
        lines.append("")
        lines.extend(render_repo(repo))
    if not reply["repos"]:
        lines.append("no repositories registered: run `gitlora install` in one")
    reload_error = (reply.get("config") or {}).get("reload_error")
    if reload_error:
        lines.append("")
        lines.append(f"config reload refused {render_error(reload_error)} (the previous config stays in effect)")
    return "\n".join(lines)
