"""The only place that creates gRPC channels to etcd: endpoints, limits, keepalive.

Runs in the hub only (after fork). Several IP endpoints are balanced with round_robin (a dead
member's subchannel is skipped and streams re-open on another); host-name endpoints use the first
one until explicit failover lands (issue 8). TLS credentials come from tls.py.
"""

from __future__ import annotations

import ipaddress
import logging

import grpc

from etcdproxy import tls
from etcdproxy.config import Config

log = logging.getLogger(__name__)


def host_port(endpoint: str) -> str:
    """``http://10.0.0.1:2379`` or ``10.0.0.1:2379`` -> ``10.0.0.1:2379``."""
    for scheme in ("http://", "https://", "unix://", "unixs://"):
        if endpoint.startswith(scheme):
            return endpoint[len(scheme) :].rstrip("/")
    return endpoint.rstrip("/")


def _is_ip(hostport: str) -> bool:
    host = hostport.rsplit(":", 1)[0].strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def target(endpoints: tuple[str, ...]) -> str:
    addrs = [host_port(e) for e in endpoints if e]
    if len(addrs) > 1 and all(_is_ip(a) for a in addrs):
        return "ipv4:" + ",".join(addrs)
    if len(addrs) > 1:
        log.warning("several endpoints with host names; using %s only until failover lands (issue 8)", addrs[0])
    return addrs[0]


def channel_options(config: Config) -> list[tuple[str, int | str]]:
    opts: list[tuple[str, int | str]] = [
        ("grpc.lb_policy_name", "round_robin"),
        # etcd itself decides what is too large; our limits only stop nothing etcd would take
        ("grpc.max_send_message_length", config.max_send_bytes if config.max_send_bytes > 0 else -1),
        ("grpc.max_receive_message_length", config.max_recv_bytes if config.max_recv_bytes > 0 else -1),
        # one connection carries every client's streams: never cap concurrent streams locally
        ("grpc.use_local_subchannel_pool", 1),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ]
    if config.dial_keepalive_time_s > 0:
        opts += [
            ("grpc.keepalive_time_ms", int(config.dial_keepalive_time_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(config.dial_keepalive_timeout_s * 1000)),
            ("grpc.keepalive_permit_without_calls", 1 if config.permit_without_stream else 0),
            ("grpc.http2.max_pings_without_data", 0),
        ]
    return opts


def open_channel(config: Config) -> grpc.aio.Channel:
    t = target(config.endpoints)
    if tls.upstream_tls(config):
        options = channel_options(config)
        if t.startswith("ipv4:"):
            # grpc checks every address of the channel against one name: its authority, which for a
            # list target is the whole list and matches no certificate. Use the first endpoint's.
            first = host_port(config.endpoints[0])
            options.append(("grpc.default_authority", first))
            log.warning("TLS to several endpoints: every member's certificate must be valid for %s", first)
        log.info("upstream channel to %s over TLS", t)
        return grpc.aio.secure_channel(t, tls.channel_credentials(config), options=options)
    log.info("upstream channel to %s", t)
    return grpc.aio.insecure_channel(t, options=channel_options(config))
