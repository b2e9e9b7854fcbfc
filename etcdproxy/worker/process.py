"""A worker process: a grpc.aio server on the client port, talking to the hub over IPC.

Workers share --listen-addr through SO_REUSEPORT (the supervisor's port guard makes sure no
other program holds it). Lifecycle: fork -> main() -> serve() until SIGTERM, then stop
accepting, end long-lived streams with UNAVAILABLE (clients reconnect to another worker),
and give unary calls ``graceful_timeout_s`` to finish.
"""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc

from etcdproxy import metrics, proc, tls
from etcdproxy.config import Config
from etcdproxy.core import errors
from etcdproxy.worker.cache import RangeService
from etcdproxy.worker.handlers import Handlers
from etcdproxy.worker.hubclient import HubClient
from etcdproxy.worker.instrument import report_loop
from etcdproxy.worker.lease import LeaseServicer
from etcdproxy.worker.namespace import LeaseRevokeGuard, namespace_of
from etcdproxy.worker.watch import WatchService

log = logging.getLogger(__name__)

MAX_INT32 = 2**31 - 1


def server_options(config: Config) -> list[tuple[str, int]]:
    options = [
        ("grpc.so_reuseport", 1),
        # Not Go's fixed 4 MiB, which answers for etcd (etcd issue 11984): by default a memory guard
        # well above etcd's own limit, so etcd's answer reaches the client (Config.server_max_receive_bytes).
        ("grpc.max_receive_message_length", config.server_max_receive_bytes),
        ("grpc.max_send_message_length", -1),
        ("grpc.max_concurrent_streams", min(config.max_concurrent_streams, MAX_INT32)),
        # etcd's keepalive enforcement: clients may ping no more often than min-time, and
        # only while they have an active call (PermitWithoutStream=false).
        ("grpc.http2.min_ping_interval_without_data_ms", int(config.grpc_keepalive_min_time_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 0),
    ]
    if config.grpc_keepalive_interval_s > 0:
        options.append(("grpc.keepalive_time_ms", int(config.grpc_keepalive_interval_s * 1000)))
    if config.grpc_keepalive_timeout_s > 0:
        timeout_ms = int(config.grpc_keepalive_timeout_s * 1000)
        options.append(("grpc.keepalive_timeout_ms", timeout_ms))
        # grpc bounds a keepalive ping that joins one already in flight (a BDP probe) by its general
        # ping timeout (60 s) instead: keep both the same, as Go's single timeout is
        options.append(("grpc.http2.ping_timeout_ms", timeout_ms))
    if config.grpc_keepalive_interval_s > 0:
        # keep pinging an idle stream (grpc's default stops after two pings without data)
        options.append(("grpc.http2.max_pings_without_data", 0))
    return options


async def serve(config: Config, spec: proc.ChildSpec) -> int:
    loop = asyncio.get_running_loop()
    hub = HubClient(proc.hub_endpoint(spec.run_dir), spec.index, loop)
    server = grpc.aio.server(options=server_options(config))
    namespace = namespace_of(config)  # --namespace: see docs/namespace.md
    handlers = Handlers(hub, namespace)
    handlers.overrides["/etcdserverpb.Watch/Watch"] = WatchService(hub, namespace).handler()
    if namespace is not None:
        handlers.overrides["/etcdserverpb.Lease/LeaseRevoke"] = LeaseRevokeGuard(hub, namespace).handler()
    leases = LeaseServicer(hub)
    handlers.overrides["/etcdserverpb.Lease/LeaseKeepAlive"] = leases.handler()
    if config.cache:
        handlers.overrides["/etcdserverpb.KV/Range"] = RangeService(hub, config, namespace).handler()
    server.add_generic_rpc_handlers(handlers.generic_handlers())
    files = tls.server_files(config)
    try:
        if files is None:
            port = server.add_insecure_port(config.listen_addr)
        else:
            port = server.add_secure_port(config.listen_addr, tls.server_credentials(files))
    except RuntimeError as exc:
        log.error("cannot listen on %s: %s", config.listen_addr, exc)
        return proc.EXIT_BOOT_ERROR
    if not port:
        log.error("cannot listen on %s", config.listen_addr)
        return proc.EXIT_BOOT_ERROR
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        loop.add_signal_handler(sig, stop.set)
    hub.start()
    await server.start()
    heartbeat = loop.create_task(proc.heartbeat_loop(spec))
    metrics.settle_own_pid()  # before the first flush: a dead predecessor may have had our pid
    reporter = loop.create_task(report_loop(hub))
    proc.notify_ready(spec)
    log.info("worker %d serving gRPC%s on %s", spec.index, "" if files is None else " over TLS", config.listen_addr)
    await stop.wait()
    log.info("worker %d stopping", spec.index)
    stopping = loop.create_task(server.stop(config.graceful_timeout_s))
    await asyncio.sleep(0)  # let the server stop accepting before streams are ended
    hub.end_streams(errors.WORKER_STOPPING)
    leases.stop(errors.WORKER_STOPPING)
    await stopping
    heartbeat.cancel()
    reporter.cancel()
    metrics.flush()  # what ended during the stop; calls still open are settled by the hub
    hub.close()
    return 0


def main(config: Config, spec: proc.ChildSpec) -> int:
    proc.child_init(spec, config.debug)
    return asyncio.run(serve(config, spec))
