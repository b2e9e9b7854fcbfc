"""``etcdproxy-supervisor``: the flags of ``etcd grpc-proxy start`` -> Config -> supervisor.run().

Parsing follows Go's cobra/pflag rather than click's habits, so scripts written for the Go
proxy run unchanged:

* ``etcdproxy-supervisor grpc-proxy start --endpoints=...`` equals ``etcdproxy-supervisor --endpoints=...``;
* durations use Go syntax (``5s``, ``2h0m0s``, ``1m30s``, ``100ms``, ``0``);
* string slices are comma-separated and may be repeated (``--endpoints=a,b --endpoints c``);
* boolean flags are ``--flag``, ``--flag=true`` or ``--flag=false``; a following word is never
  taken as their value;
* every error before start-up exits with status 1, like the Go binary (click would use 2).

Every flag can also come from the environment: ``--listen-addr`` <- ``ETCDPROXY_LISTEN_ADDR``
(the command line wins). The Go proxy reads no environment, so this cannot clash with it.
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import click
from click.core import ParameterSource

from etcdproxy import ETCD_API_VERSION, __version__, tls
from etcdproxy.config import (
    GO_MAX_SEND_BYTES,
    Config,
    ConfigError,
    check,
    default_of,
    flag_name,
    format_go_duration,
    go_quote,
    parse_go_duration,
    self_address,
)

PROG_NAME = "etcdproxy-supervisor"
ENV_PREFIX = "ETCDPROXY"
# The words a Go proxy command line starts with after the binary name ("etcd").
GO_SUBCOMMAND = ("grpc-proxy", "start")

Kind = Literal["string", "bool", "int", "uint", "uint32", "duration", "strings"]


@dataclass(frozen=True, slots=True)
class Flag:
    """One command-line flag; its name and default come from the Config field it fills."""

    field: str
    kind: Kind
    help: str
    own: bool = False  # an etcdproxy flag, not one of `etcd grpc-proxy start`
    # What --help prints as the default when Config's default is a "not given" sentinel.
    shown_default: str = ""

    @property
    def name(self) -> str:
        return flag_name(self.field)


# Same order as `etcd grpc-proxy start` v3.7.1 then ours.
FLAGS: tuple[Flag, ...] = (
    Flag("listen_addr", "string", "host:port the proxy serves clients on"),
    Flag("discovery_srv", "string", "DNS domain whose SRV records list the etcd client endpoints"),
    Flag("discovery_srv_name", "string", "service name suffix for the SRV lookup"),
    Flag("metrics_addr", "string", "extra URL that serves /metrics and /health"),
    Flag("insecure_discovery", "bool", "use SRV records without checking them over TLS"),
    Flag("endpoints", "strings", "etcd endpoints, comma-separated (repeatable)"),
    Flag(
        "endpoints_auto_sync_interval_s", "duration", "how often to refresh endpoints from the member list (0 = never)"
    ),
    Flag("dial_keepalive_time_s", "duration", "keep-alive ping interval towards etcd (0 = off)"),
    Flag("dial_keepalive_timeout_s", "duration", "how long to wait for etcd to answer a keep-alive ping"),
    Flag("permit_without_stream", "bool", "send keep-alive pings to etcd even with no call in flight"),
    Flag("advertise_client_url", "string", "address of this proxy given to clients (member list, registration)"),
    Flag("resolver_prefix", "string", "key prefix under which proxies register themselves"),
    Flag("resolver_ttl_s", "int", "lease TTL in seconds of that registration"),
    Flag("namespace", "string", "prefix added to every key"),
    Flag("enable_pprof", "bool", "serve Go profiling data (not available in etcdproxy)"),
    Flag("data_dir", "string", "directory for generated TLS certificates"),
    Flag(
        "max_send_bytes",
        "int",
        "largest message sent to etcd (<= 0: no limit; not given: etcd's own limit decides)",
        shown_default=str(GO_MAX_SEND_BYTES),
    ),
    Flag("max_recv_bytes", "int", "largest message accepted from etcd (<= 0: no limit)"),
    Flag("grpc_keepalive_min_time_s", "duration", "shortest ping interval tolerated from clients"),
    Flag("grpc_keepalive_interval_s", "duration", "ping idle client connections this often (0 = off)"),
    Flag("grpc_keepalive_timeout_s", "duration", "close a client connection whose ping is not answered within this"),
    Flag("cert", "string", "client certificate for TLS to etcd"),
    Flag("key", "string", "key of --cert"),
    Flag("cacert", "string", "CA bundle that verifies etcd's certificates"),
    Flag("insecure_skip_tls_verify", "bool", "do not verify etcd's certificates (testing only)"),
    Flag("cert_file", "string", "server certificate for TLS between clients and the proxy"),
    Flag("key_file", "string", "key of --cert-file"),
    Flag("trusted_ca_file", "string", "CA that client certificates must chain to (makes them required)"),
    Flag("listen_cipher_suites", "strings", "TLS cipher suites allowed for clients, comma-separated"),
    Flag("auto_tls", "bool", "serve clients with a generated self-signed certificate"),
    Flag("client_crl_file", "string", "certificate revocation list for client certificates"),
    Flag("self_signed_cert_validity", "uint", "validity in years of the --auto-tls certificate"),
    Flag("tls_min_version", "string", "lowest TLS version for clients (TLS1.2 or TLS1.3)"),
    Flag("tls_max_version", "string", "highest TLS version for clients (empty = newest)"),
    Flag("experimental_serializable_ordering", "bool", "keep serializable read revisions monotonic"),
    Flag("experimental_leasing_prefix", "string", "key prefix for leasing-based cached linearizable reads"),
    Flag("experimental_enable_grpc_logging", "bool", "log every request and response (includes secrets)"),
    Flag("debug", "bool", "debug-level logging"),
    Flag("max_concurrent_streams", "uint32", "HTTP/2 stream limit of the HTTP endpoints"),
    # --- etcdproxy's own; names chosen so they cannot collide with future etcd flags ---
    Flag("workers", "int", "worker processes serving clients (default: number of CPUs)", own=True),
    Flag("embedded_etcd", "bool", "start a throwaway local etcd and use it as the only endpoint", own=True),
    Flag("run_dir", "string", "directory for IPC sockets and heartbeat files (default: a new temp dir)", own=True),
    Flag(
        "max_request_bytes",
        "int",
        "largest client request accepted, like etcd's --max-request-bytes (0: etcd's own limit decides)",
        own=True,
    ),
    Flag("graceful_timeout_s", "duration", "how long a stop waits for calls and streams to finish", own=True),
    Flag(
        "drain_delay_s",
        "duration",
        "on a graceful stop, health turns 503 and the port keeps accepting this long before it closes",
        own=True,
    ),
    Flag("heartbeat_timeout_s", "duration", "restart a child process silent for this long", own=True),
    Flag("default_call_timeout_s", "duration", "deadline for upstream calls without one (0 = none)", own=True),
    Flag(
        "lease_keepalive_window_s",
        "duration",
        "answer a lease keepalive from an upstream renewal sent this recently, with the TTL left (0 = always renew)",
        own=True,
    ),
    Flag("cache", "bool", "answer serializable Ranges from a cache kept fresh by an upstream watch", own=True),
    Flag("cache_max_entries", "int", "range cache entries per worker process", own=True),
    Flag("cache_max_bytes", "int", "range cache bytes per worker process", own=True),
    Flag(
        "config_file",
        "string",
        "YAML file with flag names as keys, like etcd's --config-file; flags on the command line win over it, "
        "it wins over ETCDPROXY_* variables; SIGHUP re-reads it",
        own=True,
    ),
    Flag("log_level", "string", "debug, info, warn or error, like etcd's --log-level (--debug: debug)", own=True),
    Flag("log_format", "string", "console (one line of text) or json (etcd's field names), like etcd's", own=True),
)
GO_FLAGS: frozenset[str] = frozenset(f.name for f in FLAGS if not f.own)
_BOOL_FLAGS: frozenset[str] = frozenset(f.name for f in FLAGS if f.kind == "bool")
_VALUE_FLAGS: frozenset[str] = frozenset(f.name for f in FLAGS if f.kind != "bool")


# click.ParamType is generic only in newer click; subscript it for mypy alone.
if TYPE_CHECKING:
    _FloatType = click.ParamType[float]
    _IntType = click.ParamType[int]
    _BoolType = click.ParamType[bool]
    _SliceType = click.ParamType[tuple[str, ...]]
else:
    _FloatType = _IntType = _BoolType = _SliceType = click.ParamType


class GoDuration(_FloatType):
    """Go ``time.Duration`` text -> float seconds."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)  # a default, already in seconds
        try:
            return parse_go_duration(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class GoBool(_BoolType):
    """pflag's booleans (Go strconv.ParseBool): 1 t T TRUE true True / 0 f F FALSE false False."""

    name = "bool"
    _VALUES: ClassVar[dict[str, bool]] = {
        **dict.fromkeys(("1", "t", "T", "TRUE", "true", "True"), True),
        **dict.fromkeys(("0", "f", "F", "FALSE", "false", "False"), False),
    }

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> bool:
        if isinstance(value, bool):
            return value
        text = str(value)
        if text not in self._VALUES:
            self.fail(f"strconv.ParseBool: parsing {go_quote(text)}: invalid syntax (want true or false)", param, ctx)
        return self._VALUES[text]


class GoStringSlice(_SliceType):
    """pflag's StringSlice: one occurrence is a CSV record ("a,b" -> a, b; "" -> nothing)."""

    name = "strings"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[str, ...]:
        if isinstance(value, tuple | list):
            return tuple(str(v) for v in value)
        text = str(value)
        if text == "":
            return ()
        try:
            return tuple(next(csv.reader([text], strict=True)))
        except csv.Error as exc:
            self.fail(f"{go_quote(text)} is not a comma-separated list: {exc}", param, ctx)


class GoUint(_IntType):
    """Go's unsigned flags: a decimal integer from 0 to 2**bits - 1."""

    name = "uint"

    def __init__(self, bits: int) -> None:
        self.max = 2**bits - 1

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        else:
            text = str(value)
            if not text.isascii() or not text.isdigit():
                self.fail(f"{go_quote(text)} is not an unsigned integer", param, ctx)
            number = int(text)
        if number > self.max:
            self.fail(f"{number} is out of range (0 to {self.max})", param, ctx)
        return number


_TYPES: dict[Kind, click.ParamType[Any]] = {
    "string": click.STRING,
    "bool": GoBool(),
    "int": click.INT,
    "uint": GoUint(64),
    "uint32": GoUint(32),
    "duration": GoDuration(),
    "strings": GoStringSlice(),
}


def _help_with_default(flag: Flag, default: object) -> str:
    """Help text plus the default as Go prints it; zero values are not shown, like pflag."""
    if flag.shown_default:
        shown = flag.shown_default
    elif flag.kind == "duration":
        assert isinstance(default, float)
        shown = format_go_duration(default) if default else ""
    elif flag.kind == "strings":
        assert isinstance(default, tuple)
        shown = "[" + ",".join(default) + "]" if default else ""
    elif flag.field == "workers" or default in ("", False, 0):
        shown = ""  # zero values are omitted; workers is machine-dependent and its help says so
    else:
        shown = "true" if default is True else str(default)  # Go prints booleans in lower case
    return f"{flag.help}  [default: {shown}]" if shown else flag.help


class _BoolOption(click.Option):
    """Help shows ``--debug`` like pflag does, not ``--debug BOOL``: the value is optional."""

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        record = super().get_help_record(ctx)
        if record is None:
            return None
        return self.opts[0], record[1]


def _option(flag: Flag) -> click.Option:
    default = default_of(flag.field)
    cls = _BoolOption if flag.kind == "bool" else click.Option
    return cls(
        [flag.name],
        type=_TYPES[flag.kind],
        # a Go string slice is replaced by its first occurrence and appended to after that;
        # click's multiple=True gives the same result once the per-occurrence tuples are joined
        multiple=flag.kind == "strings",
        default=default,
        metavar="" if flag.kind == "bool" else flag.kind,
        help=_help_with_default(flag, default),
    )


def normalize_args(args: Sequence[str]) -> list[str]:
    """Rewrite a pflag-style command line into one click parses the same way.

    Drops a leading ``grpc-proxy start`` and turns a bare boolean ``--flag`` into
    ``--flag=true``, so click never mistakes the next word for the flag's value. The word after
    a value flag written without ``=`` is that flag's value even if it looks like a flag (pflag
    does this too), so it is copied untouched.
    """
    rest = list(args)
    if tuple(rest[: len(GO_SUBCOMMAND)]) == GO_SUBCOMMAND:
        rest = rest[len(GO_SUBCOMMAND) :]
    out: list[str] = []
    i = 0
    while i < len(rest):
        arg = rest[i]
        i += 1
        if arg == "--":
            out.extend(rest[i - 1 :])
            break
        name, eq, _ = arg.partition("=")
        if name in _BOOL_FLAGS and not eq:
            out.append(name + "=true")
        elif name in _VALUE_FLAGS and not eq and i < len(rest):
            out += [arg, rest[i]]
            i += 1
        else:
            out.append(arg)
    return out


class ProxyCommand(click.Command):
    """A click command that parses like pflag and lists etcdproxy's own flags separately."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, normalize_args(args))

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        own = {f.field.removesuffix("_s") for f in FLAGS if f.own} | {"version"}
        sections: dict[str, list[tuple[str, str]]] = {"Flags of etcd grpc-proxy start": [], "etcdproxy options": []}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None:
                section = "etcdproxy options" if param.name in own else "Flags of etcd grpc-proxy start"
                sections[section].append(record)
        for title, records in sections.items():
            if records:
                with formatter.section(title):
                    formatter.write_dl(records)


def _to_config(**values: Any) -> Config:
    """click callback: option values (keyed by click's name for each flag), then --config-file -> Config."""
    ctx = click.get_current_context()
    from_file = read_config_file(values["config_file"], ctx) if values["config_file"] else {}
    kwargs: dict[str, Any] = {}
    for flag in FLAGS:
        key = flag.name.removeprefix("--").replace("-", "_")
        value = values[key]
        if flag.kind == "strings":
            value = tuple(item for occurrence in value for item in occurrence)
        if flag.name in from_file and ctx.get_parameter_source(key) is not ParameterSource.COMMANDLINE:
            value = from_file[flag.name]
        kwargs[flag.field] = value
    advertise_given = ctx.get_parameter_source("advertise_client_url") is not ParameterSource.DEFAULT
    if not advertise_given and "--advertise-client-url" not in from_file:
        # A departure from Go (whose default is always 127.0.0.1:23790): two proxies on one host must
        # not advertise (and health-check) each other.
        kwargs["advertise_client_url"] = self_address(kwargs["listen_addr"])
    return Config(**kwargs)


def read_config_file(path: str, ctx: click.Context) -> dict[str, Any]:
    """``--config-file``: a YAML mapping of flag names (``listen-addr: 0.0.0.0:23790``) to values, each
    converted by its flag's type: Go durations as text ("5s"; a plain number is seconds), lists as YAML
    sequences or comma-separated text, booleans as YAML booleans. Returns flag (``--listen-addr``) -> value.

    Raises click.UsageError for an unreadable file, an unknown key or a bad value (exit 1 at start-up,
    an ERROR line and no change on SIGHUP).
    """
    import yaml  # only when a config file is used

    try:
        with open(path, encoding="utf-8") as source:
            data = yaml.safe_load(source)
    except OSError as exc:
        raise click.UsageError(f"--config-file {path}: {exc.strerror}", ctx) from exc
    except yaml.YAMLError as exc:
        raise click.UsageError(f"--config-file {path}: not valid YAML: {exc}", ctx) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise click.UsageError(f"--config-file {path}: want a mapping of flag names to values", ctx)
    params = {param.name: param for param in ctx.command.params if isinstance(param, click.Option)}
    out: dict[str, Any] = {}
    for raw_key, raw in data.items():
        key = str(raw_key).removeprefix("--")
        param = params.get(key.replace("-", "_"))
        if param is None or key in ("config-file", "version") or "_" in key:
            raise click.UsageError(f"--config-file {path}: unknown key {key!r} (keys are flag names)", ctx)
        try:
            if isinstance(raw, list | tuple):
                value = tuple(str(item) for item in raw)
                if not param.multiple:
                    raise click.BadParameter("a list is only allowed for a list flag")
            elif raw is None:
                value = param.type.convert("", param, ctx)
            else:
                value = param.type.convert(raw, param, ctx)
        except click.BadParameter as exc:
            raise click.UsageError(f"--config-file {path}: {key}: {exc.format_message()}", ctx) from exc
        out["--" + key] = value
    return out


def _print_version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    click.echo(f"etcdproxy {__version__}\netcd API version: {ETCD_API_VERSION}")
    ctx.exit(0)


VERSION_OPTION = click.Option(
    ["--version"],
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="print the version of etcdproxy and of the etcd API it serves, then exit",
)


command = ProxyCommand(
    name=PROG_NAME,
    callback=_to_config,
    params=[_option(flag) for flag in FLAGS] + [VERSION_OPTION],
    help=(
        "Multi-process etcd v3 gRPC proxy; a drop-in for `etcd grpc-proxy start` "
        "(the words `grpc-proxy start` may precede the flags)."
    ),
    epilog=f"Every flag can also be set as an environment variable: --listen-addr -> {ENV_PREFIX}_LISTEN_ADDR.",
    context_settings={"auto_envvar_prefix": ENV_PREFIX, "help_option_names": ["-h", "--help"]},
)


def build_config(args: Sequence[str]) -> Config:
    """Parse a command line (without the program name) into a Config; no validation, no side effects.

    Raises click.ClickException (usually click.UsageError) for malformed flags, and
    click.exceptions.Exit after printing --help.
    """
    with command.make_context(PROG_NAME, list(args)) as ctx:
        config = command.invoke(ctx)
    assert isinstance(config, Config)
    return config


def load(args: Sequence[str]) -> Config:
    """build_config() plus validation: the Config the proxy would start with, else ConfigError.

    A malformed flag is reported as ConfigError too, so callers (e.g. a reload) catch one type.
    """
    try:
        config = build_config(args)
    except click.ClickException as exc:
        raise ConfigError([exc.format_message()]) from exc
    check(config, tls.startup_errors)
    return config


# The command line main() started with: a reload (SIGHUP) parses it again, re-reading --config-file.
LAST_ARGS: list[str] = []


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of ``etcdproxy-supervisor`` and ``python -m etcdproxy``; always exits."""
    argv = sys.argv[1:] if args is None else list(args)
    LAST_ARGS[:] = argv
    try:
        config = build_config(argv)
    except click.exceptions.Exit as exc:  # --help
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(1)  # the Go binary exits 1 on bad flags; click alone would exit 2
    except click.Abort:
        sys.exit(1)
    try:
        check(config, tls.startup_errors)
    except ConfigError as exc:
        for message in exc.messages:
            click.echo(message, err=True)
        sys.exit(1)
    # Imported late: the supervisor pulls in process machinery that parsing never needs.
    from etcdproxy import supervisor

    sys.exit(supervisor.run(config))


def config_fields_without_flag() -> list[str]:
    """Config fields no flag fills (internal settings); used by the tests to catch a forgotten flag."""
    flagged = {f.field for f in FLAGS}
    return [f.name for f in fields(Config) if f.name not in flagged]
