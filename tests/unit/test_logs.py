"""logs.py: etcd's level names, JSON keys, RFC 3339 times, journal detection (a real stderr in a subprocess)."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from etcdproxy import logs

RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}(Z|[+-]\d\d:\d\d)$")
ROOT = Path(__file__).resolve().parents[2]


def record(
    level: int = logging.WARNING, msg: str = "hello %s", args: tuple[object, ...] = ("world",)
) -> logging.LogRecord:
    return logging.LogRecord("etcdproxy.upstream", level, "/x/etcdproxy/upstream.py", 42, msg, args, None)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    logs.configure()
    logging.captureWarnings(False)


@pytest.mark.parametrize(
    ("levelno", "name"),
    [(logging.DEBUG, "debug"), (logging.INFO, "info"), (logging.WARNING, "warn"), (logging.ERROR, "error")],
)
def test_level_names_are_etcds(levelno: int, name: str) -> None:
    assert logs.level_name(levelno) == name
    assert logs.LEVELS[name] == levelno
    assert logs.level_name(logging.CRITICAL) == "error"


def test_json_line_has_etcds_keys() -> None:
    rec = record()
    rec.fields = {"endpoint": "127.0.0.1:1"}
    entry = json.loads(logs.JsonFormatter("hub").format(rec))
    assert list(entry)[:4] == ["level", "ts", "caller", "msg"]
    assert entry["level"] == "warn"
    assert RFC3339.match(entry["ts"]), entry["ts"]
    assert entry["caller"] == "etcdproxy/upstream.py:42"
    assert entry["msg"] == "hello world"
    assert entry["role"] == "hub"
    assert entry["pid"] == os.getpid()
    assert entry["endpoint"] == "127.0.0.1:1"


def test_json_line_carries_the_stacktrace() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        rec = record(logging.ERROR, "failed", ())
        rec.exc_info = sys.exc_info()
    line = logs.JsonFormatter("worker-1").format(rec)
    assert "\n" not in line  # one entry, one line
    assert "RuntimeError: boom" in json.loads(line)["stacktrace"]


def test_console_line_has_a_time_with_zone() -> None:
    line = logs.ConsoleFormatter("worker-3").format(record())
    stamp, rest = line.split(" ", 1)
    assert RFC3339.match(stamp), stamp
    assert rest == f"WARN worker-3[{os.getpid()}] etcdproxy.upstream: hello world"


def test_console_line_for_the_journal_has_priority_and_no_time() -> None:
    rec = record(logging.ERROR, "two\nlines", ())
    line = logs.ConsoleFormatter("hub", journal=True).format(rec)
    assert line == f"<3>ERROR hub[{os.getpid()}] etcdproxy.upstream: two\n<3>lines"


def test_stderr_is_journal(tmp_path: Path) -> None:
    with open(tmp_path / "journal", "w") as stream:
        info = os.fstat(stream.fileno())
        assert logs.stderr_is_journal({"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"}, stream.fileno())
        assert not logs.stderr_is_journal({"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino + 1}"}, stream.fileno())
        assert not logs.stderr_is_journal({"JOURNAL_STREAM": "garbage"}, stream.fileno())
        assert not logs.stderr_is_journal({}, stream.fileno())


def test_configure_refuses_unknown_values(restore_logging: None) -> None:
    with pytest.raises(ValueError):
        logs.configure("verbose", "json")
    with pytest.raises(ValueError):
        logs.configure("info", "text")


def test_level_and_set_level(restore_logging: None) -> None:
    logs.configure("warn", "json")
    logs.setup("hub")
    assert logging.getLogger().level == logging.WARNING
    logs.setup("hub", debug=True)  # --debug wins, as in the Go proxy
    assert logging.getLogger().level == logging.DEBUG
    logs.set_level("error")
    assert logging.getLogger().level == logging.ERROR
    assert logs.current_level() == "error"


CHILD = """
import logging, sys
from etcdproxy import logs
logs.configure(sys.argv[1], sys.argv[2])
logs.setup("supervisor")
logging.getLogger("etcdproxy.t").debug("hidden")
logging.getLogger("etcdproxy.t").warning("visible %d", 1)
"""


def run_child(tmp_path: Path, level: str, fmt: str, journal: bool) -> str:
    """A real process whose stderr is a file; JOURNAL_STREAM names that file when ``journal``."""
    path = tmp_path / "stderr"
    with open(path, "wb") as stderr:
        env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
        env["PYTHONPATH"] = str(ROOT)
        if journal:
            info = os.fstat(stderr.fileno())
            env["JOURNAL_STREAM"] = f"{info.st_dev}:{info.st_ino}"
        subprocess.run([sys.executable, "-c", CHILD, level, fmt], stderr=stderr, env=env, timeout=30, check=True)
    return path.read_text()


@pytest.mark.timeout(60)
def test_stderr_of_a_real_process(tmp_path: Path) -> None:
    console = run_child(tmp_path, "info", "console", journal=False)
    assert "hidden" not in console
    assert re.match(r"^\S+ WARN supervisor\[\d+\] etcdproxy.t: visible 1\n$", console), console
    journal = run_child(tmp_path, "info", "console", journal=True)
    assert re.match(r"^<4>WARN supervisor\[\d+\] etcdproxy.t: visible 1\n$", journal), journal
    debug_json = run_child(tmp_path, "debug", "json", journal=False)
    entries = [json.loads(line) for line in debug_json.splitlines()]
    assert [(e["level"], e["msg"]) for e in entries] == [("debug", "hidden"), ("warn", "visible 1")]
