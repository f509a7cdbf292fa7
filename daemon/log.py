"""structlog set-up: JSON lines into a log file, readable console output when stderr is a TTY."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import structlog


def configure(log_file: Path | None = None, *, console: bool | None = None, level: int = logging.INFO) -> None:
    """Route structlog through stdlib logging so each handler gets its own renderer."""
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
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_file, encoding="utf-8")
        file_handler.setFormatter(
            structlog.stdlib.ProcessorFormatter(
                processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                            structlog.processors.format_exc_info,
                            structlog.processors.JSONRenderer()],
                foreign_pre_chain=shared,
            )
        )
        root.addHandler(file_handler)
    if console:
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
