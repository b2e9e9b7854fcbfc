"""Per-process logging to stderr, in etcd's shape: ``--log-level`` and ``--log-format``.

* ``json``: one object per line with etcd's (zap's) keys: ``level`` (debug/info/warn/error),
  ``ts`` (RFC 3339, local time with its zone offset), ``caller`` (file:line), ``msg``, then
  structured fields: ``role`` (supervisor, hub, worker-3), ``pid``, ``logger`` and whatever a call
  passes as ``extra={"fields": {...}}``; ``stacktrace`` for an exception.
* ``console``: ``<ISO time with zone> <LEVEL> <role>[<pid>] <logger>: <msg> [k=v ...]``.
* Under systemd (stderr is the journal, ``JOURNAL_STREAM`` names it), console lines carry no time
  (the journal stamps them) and start with a ``<N>`` syslog priority that journald turns into the
  entry's priority, so ``journalctl -p warning`` works.

The supervisor calls ``configure()`` (level, format) once; every process calls ``setup()`` with its
role, a forked child again through ``proc.child_init``; the settings are module state, so a child
inherits them over fork. ``set_level()`` changes the level of a running process (SIGHUP reload).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
from typing import Any

# Marks the handler setup() installed, so a second call replaces it instead of doubling lines.
_HANDLER_NAME = "etcdproxy-stderr"

LEVELS: dict[str, int] = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING, "error": logging.ERROR}
FORMATS: tuple[str, ...] = ("console", "json")
DEFAULT_LEVEL = "info"  # etcd's --log-level default
DEFAULT_FORMAT = "console"  # etcd 3.5 has no --log-format (JSON only); see README for why console

# zap's level names, and syslog priorities (sd-daemon.h) for the journal's "<N>" prefix.
_NAMES = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warn", logging.ERROR: "error"}
_PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

_settings: dict[str, str] = {"level": DEFAULT_LEVEL, "format": DEFAULT_FORMAT}


def level_name(levelno: int) -> str:
    """etcd's name of a Python level: WARNING -> "warn", CRITICAL -> "error" (zap has no critical)."""
    for number in sorted(_NAMES, reverse=True):
        if levelno >= number:
            return _NAMES[number]
    return "debug"


def timestamp(created: float) -> str:
    """RFC 3339 with milliseconds and the local zone offset: ``2026-12-04T19:08:01.862+00:00``."""
    return datetime.datetime.fromtimestamp(created).astimezone().isoformat(timespec="milliseconds")


def stderr_is_journal(environ: dict[str, str] | None = None, fd: int = 2) -> bool:
    """systemd's rule: JOURNAL_STREAM is ``<st_dev>:<st_ino>`` of the stream connected to the journal."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        info = os.fstat(fd)
    except OSError:
        return False
    return (info.st_dev, info.st_ino) == (int(dev), int(ino))


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    extra = getattr(record, "fields", None)
    return dict(extra) if isinstance(extra, dict) else {}


def _caller(record: logging.LogRecord) -> str:
    """``etcdproxy/hub/http.py:42`` like zap's ``etcdmain/grpc_proxy.go:381`` (package-relative)."""
    path = record.pathname.replace(os.sep, "/")
    marker = path.rfind("/etcdproxy/")
    return f"{path[marker + 1 :] if marker >= 0 else record.filename}:{record.lineno}"


class JsonFormatter(logging.Formatter):
    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "level": level_name(record.levelno),
            "ts": timestamp(record.created),
            "caller": _caller(record),
            "msg": record.getMessage(),
            "role": self.role,
            "pid": record.process,
            "logger": record.name,
        }
        entry.update(_fields(record))
        if record.exc_info:
            entry["stacktrace"] = self.formatException(record.exc_info)
        elif record.stack_info:
            entry["stacktrace"] = record.stack_info
        return json.dumps(entry, ensure_ascii=False, default=str)


class ConsoleFormatter(logging.Formatter):
    def __init__(self, role: str, journal: bool = False) -> None:
        super().__init__()
        self.role = role
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        level = level_name(record.levelno).upper()
        text = f"{level} {self.role}[{record.process}] {record.name}: {record.getMessage()}"
        extra = _fields(record)
        if extra:
            text += " " + " ".join(f"{key}={value}" for key, value in extra.items())
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        elif record.stack_info:
            text += "\n" + record.stack_info
        if self.journal:  # one priority for the whole (possibly multi-line) entry
            priority = _PRIORITIES.get(record.levelno, 6)
            return "\n".join(f"<{priority}>{line}" for line in text.split("\n"))
        return f"{timestamp(record.created)} {text}"


def configure(level: str = DEFAULT_LEVEL, fmt: str = DEFAULT_FORMAT) -> None:
    """Set the level and format every later setup() in this process and its forked children uses."""
    if level not in LEVELS:
        raise ValueError(f"unknown log level {level!r}")
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r}")
    _settings["level"], _settings["format"] = level, fmt


def formatter(role: str) -> logging.Formatter:
    if _settings["format"] == "json":
        return JsonFormatter(role)
    return ConsoleFormatter(role, journal=stderr_is_journal())


def setup(role: str, debug: bool = False) -> None:
    """Log to stderr at the configured level (DEBUG with ``debug``, etcd's --debug), tagged with ``role``.

    Idempotent: handlers installed by an earlier call (typically the supervisor's, inherited over
    fork) are removed first. Handlers installed by someone else are left alone.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if handler.get_name() == _HANDLER_NAME:
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(formatter(role))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else LEVELS[_settings["level"]])
    # Warnings (DeprecationWarning from a library, ...) go through the same handler.
    logging.captureWarnings(True)


def set_level(level: str) -> None:
    """Change this process's level now (a reload); later children inherit it."""
    configure(level, _settings["format"])
    logging.getLogger().setLevel(LEVELS[level])


def current_level() -> str:
    return _settings["level"]
