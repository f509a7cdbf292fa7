"""structlog set-up: where the daemon's log lines go, and how each place wants them written.

* Under systemd (stderr is the journal's stream, see `journal_stream`): one concise line per event on stderr,
  `<priority>event key=value …`. The journal stamps time, unit and pid itself and keeps the priority (the
  `<N>` prefix, sd-daemon(3)), so `journalctl -p warning` works; a readable line beats JSON in `journalctl`
  output, and a value with spaces or newlines is quoted and escaped so one event stays one journal entry.
* Otherwise: JSON lines into a size-rotated file (`MAX_BYTES` x `BACKUPS` old files), so a long-running
  daemon's log stays bounded; plus readable console output when stderr is a TTY.
"""
from __future__ import annotations

import json
import logging
import logging.handlers
import os
import sys
from pathlib import Path
from typing import Any

import structlog

from . import compact_json

MAX_BYTES = 10 * 1024 * 1024  # one log file, before it is rotated to <name>.1
BACKUPS = 3  # rotated files kept: <name>.1 … <name>.3

# syslog priorities journald reads from a `<N>` line prefix
_PRIORITY = {"critical": 2, "exception": 3, "error": 3, "warning": 4, "warn": 4, "info": 6, "debug": 7}


def journal_stream() -> bool:
    """True when stderr is connected to the systemd journal.

    systemd sets JOURNAL_STREAM=<device>:<inode> of the stream it gave the service; a child whose stderr was
    redirected elsewhere inherits the variable, so it counts only when it names stderr's own file
    (systemd.exec(5), "$JOURNAL_STREAM").
    """
    device, sep, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    if not (sep and device.isdigit() and inode.isdigit()):
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (AttributeError, OSError, ValueError):  # no stderr, or not a real file
        return False
    return (st.st_dev, st.st_ino) == (int(device), int(inode))


def _value(value: Any) -> str:
    """One value of a key=value line: bare when it is one plain word, else a JSON string (escaped)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list, tuple)):
        text = compact_json.dumps(value, default=str)
    else:
        text = str(value)
    if text and not any(c.isspace() or c in '"=\\' or not c.isprintable() for c in text):
        return text
    return json.dumps(text, ensure_ascii=False)


def journal_line(_logger: Any, _name: str, event_dict: dict[str, Any]) -> str:
    """structlog renderer: `<priority>event key=value …` on one line (no timestamp: the journal adds one)."""
    level = str(event_dict.pop("level", "info"))
    event_dict.pop("timestamp", None)
    event = str(event_dict.pop("event", "")).replace("\r", "\\r").replace("\n", "\\n")
    fields = " ".join(f"{key}={_value(value)}" for key, value in event_dict.items())
    return f"<{_PRIORITY.get(level, 6)}>{event}" + (f" {fields}" if fields else "")


def configure(log_file: Path | None = None, *, console: bool | None = None, level: int = logging.INFO,
              journal: bool | None = None, max_bytes: int = MAX_BYTES, backups: int = BACKUPS) -> None:
    """Route structlog through stdlib logging so each handler gets its own renderer.

    `journal` (default: `journal_stream()`): log to stderr for the journal instead of `log_file`.
    """
    if journal is None:
        journal = journal_stream()
    if console is None:
        console = sys.stderr.isatty()
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level)
    if journal:
        journal_handler = logging.StreamHandler(sys.stderr)
        journal_handler.setFormatter(
            structlog.stdlib.ProcessorFormatter(
                processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                            structlog.processors.format_exc_info,
                            journal_line],
                foreign_pre_chain=shared,
            )
        )
        root.addHandler(journal_handler)
    elif log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.handlers.RotatingFileHandler(
            log_file, maxBytes=max_bytes, backupCount=backups, encoding="utf-8", errors="backslashreplace")
        file_handler.setFormatter(
            structlog.stdlib.ProcessorFormatter(
                processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                            structlog.processors.format_exc_info,
                            structlog.processors.JSONRenderer()],
                foreign_pre_chain=shared,
            )
        )
        root.addHandler(file_handler)
    if console and not journal:
        console_handler = logging.StreamHandler(sys.stderr)
        console_handler.setFormatter(
            structlog.stdlib.ProcessorFormatter(
                processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                            structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())],
                foreign_pre_chain=shared,
            )
        )
        root.addHandler(console_handler)
    # Third-party chatter (apscheduler, watchdog) stays at WARNING unless asked for.
    for noisy in ("apscheduler", "watchdog"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def get(name: str = "gitlora") -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)
