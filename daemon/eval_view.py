"""`gitlora eval` as a person reads it: an eval result -> a table, or a plot of each metric by version over time.

Pure except `write_plot`, which draws with matplotlib's headless Agg backend (imported only when asked for).
The result's shape is documented in trainer/eval_run.py.
"""
from __future__ import annotations

import math
import time
from typing import Any

# (key, what a person calls it, lower is better?)
METRICS = (("changed_loss", "changed-token loss", True), ("target_loss", "target-token loss", True),
           ("fim_edit_sim", "completion edit similarity", False), ("fim_exact", "completion exact match", False))
SET_TITLES = {"window": "window (newest commits, never trained on)", "older": "older slice (forgetting)"}


def _number(value: Any, metric: str) -> str:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return "-"
    return f"{value:.4f}" if metric.endswith("loss") else f"{value:.3f}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def format_diff(diff: dict[str, Any] | None) -> str:
    """'−17.9 % [−21.0, −14.6]' (relative) or '+0.042 [+0.010, +0.071]' (absolute); '' when unknown."""
    if not diff or not isinstance(diff.get("value"), (int, float)):
        return ""
    low, high = diff.get("ci95_low"), diff.get("ci95_high")
    if diff.get("kind") == "rel":
        def fmt(x: float) -> str:
            return f"{x * 100:+.1f}".replace("-", "−")

        interval = f" [{fmt(low)}, {fmt(high)}]" if isinstance(low, (int, float)) and isinstance(high, (
            int, float)) else ""
        return f"{fmt(diff['value'])} %{interval}"

    def fmt_abs(x: float) -> str:
        return f"{x:+.3f}".replace("-", "−")

    interval = f" [{fmt_abs(low)}, {fmt_abs(high)}]" if isinstance(low, (int, float)) and isinstance(high, (
        int, float)) else ""
    return fmt_abs(diff["value"]) + interval


def model_names(result: dict[str, Any]) -> list[str]:
    return ["base", *[v for v in result.get("versions", []) if v in result.get("models", {})]]


def render_table(result: dict[str, Any]) -> str:
    """One block per example set: a row per metric, a column for the base and one per version (its value, then
    the paired difference against the base with the 95 % interval, bootstrapped over commits)."""
    models = result.get("models", {})
    names = model_names(result)
    lines = [f"base model {result.get('base_model', '?')}"]
    if result.get("window_source"):
        lines.append(f"window from {result['window_source']}")
    for set_name, counts in result.get("sets", {}).items():
        lines.append("")
        base_set = (models.get("base") or {}).get(set_name) or {}
        lines.append(f"{SET_TITLES.get(set_name, set_name)}: {_count(counts.get('commits', 0), 'commit')}, "
                     f"{_count(counts.get('examples', 0), 'example')}, "
                     f"{_count(base_set.get('fim_n', 0), 'completion')} scored")
        if not counts.get("examples"):
            lines.append("  (empty: nothing to measure yet)")
            continue
        header = ["metric"] + [f"{n} *" if (models.get(n) or {}).get("current") else n for n in names]
        rows = [header]
        for key, label, lower in METRICS:
            row = [f"{label} ({'lower' if lower else 'higher'} is better)"]
            for name in names:
                entry = models.get(name) or {}
                cell = _number((entry.get(set_name) or {}).get(key), key)
                diff = format_diff(((entry.get("vs_base") or {}).get(set_name) or {}).get(key))
                row.append(f"{cell} {diff}".rstrip() if name != "base" else cell)
            rows.append(row)
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        for r in rows:
            lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        for name in names:
            bad = ((models.get(name) or {}).get(set_name) or {}).get("nonfinite")
            if bad:
                lines.append(f"  {name}: {bad} examples have a non-finite loss (fp16 overflow or broken weights): "
                             "its losses are unknown")
    lines.append("")
    lines.append("versions: difference vs base [95 % interval, bootstrap over commits; none with fewer than two "
                 "commits]; * = current adapter")
    return "\n".join(lines)


def plot_series(result: dict[str, Any], set_name: str, metric: str) -> dict[str, Any]:
    """The points a plot draws for one metric and set (pure): versions by creation time with the interval of
    their paired difference mapped onto the value axis, and the base's value as a reference line."""
    models = result.get("models", {})
    base = ((models.get("base") or {}).get(set_name) or {}).get(metric)
    points = []
    for name in result.get("versions", []):
        entry = models.get(name) or {}
        value = (entry.get(set_name) or {}).get(metric)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        diff = ((entry.get("vs_base") or {}).get(set_name) or {}).get(metric) or {}
        low, high = value, value
        if isinstance(base, (int, float)) and all(isinstance(diff.get(k), (int, float)) for k in ("ci95_low",
                                                                                                  "ci95_high")):
            if diff.get("kind") == "rel":
                low, high = base * (1 + diff["ci95_low"]), base * (1 + diff["ci95_high"])
            else:
                low, high = base + diff["ci95_low"], base + diff["ci95_high"]
        points.append({"version": name, "time": entry.get("created_at"), "value": value, "low": min(low, value),
                       "high": max(high, value), "current": bool(entry.get("current"))})
    return {"base": base if isinstance(base, (int, float)) and math.isfinite(base) else None, "points": points}


def write_plot(result: dict[str, Any], path: str) -> None:
    """A PNG with one panel per metric: each set's versions over time (with 95 % intervals) against the base."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display, no GUI toolkit
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt
    from datetime import datetime

    sets = [s for s, counts in result.get("sets", {}).items() if counts.get("examples")]
    styles = {"window": ("tab:blue", "o"), "older": ("tab:orange", "s")}
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), squeeze=False)
    for ax, (metric, label, lower) in zip(axes.flat, METRICS):
        for set_name in sets:
            color, marker = styles.get(set_name, ("tab:gray", "^"))
            series = plot_series(result, set_name, metric)
            if series["base"] is not None:
                ax.axhline(series["base"], color=color, linestyle="--", linewidth=1, label=f"base, {set_name}")
            pts = [p for p in series["points"] if p["time"]]
            if not pts:
                continue
            xs = [datetime.fromtimestamp(p["time"]) for p in pts]
            ys = [p["value"] for p in pts]
            err = [[y - p["low"] for y, p in zip(ys, pts)], [p["high"] - y for y, p in zip(ys, pts)]]
            ax.errorbar(xs, ys, yerr=err, color=color, marker=marker, capsize=3, linewidth=1.2,
                        label=f"adapters, {set_name}")
            if set_name == sets[0]:  # name the versions once per panel: the sets share their x positions
                for x, p in zip(xs, pts):
                    ax.annotate(p["version"] + (" *" if p["current"] else ""), (x, p["value"]), fontsize=7,
                                textcoords="offset points", xytext=(4, 4))
        ax.set_title(f"{label} ({'lower' if lower else 'higher'} is better)", fontsize=10)
        locator = mdates.AutoDateLocator(maxticks=6)
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(result.get("finished_at") or time.time()))
    base_model = str(result.get("base_model", "base"))
    base_name = base_model.rstrip("/").rsplit("/", 1)[-1] if base_model.startswith("/") else base_model
    fig.suptitle(f"gitlora eval {result.get('repo', '')}: adapters vs {base_name} "
                 f"({when}; bars: 95 % interval of the paired difference)", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 0.95))
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)
