"""The user's TOML config: a validated schema with defaults, and one-line errors that name the key.

Every number is bounded and finite: a value that validates must also work (an `inf` socket timeout or an
interval of 1e12 s once passed validation and then broke the daemon). Values are taken as TOML typed them
(strict): `true` is not 1, `1.5` is not an integer, `"5"` is not a number. `load` only reads and validates,
so the daemon may call it again at any time (SIGHUP reload) and keep its old config when it raises.
"""
from __future__ import annotations

import os
import re
import stat
import tomllib
from pathlib import Path
import types
from typing import Annotated, Any, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo

from gitlora.trainer.spec import RoundSettings

from . import paths
from .examples import CONTEXT_ABOVE_BYTES, CONTEXT_BELOW_BYTES, MIN_CONTEXT_BYTES
from .symbols import CROSS_FILE_BYTES

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
    context_above_bytes: int = Field(CONTEXT_ABOVE_BYTES, ge=MIN_CONTEXT_BYTES, le=1_000_000,
                                     description="bytes of the new file above each changed item kept with its "
                                     "example (the trainer's fill-in-the-middle prefix)")
    context_below_bytes: int = Field(CONTEXT_BELOW_BYTES, ge=MIN_CONTEXT_BYTES, le=1_000_000,
                                     description="bytes of the new file below each changed item kept with its "
                                     "example (the fill-in-the-middle suffix)")
    cross_file_bytes: int = Field(CROSS_FILE_BYTES, ge=0, le=1_000_000,
                                  description="bytes of definitions from other files (signatures, type definitions) "
                                  "kept with each example as its cross-file context; 0 = off")
    # Hygiene (daemon/hygiene.py) and deduplication (daemon/dedup.py, applied by the store): DESIGN.md, *Hygiene
    # and deduplication*. Like every [ingest] key, they apply to commits not ingested yet.
    generated_markers: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(
        default_factory=lambda: ["@generated", "do not edit", "automatically generated"], max_length=100,
        description="a .rs file whose first generated_header_lines lines hold one of these (any case) is skipped "
        "as generated")
    generated_header_lines: int = Field(5, ge=1, le=1_000, description="how many first lines hold the markers")
    data_only_share: float = Field(0.6, gt=0, le=1.0, description="a file of at least data_only_min_bytes whose "
                                   "non-blank bytes are more than this share literals is skipped as data-only")
    data_only_min_bytes: int = Field(2048, ge=0, le=100_000_000, description="smaller files are never data-only")
    skip_vendored_crates: bool = Field(True, description="skip .rs files below a directory holding both "
                                       "Cargo.toml and .cargo-checksum.json (a `cargo vendor` crate)")
    min_item_bytes: int = Field(50, ge=0, le=100_000, description="items whose text is shorter are skipped "
                                "(counted in their commit's record); 0 = keep all")
    test_weight: float = Field(0.5, ge=0, le=1.0, description="sampling weight recorded on test examples "
                               "(#[test] fns, #[cfg(test)] modules, files under tests/)")
    bot_authors: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(
        default_factory=lambda: ["[bot]", "dependabot", "renovate", "github-actions"], max_length=100,
        description="an author ('Name <email>') holding one of these (any case): the message is left out of prompts")
    template_messages: list[Annotated[str, Field(min_length=1, max_length=500)]] = Field(
        default_factory=lambda: [r"merge (branch|branches|remote-tracking branch|tag|commit|pull request) .*",
                                 r"wip[.!]*", r"codex cli local changes"], max_length=100,
        json_schema_extra={"allowed": "a list of regular expressions"},
        description="regular expressions matched (any case) against the whole stripped message: a match is left "
        "out of prompts")
    dedup: bool = Field(True, description="screen examples as they are stored: exact duplicates, near-duplicates "
                        "beyond near_duplicate_cap and repeated messages left out; false = every example stored, "
                        "a commit whose examples were all stored before only marked")
    repeated_message_limit: int = Field(5, ge=0, le=1_000_000, description="a message stored this many times "
                                        "already is left out of the prompts of later commits; 0 = off")
    near_duplicate_cap: int = Field(5, ge=0, le=1_000_000, description="at most this many examples per cluster of "
                                    "near-duplicate targets are stored; 0 = no cap")
    near_duplicate_threshold: float = Field(0.9, ge=0.7, le=1.0, description="estimated Jaccard similarity of "
                                            "targets' token shingles from which they are near-duplicates")

    @field_validator("template_messages")
    @classmethod
    def _compiles(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a regular expression: {exc}") from None
        return patterns


class DaemonConfig(_Section):
    debounce_ms: int = Field(75, ge=0, le=60_000, description="collect a burst of ref updates into one pass")
    rescan_interval_s: int = Field(300, ge=5, le=DAY)
    socket_timeout_s: float = Field(5.0, gt=0, le=HOUR)


class ShardConfig(_Section):
    shard_size: int = Field(256, ge=1, le=1_000_000, description="examples per shard")
    quiet_flush_s: int = Field(120, ge=0, le=DAY, description="flush a partial shard after this long without commits")


class TrainConfig(RoundSettings):
    """The round settings (trainer/spec.py, their one definition) plus the daemon's own: which model, and when
    a round is due."""

    model_config = _Section.model_config
    base_model: str = Field("bigcode/starcoder2-3b", min_length=1)
    min_new_examples: int = Field(1024, ge=1, le=1_000_000_000,
                                  description="a round is due when this many new examples (outside the held-out "
                                  "window, never tried) exist")
    min_new_shards: int | None = Field(None, ge=1, le=10_000_000,
                                       description="deprecated: min_new_examples = this x shards.shard_size")
    cooldown_s: int = Field(3600, ge=0, le=WEEK)
    max_tries: int = Field(3, ge=1, le=1_000, description="rejected rounds a commit is tried in before it joins "
                           "the replay pool untried")
    check_interval_s: int = Field(60, ge=1, le=DAY, description="how often the scheduler looks for enough new data")
    max_retry_backoff_s: int = Field(3600, ge=1, le=WEEK)
    require_free_gpu_mb: int = Field(0, ge=0, le=100_000_000, description="0 = what the plan needs")

    def round_settings(self) -> RoundSettings:
        """The settings a round's spec carries (the daemon's scheduling keys left out)."""
        return RoundSettings(**{k: getattr(self, k) for k in RoundSettings.model_fields})


class ExportConfig(_Section):
    """Where the daemon keeps the current adapter for llama.cpp and Ollama (daemon/adapter_export.py)."""

    dir: str = Field("", max_length=4096, pattern=r"^$|^[~/]",
                     json_schema_extra={"allowed": "an absolute path or one starting with ~; empty = off"},
                     description="keep <repo>-current.gguf (+ <repo>.Modelfile) here after every promotion and "
                     "rollback: an absolute or ~ path; empty = off")
    ollama_from: str = Field("", max_length=4096, pattern=r"^[^\n]*$", json_schema_extra={"allowed": "one line"},
                             description="the Modelfile's FROM: an Ollama model name or the base model's GGUF path; "
                             "empty = no Modelfile")
    ollama_model: str = Field("", max_length=200, pattern=r"^[A-Za-z0-9._:/{}-]*$",
                              json_schema_extra={"allowed": "an Ollama model name (letters, digits, . _ : / -, "
                                                 "{repo}); empty = none"},
                              description="after each export run `ollama create NAME` (when ollama is on PATH); "
                              "{repo} stands for the repository's name")
    check_interval_s: int = Field(10, ge=1, le=HOUR, description="how often the daemon looks for a new current "
                                  "adapter to export")


# Keys that no longer exist: loading a config that sets one says what replaced it (an unknown-key error alone
# would leave the user guessing).
_REMOVED = {
    ("shards", "eval_fraction"): "no longer used: the rolling held-out window replaced it "
                                 "(train.window_commits, train.window_examples); remove the key",
}


class Config(_Section):
    ingest: IngestConfig = IngestConfig()
    daemon: DaemonConfig = DaemonConfig()
    shards: ShardConfig = ShardConfig()
    train: TrainConfig = TrainConfig()
    export: ExportConfig = ExportConfig()

    @model_validator(mode="after")
    def _rules_across_keys(self) -> "Config":
        if self.train.min_new_shards is not None and "min_new_examples" in self.train.model_fields_set:
            raise ValueError("train.min_new_shards and train.min_new_examples both set: keep min_new_examples "
                             "(min_new_shards is deprecated)")
        if self.train.fim_share is not None and "edit_share" in self.train.model_fields_set:
            raise ValueError("train.fim_share and train.edit_share both set: keep edit_share (fim_share is "
                             "deprecated; edit_share = 1 - fim_share)")
        if self.export.ollama_model and not self.export.ollama_from:
            raise ValueError("export.ollama_model needs export.ollama_from (the Modelfile's FROM line)")
        return self

    def min_new_examples(self) -> int:
        """The effective round threshold in examples (the deprecated min_new_shards counts shards of
        shards.shard_size examples)."""
        if self.train.min_new_shards is not None:
            return self.train.min_new_shards * self.shards.shard_size
        return self.train.min_new_examples


def _field(loc: tuple) -> tuple[FieldInfo | None, int]:
    """The schema field at an error's location (section, key), if there is one, and how many parts of the
    location name it (a union's member adds a part: ("train", "min_new_shards", "int"))."""
    model: Any = Config
    info = None
    for depth, part in enumerate(loc):
        fields = getattr(model, "model_fields", None)
        if fields is None and info is not None:
            return info, depth
        if not isinstance(part, str) or fields is None or part not in fields:
            return None, 0
        info = fields[part]
        model = info.annotation
    return info, len(loc)


def _plain(annotation: Any) -> Any:
    """`int | None` -> int: what an optional setting holds when it is set."""
    if get_origin(annotation) in (Union, types.UnionType):
        members = [a for a in get_args(annotation) if a is not type(None)]
        if len(members) == 1:
            return members[0]
    return annotation


def _bound(value: float) -> str:
    return f"{value:_}".replace("_", ",") if isinstance(value, int) else repr(value)


def allowed(info: FieldInfo) -> str | None:
    """What a field accepts, in words: "an integer from 5 to 86,400", "true or false", …"""
    annotation = _plain(info.annotation)
    if annotation is str:  # a constrained string says what it takes in its schema extra
        return info.json_schema_extra.get("allowed") if isinstance(info.json_schema_extra, dict) else None
    if annotation is bool:
        return "true or false"
    if annotation not in (int, float):
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
    kind = "an integer" if annotation is int else "a finite number"
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
    loc = tuple(first["loc"])
    info, depth = _field(loc)
    if info is not None:
        loc = loc[:depth]
    key = ".".join(str(p) for p in loc) or "(top level)"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    if not loc:  # a rule across keys: its message names them
        return f"{source}: {msg.removeprefix('Value error, ')}"
    text = f"{source}: {key}: {msg} (got {_shown(first.get('input'))})"
    rule = allowed(info) if info is not None and first["type"] != "extra_forbidden" else None
    return f"{text}; allowed: {rule}" if rule else text


def _removed(data: dict[str, Any], source: str) -> None:
    for (section, key), why in _REMOVED.items():
        if isinstance(data.get(section), dict) and key in data[section]:
            raise ConfigError(f"{source}: {section}.{key}: {why}")


def from_dict(data: dict[str, Any], source: str = "config") -> Config:
    _removed(data, source)
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


def _toml_string(value: Any) -> str:
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_toml(config: Config) -> str:
    """Render the effective config as TOML (tomllib only reads, and the shape is two flat levels)."""
    lines: list[str] = []
    for section, values in config.model_dump().items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if value is None:
                continue  # an optional key that is not set (TOML has no null)
            if isinstance(value, bool):
                rendered = "true" if value else "false"
            elif isinstance(value, list):
                rendered = "[" + ", ".join(_toml_string(v) for v in value) + "]"
            elif isinstance(value, (int, float)):
                rendered = repr(value)
            else:
                rendered = _toml_string(value)
            lines.append(f"{key} = {rendered}")
        lines.append("")
    return "\n".join(lines)
