"""The user's TOML config: a validated schema with defaults, and one-line errors that name the key."""
from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import paths


class ConfigError(Exception):
    """A config file that cannot be used; the message is one line naming the file and key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class IngestConfig(_Section):
    max_file_bytes: int = Field(2_000_000, ge=1_000, description="larger .rs blobs are skipped and recorded")
    batch_commits: int = Field(64, ge=1, le=10_000, description="commits per LMDB transaction in backfill")
    workers: int = Field(0, ge=0, le=64, description="parser processes for backfill; 0 = one per core")
    exclude: list[str] = Field(
        default_factory=lambda: ["vendor/*", "*/vendor/*", "third_party/*", "target/*", "target_tmp/*"],
        description="fnmatch globs of .rs paths never turned into examples (vendored and generated code)",
    )
    include_remotes: bool = Field(False, description="also ingest commits only reachable from refs/remotes")


class DaemonConfig(_Section):
    debounce_ms: int = Field(75, ge=0, le=60_000, description="collect a burst of ref updates into one pass")
    rescan_interval_s: int = Field(300, ge=5)
    socket_timeout_s: float = Field(5.0, gt=0)


class ShardConfig(_Section):
    shard_size: int = Field(256, ge=1, description="examples per shard")
    quiet_flush_s: int = Field(120, ge=0, description="flush a partial shard after this long without commits")
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="newest share of commits held out for evaluation")


class TrainConfig(_Section):
    base_model: str = Field("bigcode/starcoder2-3b", min_length=1)
    min_new_shards: int = Field(4, ge=1)
    cooldown_s: int = Field(3600, ge=0)
    replay_share: float = Field(0.3, ge=0, lt=1)
    promote_margin: float = Field(0.005, ge=0, description="relative eval-loss improvement needed to promote")
    learning_rate: float = Field(2e-4, gt=0)
    warmup_steps: int = Field(10, ge=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(0, ge=0, description="0 = derived from epochs")
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    fim_share: float = Field(0.2, ge=0, le=1)
    context_length: int = Field(0, ge=0, description="0 = from the hardware plan")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    check_interval_s: int = Field(60, ge=1, description="how often the scheduler looks for enough new data")
    max_retry_backoff_s: int = Field(3600, ge=1)
    require_free_gpu_mb: int = Field(0, ge=0, description="0 = what the plan needs")


class Config(_Section):
    ingest: IngestConfig = IngestConfig()
    daemon: DaemonConfig = DaemonConfig()
    shards: ShardConfig = ShardConfig()
    train: TrainConfig = TrainConfig()


def _describe(error: ValidationError, source: str) -> str:
    first = error.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    return f"{source}: {key}: {msg} (got {first.get('input')!r})"


def from_dict(data: dict[str, Any], source: str = "config") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None


def load(path: Path | None = None) -> Config:
    """The effective config: defaults overlaid with the user's file, if any."""
    path = path or paths.config_path()
    if not path.exists():
        return Config()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return from_dict(data, str(path))


def to_toml(config: Config) -> str:
    """Render the effective config as TOML (tomllib only reads, and the shape is two flat levels)."""
    lines: list[str] = []
    for section, values in config.model_dump().items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if isinstance(value, bool):
                rendered = "true" if value else "false"
            elif isinstance(value, list):
                rendered = "[" + ", ".join('"' + str(v).replace('"', '\\"') + '"' for v in value) + "]"
            elif isinstance(value, (int, float)):
                rendered = repr(value)
            else:
                rendered = '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
            lines.append(f"{key} = {rendered}")
        lines.append("")
    return "\n".join(lines)
