"""The ``--metrics-addr`` HTTP/1.1 server of the hub: /health, /proxy/health, /metrics, /proxy/metrics.

It lives in the hub because the hub holds the upstream channel (for /health) and can read every
process's metrics files (for /proxy/metrics). A small server on asyncio streams: GET (and HEAD)
requests, keep-alive, bounded request heads, no request bodies beyond a small discarded one.
The Go proxy also answers these paths on the gRPC port (cmux); grpcio cannot share its port with
HTTP/1.1, so etcdproxy serves them on --metrics-addr only (docs/metrics.md).

Blocking work (reading the metrics files, fetching etcd's /metrics) runs in threads, so a slow
scrape never stalls the hub's event loop, which carries every client's traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import gzip
import logging
import socket
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from etcdproxy import health, metrics, proc, tls, upstream
from etcdproxy.config import self_address
from etcdproxy.h2 import aio
from etcdproxy.ipc import schema as s

if TYPE_CHECKING:
    from etcdproxy.hub.host import HttpHost

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 16 * 1024
MAX_BODY_BYTES = 64 * 1024
IDLE_TIMEOUT_S = 60.0
ETCD_METRICS_TIMEOUT_S = 5.0
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 500: "Internal Server Error"}
REASONS[503] = "Service Unavailable"
TEXT = "text/plain; charset=utf-8"


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = TEXT
    headers: tuple[tuple[str, str], ...] = ()


def http_error(status: int, text: str, *headers: tuple[str, str]) -> Response:
    """Go's http.Error: text/plain, nosniff, the text plus a newline."""
    return Response(status, text.encode() + b"\n", TEXT, (("X-Content-Type-Options", "nosniff"), *headers))


def listen_address(metrics_addr: str) -> tuple[str, int]:
    """``http://host:port`` -> (host, port); config.py has already validated the URL."""
    url = urlsplit(metrics_addr)
    return url.hostname or "", int(url.port or 0)


def etcd_metrics_urls(endpoints: tuple[str, ...], secure: bool = False) -> list[str]:
    scheme = "https" if secure else "http"
    return [f"{scheme}://{upstream.host_port(e)}/metrics" for e in endpoints if e]


def fetch(url: str, context: ssl.SSLContext | None = None) -> bytes:
    """GET ``url`` (blocking, for a thread); raises unless etcd answered 200."""
    with urllib.request.urlopen(url, timeout=ETCD_METRICS_TIMEOUT_S, context=context) as response:
        return bytes(response.read())


