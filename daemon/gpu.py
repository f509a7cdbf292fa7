"""What the GPUs are and how full, from `nvidia-smi`: the one way gitlora asks. The daemon never imports torch,
and the trainer plans a round before it loads torch, so both ask this tool. Standard library only.

Anything short of a clean answer (no nvidia-smi, a failing or crashing one, a driver that is down, `[N/A]` in a
field) means "no GPU" for that query: callers then fall back to the CPU or defer, never fail.
"""
from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

TIMEOUT_S = 10  # a hung driver must not hold a round check (or the plan) for long


@dataclass(frozen=True)
class GpuInfo:
    name: str
    total_gb: float  # GiB, as nvidia-smi reports MiB / 1024
    used_gb: float
    compute_capability: float


def query(*fields: str) -> list[list[str]]:
    """One row per GPU of `nvidia-smi --query-gpu=FIELDS` (CSV, no header, no units), each with one cell per field;
    rows of another shape are left out, and [] stands for no answer at all."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        done = subprocess.run([exe, f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return []
    if done.returncode != 0:
        return []
    rows = [[cell.strip() for cell in line.split(",")] for line in done.stdout.splitlines()]
    return [row for row in rows if len(row) == len(fields)]


def free_mb() -> int | None:
    """Free memory of the emptiest GPU, in MiB; None where there is no NVIDIA GPU."""
    values = [int(row[0]) for row in query("memory.free") if row[0].isdigit()]
    return max(values) if values else None


def detect_gpu() -> GpuInfo | None:
    """The first GPU that nvidia-smi reports in full, or None."""
    for name, total, used, capability in query("name", "memory.total", "memory.used", "compute_cap"):
        try:
            return GpuInfo(name, float(total) / 1024, float(used) / 1024, float(capability))
        except ValueError:
            continue
    return None
