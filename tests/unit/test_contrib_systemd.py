"""contrib/systemd: the unit passes ``systemd-analyze verify`` and ``security`` (<= 3.0), and the example env file
sets only real flags, with values the CLI accepts and a stop that fits in TimeoutStopSec."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from etcdproxy import cli
from tests.helpers import ROOT

CONTRIB = ROOT / "contrib" / "systemd"
UNIT = CONTRIB / "etcdproxy.service"
ENV_FILE = CONTRIB / "etcdproxy.env"
README = CONTRIB / "README.md"
INSTALLED_SUPERVISOR = "/opt/etcdproxy/bin/etcdproxy-supervisor"  # README: python3 -m venv /opt/etcdproxy
MAX_EXPOSURE = 3.0  # systemd-analyze's "OK" band


def directives(text: str) -> dict[str, list[str]]:
    """Key -> values of the unit's ``Key=value`` lines, line continuations joined."""
    found: dict[str, list[str]] = {}
    for line in text.replace("\\\n", " ").splitlines():
        if line.startswith(("#", ";", "[")) or "=" not in line:
            continue
        key, value = line.split("=", 1)
        found.setdefault(key.strip(), []).append(value.strip())
    return found


def _systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.skip("systemd-analyze not installed")
    return found


def test_unit_directives() -> None:
    d = directives(UNIT.read_text())
    assert d["Type"] == ["notify"]
    assert d["NotifyAccess"] == ["all"]  # the SIGUSR2 upgrade's new supervisor announces its MAINPID itself
    assert d["EnvironmentFile"] == ["-/etc/default/etcdproxy"]
    assert d["ExecStart"][0].split()[0] == INSTALLED_SUPERVISOR
    assert d["ExecReload"] == ["/bin/kill -s HUP $MAINPID"]
    assert d["KillSignal"] == ["SIGTERM"]
    assert d["KillMode"] == ["mixed"]
    assert d["RuntimeDirectory"] == ["etcdproxy"]
    assert "--run-dir=/run/etcdproxy" in d["ExecStart"][0].split()
    # The README installs into the venv the unit runs from, and the package installs that script.
    readme = README.read_text()
    assert "python3 -m venv /opt/etcdproxy" in readme and INSTALLED_SUPERVISOR in readme
    assert re.search(r"^\s*etcdproxy-supervisor = etcdproxy\.cli:main$", (ROOT / "setup.cfg").read_text(), re.M)


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """verify insists that ExecStart's binary exists: check a copy whose ExecStart names a stand-in executable
    (the only change), so every other directive is verified against this host's systemd."""
    analyze = _systemd_analyze()
    stand_in = tmp_path / "bin" / "etcdproxy-supervisor"
    stand_in.parent.mkdir()
    stand_in.write_text("#!/bin/sh\nexit 0\n")
    stand_in.chmod(0o755)
    text = UNIT.read_text()
    exec_start = f"ExecStart={INSTALLED_SUPERVISOR} "
    assert text.count(exec_start) == 1
    copy = tmp_path / "etcdproxy.service"
    copy.write_text(text.replace(exec_start, f"ExecStart={stand_in} "))
    out = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    complaints = [line for line in (out.stdout + out.stderr).splitlines() if "etcdproxy" in line]
    assert complaints == []
    # ... and the original fails only for want of the installed binary (nothing else to complain about).
    out = subprocess.run([analyze, "verify", str(UNIT)], capture_output=True, text=True, timeout=60)
    lines = [line for line in (out.stdout + out.stderr).splitlines() if "etcdproxy" in line]
    if Path(INSTALLED_SUPERVISOR).exists():
        assert out.returncode == 0 and lines == [], lines
    else:
        assert lines == [
            f"etcdproxy.service: Command {INSTALLED_SUPERVISOR} is not executable: No such file or directory"
        ]


def test_systemd_analyze_security() -> None:
    analyze = _systemd_analyze()
    out = subprocess.run(
        [analyze, "security", "--offline=yes", "--no-pager", str(UNIT)], capture_output=True, text=True, timeout=60
    )
    if "--offline" in out.stderr and out.returncode != 0:
        pytest.skip(f"this systemd-analyze cannot rate a unit file offline: {out.stderr.strip()}")
    m = re.search(r"Overall exposure level for etcdproxy\.service: (\d+\.\d+) (\w+)", out.stdout)
    assert m is not None, out.stdout + out.stderr
    assert float(m.group(1)) <= MAX_EXPOSURE, out.stdout
    assert m.group(2) == "OK"


def env_file_values() -> dict[str, str]:
    values = {}
    for line in ENV_FILE.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, value = line.split("=", 1)
            values[key] = value
    return values


def test_env_file_sets_real_flags_and_fits_the_stop_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    values = env_file_values()
    flag_names = {f.name for f in cli.FLAGS}
    for key in values:
        assert key.startswith(f"{cli.ENV_PREFIX}_"), key
        assert "--" + key.removeprefix(f"{cli.ENV_PREFIX}_").lower().replace("_", "-") in flag_names, key
    assert "ETCDPROXY_METRICS_ADDR" in values
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    config = cli.load(["--run-dir=/run/etcdproxy"])  # the unit's ExecStart arguments; validated
    assert config.metrics_addr == values["ETCDPROXY_METRICS_ADDR"]
    assert config.endpoints == tuple(values["ETCDPROXY_ENDPOINTS"].split(","))
    assert config.workers == int(values["ETCDPROXY_WORKERS"])
    # A graceful stop: the drain delay, then workers and hub each get graceful + 1 s.
    drain = config.drain_delay_s
    assert drain == 5.0
    worst_stop = drain + 2 * (config.graceful_timeout_s + 1)
    stop_timeout = float(directives(UNIT.read_text())["TimeoutStopSec"][0])
    assert stop_timeout > worst_stop + 5, (stop_timeout, worst_stop)