class MetricsServer:
    def __init__(self, hub: HttpHost) -> None:
        self.hub = hub
        self.config = hub.config
        self.server: asyncio.Server | None = None
        secure = tls.upstream_tls(self.config)
        self.etcd_urls = etcd_metrics_urls(self.config.endpoints, secure)
        # etcd's /metrics over https with the upstream TLS files, as Go
        self.etcd_context = tls.upstream_http_context(self.config) if secure else None
        self.server_files = tls.server_files(self.config)
        self.good_url = 0  # index of the etcd endpoint that answered last: tried first
        self.scrape_lock = asyncio.Lock()  # one exposition at a time: settle_dead is not reentrant
        self.self_channel: aio.AioChannel | None = None
        self.recent_leases = metrics.RecentLeases()
        self.connections: set[asyncio.Task[None]] = set()
        self._watch_keepalives()
        metrics.UPSTREAM_STATES.known.update(state.name for state in aio.ChannelConnectivity)

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        host, port = listen_address(self.config.metrics_addr)
        context = None
        if self.config.metrics_addr.startswith("https://"):
            assert self.server_files is not None  # config.py refuses https without a certificate
            context = tls.server_ssl_context(self.config, self.server_files)
        fd = getattr(self.hub.spec, "metrics_fd", None)
        if fd is not None:  # bound by the supervisor (kept across an upgrade): serve on it
            sock = socket.socket(fileno=fd)
            self.server = await asyncio.start_server(self._serve, sock=sock, ssl=context)
        else:
            self.server = await asyncio.start_server(self._serve, host or None, port, reuse_address=True, ssl=context)
        log.info("serving /health and /metrics on %s", self.config.metrics_addr)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self.connections):
            task.cancel()
        if self.self_channel is not None:
            await self.self_channel.close()

    def _watch_keepalives(self) -> None:
        """Note the lease of every keepalive on its way to the lease hub (leases_kept_alive)."""
        inner = self.hub.handlers.get(s.Kind.LEASE_KEEPALIVE)
        if inner is None:
            return
        recent, loop = self.recent_leases, self.hub.loop

        def on_keepalive(worker: Any, message: Any) -> None:
            recent.seen(message.lease_id, loop.time())
            inner(worker, message)

        self.hub.handlers[s.Kind.LEASE_KEEPALIVE] = on_keepalive

    # ---- HTTP/1.1 ------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self.connections.add(task)
        try:
            while await self._one_request(reader, writer):
                pass
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError):
            pass
        finally:
            if task is not None:
                self.connections.discard(task)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _one_request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False when the connection must close."""
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IDLE_TIMEOUT_S)
        if len(head) > MAX_HEAD_BYTES:
            await self._write(writer, http_error(400, "Bad Request"), "GET", False)
            return False
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            await self._write(writer, http_error(400, "Bad Request"), "GET", False)
            return False
        method, target, version = parts
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            await self._write(writer, http_error(400, "Bad Request"), method, False)
            return False
        length = int(headers.get("content-length", "0") or "0")
        if length > MAX_BODY_BYTES or length < 0:
            await self._write(writer, http_error(400, "Bad Request"), method, False)
            return False
        if length:
            await asyncio.wait_for(reader.readexactly(length), IDLE_TIMEOUT_S)
        connection = headers.get("connection", "").lower()
        keep_alive = "close" not in connection and (version != "HTTP/1.0" or "keep-alive" in connection)
        response = await self.route(method, urlsplit(target).path, headers)
        await self._write(writer, response, method, keep_alive)
        return keep_alive

    async def _write(self, writer: asyncio.StreamWriter, response: Response, method: str, keep_alive: bool) -> None:
        head = [
            f"HTTP/1.1 {response.status} {REASONS.get(response.status, '')}",
            f"Content-Type: {response.content_type}",
            f"Content-Length: {len(response.body)}",
            f"Date: {email.utils.formatdate(usegmt=True)}",
            *(f"{name}: {value}" for name, value in response.headers),
        ]
        if not keep_alive:
            head.append("Connection: close")
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        if method != "HEAD":
            writer.write(response.body)
        await writer.drain()

    # ---- routes --------------------------------------------------------------------------

    async def route(self, method: str, path: str, headers: dict[str, str]) -> Response:
        if path in ("/health", "/proxy/health"):
            if method != "GET":
                return http_error(405, "Method Not Allowed", ("Allow", "GET"))
            if proc.draining():  # a graceful stop began: load balancers must stop sending clients now
                return http_error(503, health.Health(False, health.DRAINING).body().decode())
            if path == "/health":
                result = await health.check_etcd(self.hub.channel)
            else:
                result = await health.check_proxy(self._proxy_channel())
            if result.healthy:
                return Response(200, result.body())
            return http_error(503, result.body().decode())
        if path == "/metrics":
            return await self.etcd_metrics()
        if path == "/proxy/metrics":
            body = await self.proxy_metrics()
            if "gzip" in headers.get("accept-encoding", ""):
                return Response(200, gzip.compress(body, 1), metrics.CONTENT_TYPE, (("Content-Encoding", "gzip"),))
            return Response(200, body, metrics.CONTENT_TYPE)
        return http_error(404, "404 page not found")

    def _proxy_channel(self) -> aio.AioChannel:
        """The self client of /proxy/health: to this instance's own --listen-addr (loopback for a
        wildcard address). Go dials --advertise-client-url, whose default names another instance
        whenever --listen-addr differs, and which behind a load balancer is not this instance."""
        if self.self_channel is None:
            target = self_address(self.config.listen_addr)
            if self.server_files is not None:
                # the proxy's listener is TLS: dial it like Go's self client does
                # the certificate names the advertised host; check it against that name, not loopback
                advertised = urlsplit("//" + upstream.host_port(self.config.advertise_client_url)).hostname
                host, port = upstream.split_host_port(target)
                context = tls.self_client_ssl_context(self.server_files)
                self.self_channel = aio.AioChannel(host, port, ssl_context=context, server_hostname=advertised or host)
            else:
                self.self_channel = aio.AioChannel(*upstream.split_host_port(target))
        return self.self_channel

    async def etcd_metrics(self) -> Response:
        """etcd's own /metrics from the first endpoint that answers, starting with the last good one
        (Go fixes one endpoint at start-up and returns 200 whatever it got)."""
        count = len(self.etcd_urls)
        errors: list[str] = []
        for i in range(count):
            index = (self.good_url + i) % count
            url = self.etcd_urls[index]
            try:
                body = await asyncio.to_thread(fetch, url, self.etcd_context)
            except (OSError, urllib.error.URLError, ValueError) as exc:
                errors.append(f"{url}: {exc}")
                continue
            self.good_url = index
            return Response(200, body, "text/plain; version=0.0.4")
        log.warning("no etcd endpoint served /metrics: %s", "; ".join(errors))
        return http_error(500, "Internal server error")

    async def proxy_metrics(self) -> bytes:
        self.refresh_hub_gauges()
        async with self.scrape_lock:
            return await asyncio.to_thread(metrics.exposition)

    def refresh_hub_gauges(self) -> None:
        """Gauges the hub owns, computed at scrape time (always current, free between scrapes)."""
        hub = self.hub
        c_watchers, s_watchers = hub.watches.c_watchers, hub.watches.s_watchers
        metrics.C_WATCHERS.set(c_watchers)
        metrics.S_WATCHERS.set(s_watchers)
        metrics.WATCHERS_COALESCING.set(max(c_watchers - s_watchers, 0))
        state = hub.channel.get_state(try_to_connect=False)
        metrics.UPSTREAM_STATES.set([state.name])
        metrics.LEASES_KEPT_ALIVE.set(self.recent_leases.count(hub.loop.time()))
        backlog = sum(hub.link.backlog_depth(identity) for identity in hub.workers)
        metrics.IPC_QUEUE_DEPTH.labels("hub_backlog").set(backlog)
