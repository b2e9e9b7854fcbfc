"""A worker process: our own HTTP/2 + gRPC server (etcdproxy.h2) on the client port, talking to the hub over IPC.

Workers share --listen-addr: a socket the supervisor bound and passed down (``spec.listen_fd``), or, without one,
each worker's own SO_REUSEPORT socket (the supervisor's port guard makes sure no other program holds the port).
On the shared socket a worker takes a connection only when it is among the least loaded (worker/balance.py).
No grpcio in this process: the transport, handlers and status codes are etcdproxy's own.

Lifecycle: fork -> main() -> serve() until SIGTERM; then drain: every connection gets a graceful GOAWAY while
the listener keeps accepting for ``drain_delay_s`` (new connections are told to go away at once, so a load
balancer's health check has time to notice), then the listener closes, unary calls get ``graceful_timeout_s``
to finish, and long-lived streams end with UNAVAILABLE (clients reconnect elsewhere).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket

from etcdproxy import metrics, proc, tls
from etcdproxy.config import Config
from etcdproxy.core import errors
from etcdproxy.h2.protocol import Server, ServerOptions
from etcdproxy.h2.rpc import Dispatcher
from etcdproxy.h2.server import Settings
from etcdproxy.worker import balance
from etcdproxy.worker.cache import RangeService
from etcdproxy.worker.handlers import Handlers
from etcdproxy.worker.http import HttpRelay
from etcdproxy.worker.hubclient import HubClient
from etcdproxy.worker.instrument import report_loop
from etcdproxy.worker.lease import LeaseServicer
from etcdproxy.worker.namespace import LeaseRevokeGuard, namespace_of
from etcdproxy.worker.watch import WatchService

log = logging.getLogger(__name__)


def server_options(config: Config) -> ServerOptions:
    settings = Settings(
        max_concurrent_streams=config.max_concurrent_streams,
        # Not Go's fixed 4 MiB, which answers for etcd (etcd issue 11984): by default a memory guard
        # well above etcd's own limit, so etcd's answer reaches the client (Config.server_max_receive_bytes).
        max_receive_message=config.server_max_receive_bytes,
        # etcd's keepalive enforcement: clients may ping no more often than min-time while they have calls,
        # and not at all without (grpc-go's PermitWithoutStream=false)
        keepalive_min_time_s=config.grpc_keepalive_min_time_s,
    )
    return ServerOptions(settings, config.grpc_keepalive_interval_s, config.grpc_keepalive_timeout_s)


def _split_host_port(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


async def serve(config: Config, spec: proc.ChildSpec) -> int:
    loop = asyncio.get_running_loop()
    hub = HubClient(proc.hub_endpoint(spec.run_dir), spec.index, loop)
    namespace = namespace_of(config)  # --namespace: see docs/namespace.md
    handlers = Handlers(hub, namespace)
    handlers.overrides["/etcdserverpb.Watch/Watch"] = WatchService(hub, namespace).handler()
    if namespace is not None:
        handlers.overrides["/etcdserverpb.Lease/LeaseRevoke"] = LeaseRevokeGuard(hub, namespace).handler()
    leases = LeaseServicer(hub, config.lease_keepalive_window_s)
    handlers.overrides["/etcdserverpb.Lease/LeaseKeepAlive"] = leases.handler()
    if config.cache:
        handlers.overrides["/etcdserverpb.KV/Range"] = RangeService(hub, config, namespace).handler()
    options = server_options(config)
    options.http_app = HttpRelay(hub)
    server = Server(Dispatcher(handlers.method_handlers(), loop), options, loop)
    files = tls.server_files(config)
    context = None if files is None else tls.grpc_server_ssl_context(config, files)
    listen_fd = getattr(spec, "listen_fd", None)
    seat: balance.Seat | None = None
    try:
        if listen_fd is not None:
            sock = socket.socket(fileno=listen_fd)
            seat = balance.Seat(balance.Board(spec.run_dir), spec.index, spec.generation, os.getpid())
            await server.listen(sock=sock, ssl_context=context, admission=seat)
        else:
            host, port = _split_host_port(config.listen_addr)
            await server.listen(host=host, port=port, ssl_context=context, reuse_port=True)
    except OSError as exc:
        log.error("cannot listen on %s: %s", config.listen_addr, exc)
        return proc.EXIT_BOOT_ERROR
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        loop.add_signal_handler(sig, stop.set)
    hub.start()
    heartbeat = loop.create_task(proc.heartbeat_loop(spec))
    metrics.settle_own_pid()  # before the first flush: a dead predecessor may have had our pid
    reporter = loop.create_task(report_loop(hub))
    proc.notify_ready(spec)
    log.info("worker %d serving gRPC%s on %s", spec.index, "" if files is None else " over TLS", config.listen_addr)
    await stop.wait()
    log.info("worker %d stopping", spec.index)
    await drain(server, config, hub, leases)
    heartbeat.cancel()
    reporter.cancel()
    metrics.flush()  # what ended during the stop; calls still open are settled by the hub
    hub.close()
    if seat is not None:
        seat.leave()
    return 0


async def drain(server: Server, config: Config, hub: HubClient, leases: LeaseServicer) -> None:
    """Graceful stop: GOAWAY everyone (keep accepting for the drain delay), close the listener, let unary calls
    finish within the graceful timeout, end the long streams with UNAVAILABLE (clients reconnect elsewhere)."""
    loop = asyncio.get_running_loop()
    server.start_drain()
    delay = float(getattr(config, "drain_delay_s", 0.0))
    deadline = loop.time() + delay
    # the full delay even with no connection left: a load balancer's health check must see the 503 first
    while loop.time() < deadline:  # noqa: ASYNC110 - a deadline, not a condition to wait for
        await asyncio.sleep(min(0.1, max(0.0, deadline - loop.time())))
    server.close_listeners()
    server.start_drain()  # the connections accepted during the delay (served meanwhile, never told at once)
    hub.end_streams(errors.WORKER_STOPPING)
    leases.stop(errors.WORKER_STOPPING)
    deadline = loop.time() + config.graceful_timeout_s
    while loop.time() < deadline and server.active_calls():  # noqa: ASYNC110 - calls end in many places
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.05)  # the last answers' writes
    server.close_all()


def main(config: Config, spec: proc.ChildSpec) -> int:
    proc.child_init(spec, config.debug)
    try:
        import uvloop  # faster, above all with TLS (DESIGN.md section 6); optional
    except ImportError:
        return asyncio.run(serve(config, spec))
    return uvloop.run(serve(config, spec))
