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


def outdated_next_step(git_dir: str) -> str:
    return (f"the store was written by an older gitlora; new commits wait (in git and the spool) until "
            f"`gitlora upgrade {git_dir}` re-derives it")


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
    export = repo.get("export")
    if export:
        lines.append("  " + render_export(export))
    for error in list(repo.get("errors", []))[-3:]:
        lines.append(f"  error     {render_error(error)}")
    return lines


def render_export(export: dict[str, Any]) -> str:
    """'export    v0003 -> ~/models/app-current.gguf 2m ago, ollama: created gitlora-app' or why it failed."""
    running, last = export.get("running"), export.get("last")
    if running:
        return f"export    exporting {running.get('version')} (started {_ago(running.get('started_at'))})"
    if not last:
        return f"export    nothing exported yet (to {export.get('dir')})"
    when = _ago(last.get("finished_at"))
    target = (last.get("settings") or {}).get("file") or last.get("file") or "?"
    if not last.get("ok"):
        return f"export    {last.get('version')} FAILED {when}: {last.get('reason')} (the previous file stays)"
    extra = [f"Modelfile {last['modelfile']}"] if last.get("modelfile") else []
    if last.get("ollama"):
        extra.append(f"ollama: {last['ollama']}")
    return f"export    {last.get('version')} -> {target} {when}" + (f"; {'; '.join(extra)}" if extra else "")


def adapter_vs_base(metrics: dict[str, Any] | None) -> dict[str, Any] | None:
    """The current adapter against the base model on its round's window, from that version's metrics.json
    (`evaluation` and `gate`, written by the round that made it): no model runs at status time. None when the
    version predates these records or its round had no window."""
    if not isinstance(metrics, dict):
        return None
    evaluation = metrics.get("evaluation") or {}
    window = ((evaluation.get("candidate") or {}).get("window")) or {}
    base = ((evaluation.get("base") or {}).get("window")) or {}
    vs_base = (metrics.get("gate") or {}).get("vs_base") or {}
    rel = vs_base.get("changed_loss_rel")
    if not isinstance(rel, (int, float)):
        ours, theirs = window.get("changed_loss"), base.get("changed_loss")
        if not (isinstance(ours, (int, float)) and isinstance(theirs, (int, float)) and theirs > 0):
            return None
        rel = ours / theirs - 1.0
    low, high = vs_base.get("ci95_low"), vs_base.get("ci95_high")
    return {"version": metrics.get("version"), "changed_loss_rel": rel,
            "ci95_low": low if isinstance(low, (int, float)) else None,
            "ci95_high": high if isinstance(high, (int, float)) else None,
            "commits": window.get("commits"), "examples": window.get("examples")}


def vs_base_line(summary: dict[str, Any]) -> str:
    """'changed-token loss −18 % vs base (±4 %, 95 % interval −22 % to −14 %, window of 31 commits)'."""
    def pct(x: float) -> str:
        return f"{x * 100:+.0f} %".replace("-", "−")

    text = f"changed-token loss {pct(summary['changed_loss_rel'])} vs base"
    notes = []
    low, high = summary.get("ci95_low"), summary.get("ci95_high")
    if low is not None and high is not None:
        notes.append(f"±{abs(high - low) * 50:.0f} %, 95 % interval {pct(low)} to {pct(high)}")
    if summary.get("commits"):
        notes.append(f"window of {summary['commits']} commits")
    return text + (f" ({', '.join(notes)})" if notes else "")


def next_round_line(plan: dict[str, Any]) -> str:
    """What the next round will use (the planner's summary): new data, replay, and what is held out."""
    retried = plan.get("retried_commits") or 0
    return (f"next round {plan.get('new_commits', 0)} new commits ({plan.get('new_examples', 0)} examples"
            + (f", {retried} commits retried" if retried else "") + f"), {plan.get('replay_commits', 0)} to replay; "
            f"held out: window {plan.get('window_commits', 0)} commits ({plan.get('window_examples', 0)} examples), "
            f"older slice {plan.get('older_commits', 0)} commits")


def render_training(training: dict[str, Any]) -> list[str]:
    lines = []
    current = training.get("current_adapter")
    vs_base = training.get("vs_base")
    lines.append(f"adapter   {current or 'none yet'}" + (f"   {vs_base_line(vs_base)}" if vs_base else ""))
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
    upcoming = training.get("next_round")
    if upcoming:
        lines.append(f"data      {next_round_line(upcoming)}")
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
