"""The user's TOML config: a validated schema with defaults, and one-line errors that name the key.

Every number is bounded and finite: a value that validates must also work (an `inf` socket timeout or an
interval of 1e12 s once passed validation and then broke the daemon). Values are taken as TOML typed them
(strict): `true` is not 1, `1.5` is not an integer, `"5"` is not a number. `load` only reads and validates,
so the daemon may call it again at any time (SIGHUP reload) and keep its old config when it raises.
"""
from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path
from typing import Any, Literal

import annotated_types
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.fields import FieldInfo

from . import paths

MINUTE = 60
HOUR = 60 * MINUTE
DAY = 24 * HOUR
WEEK = 7 * DAY


class ConfigError(Exception):
    """A config file that cannot be used; the message is one line naming the file and key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)


class IngestConfig(_Section):
    max_file_bytes: int = Field(2_000_000, ge=1_000, le=100_000_000,
                                description="larger .rs blobs are skipped and recorded")
    batch_commits: int = Field(64, ge=1, le=10_000, description="commits per LMDB transaction in backfill")
    workers: int = Field(0, ge=0, le=64, description="parser processes for backfill; 0 = one per core")
    exclude: list[str] = Field(
        default_factory=lambda: ["vendor/*", "*/vendor/*", "third_party/*", "target/*", "target_tmp/*"],
        description="fnmatch globs of .rs paths never turned into examples (vendored and generated code)",
    )
    include_remotes: bool = Field(False, description="also ingest commits only reachable from refs/remotes")


class DaemonConfig(_Section):
    debounce_ms: int = Field(75, ge=0, le=60_000, description="collect a burst of ref updates into one pass")
    rescan_interval_s: int = Field(300, ge=5, le=DAY)
    socket_timeout_s: float = Field(5.0, gt=0, le=HOUR)


class ShardConfig(_Section):
    shard_size: int = Field(256, ge=1, le=1_000_000, description="examples per shard")
    quiet_flush_s: int = Field(120, ge=0, le=DAY, description="flush a partial shard after this long without commits")
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="newest share of commits held out for evaluation")


class TrainConfig(_Section):
    base_model: str = Field("bigcode/starcoder2-3b", min_length=1)
    min_new_shards: int = Field(4, ge=1, le=10_000_000)
    cooldown_s: int = Field(3600, ge=0, le=WEEK)
    replay_share: float = Field(0.3, ge=0, lt=1)
    promote_margin: float = Field(0.005, ge=0, lt=1, description="relative eval-loss improvement needed to promote")
    learning_rate: float = Field(2e-4, gt=0, le=1)
    warmup_steps: int = Field(10, ge=0, le=10_000_000)
    epochs: float = Field(1.0, gt=0, le=1_000)
    max_steps: int = Field(0, ge=0, le=10_000_000, description="0 = derived from epochs")
    lora_r: int = Field(16, ge=1, le=4_096)
    lora_alpha: int = Field(32, ge=1, le=65_536)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    fim_share: float = Field(0.2, ge=0, le=1)
    context_length: int = Field(0, ge=0, le=1_048_576, description="0 = from the hardware plan")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    check_interval_s: int = Field(60, ge=1, le=DAY, description="how often the scheduler looks for enough new data")
    max_retry_backoff_s: int = Field(3600, ge=1, le=WEEK)
    require_free_gpu_mb: int = Field(0, ge=0, le=100_000_000, description="0 = what the plan needs")
    max_round_s: float = Field(4.0 * HOUR, ge=0, le=WEEK,
                               description="training time one round may take (0 = none): a bigger backlog trains "
                                           "newest first, the rest in later rounds")
    max_round_tokens: int = Field(0, ge=0, le=10**12, description="tokens one round may read (0 = none)")


class Config(_Section):
    ingest: IngestConfig = IngestConfig()
    daemon: DaemonConfig = DaemonConfig()
    shards: ShardConfig = ShardConfig()
    train: TrainConfig = TrainConfig()


def _field(loc: tuple) -> FieldInfo | None:
    """The schema field at an error's location (section, key), if there is one."""
    model: Any = Config
    info = None
    for part in loc:
        fields = getattr(model, "model_fields", None)
        if not isinstance(part, str) or fields is None or part not in fields:
            return None
        info = fields[part]
        model = info.annotation
    return info


def _bound(value: float) -> str:
    return f"{value:_}".replace("_", ",") if isinstance(value, int) else repr(value)


def allowed(info: FieldInfo) -> str | None:
    """What a field accepts, in words: "an integer from 5 to 86,400", "true or false", …"""
    if info.annotation is bool:
        return "true or false"
    if info.annotation not in (int, float):
        return None
    ge = gt = le = lt = None
    for rule in info.metadata:
        if isinstance(rule, annotated_types.Ge):
            ge = rule.ge
        elif isinstance(rule, annotated_types.Gt):
            gt = rule.gt
        elif isinstance(rule, annotated_types.Le):
            le = rule.le
        elif isinstance(rule, annotated_types.Lt):
            lt = rule.lt
    kind = "an integer" if info.annotation is int else "a finite number"
    if ge is not None and le is not None:
        return f"{kind} from {_bound(ge)} to {_bound(le)}"
    low = f"at least {_bound(ge)}" if ge is not None else f"above {_bound(gt)}" if gt is not None else None
    high = f"at most {_bound(le)}" if le is not None else f"below {_bound(lt)}" if lt is not None else None
    return f"{kind} " + " and ".join(part for part in (low, high) if part) if low or high else kind


def _shown(value: Any) -> str:
    """A value as TOML spells it where that differs from Python (`true`, `inf`)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value != value:
        return "nan"
    return repr(value)


def _describe(error: ValidationError, source: str) -> str:
    first = error.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    text = f"{source}: {key}: {msg} (got {_shown(first.get('input'))})"
    info = _field(tuple(first["loc"]))
    rule = allowed(info) if info is not None and first["type"] != "extra_forbidden" else None
    return f"{text}; allowed: {rule}" if rule else text


def from_dict(data: dict[str, Any], source: str = "config") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None


_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a named pipe", stat.S_IFSOCK: "a socket",
          stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device"}


def _read(path: Path) -> bytes | None:
    """The file's bytes; None when there is no file at all; ConfigError for anything else found there."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise ConfigError(f"{path}: is a dangling symlink (to {os.readlink(path)}), not a config file") from None
        return None
    except NotADirectoryError:
        raise ConfigError(f"{path}: cannot be a config file: a parent of it is not a directory") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = _KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
        raise ConfigError(f"{path}: is {kind}, not a config file")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror}") from None


def load(path: Path | None = None) -> Config:
    """The effective config: defaults overlaid with the user's file, if any.

    Safe to call again at any time: it reads the file afresh and changes nothing; ConfigError says why a file
    cannot be used (the caller keeps the config it has).
    """
    path = path or paths.config_path()
    raw = _read(path)
    if raw is None:
        return Config()
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return from_dict(data, str(path))


def changed_keys(old: Config, new: Config) -> list[str]:
    """Dotted keys whose values differ ("daemon.rescan_interval_s"), for a reload's log line."""
    before, after = old.model_dump(), new.model_dump()
    return [f"{section}.{key}" for section, values in after.items()
            for key, value in values.items() if before[section][key] != value]


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
