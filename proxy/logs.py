"""Logging: the text format (``2026-12-04 21:01:20.123 INFO pgmux.client ...``) or one
JSON object per line (``log_format = "json"``), both on stderr; level and format change
on reload."""

from __future__ import annotations

import json
import logging
import sys
import time

from .config import Config

DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, worker (with workers), message,
    and the exception's traceback when there is one."""

    def __init__(self, worker: int | None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.worker is not None:
            entry["worker"] = self.worker
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def _formatter(config: Config, worker: int | None) -> logging.Formatter:
    if config.log_format == "json":
        return JsonFormatter(worker)
    tag = f"[worker {worker}] " if worker is not None else ""
    return logging.Formatter(
        f"%(asctime)s.%(msecs)03d %(levelname)s %(name)s {tag}%(message)s", DATE_FORMAT
    )


def setup_logging(config: Config, worker: int | None = None) -> None:
    """Log to stderr as the config says (``worker``: this process's index, if one)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_formatter(config, worker))
    handler.set_name("pgmux")
    root = logging.getLogger()
    for old in list(root.handlers):
        if old.get_name() == "pgmux":
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(config.log_level.upper())


def reconfigure_logging(config: Config, worker: int | None = None) -> None:
    """A reload's log_level and log_format."""
    root = logging.getLogger()
    root.setLevel(config.log_level.upper())
    for handler in root.handlers:
        if handler.get_name() == "pgmux":
            handler.setFormatter(_formatter(config, worker))
