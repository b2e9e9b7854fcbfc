"""Watch hub at scale and under faults (issue 4), with grpc.aio clients in the test process.

* 1,000 c-watchers on one key over 20 connections spread over ``--workers 2`` cost etcd exactly
  one watcher more (``etcd_debugging_mvcc_watcher_total``), and each gets every event once, in
  order. Fixed internal watchers of the proxy are part of the baseline, which is taken once the
  proxy is up: today that is the range cache's whole-keyspace invalidation watch (hub/cache.py,
  one upstream watcher while ``--cache`` is on).
* kill -9 of the hub while 100 c-watchers watch and a writer writes directly to etcd: every
  c-watcher still gets every revision exactly once, in order, on its original stream, with one
  created response.
* The hub's TCP connection to etcd cut twice under writes: no gap, no duplicate, no second created.
* A client that stops reading does not change the put-to-receive latency of 100 others; it is
  cancelled with a reason after a bounded buffer; a late reader gets responses a default grpc
  client accepts (< 4 MiB).

Every proxy is started by the ``proxy`` fixture and stopped by pid.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from etcdproxy.etcdpb import rpc_pb2, rpc_pb2_grpc
from tests.helpers import (
    LOCALHOST,
    EtcdServer,
    ProxyProcess,
    child_pid,
    children_with_titles,
    established_connections,
    free_port,
    http_get,
    sum_metric,
    wait_until,
)

pytestmark = pytest.mark.e2e

METRIC = "etcd_debugging_mvcc_watcher_total"
_ids = itertools.count()


def unique_key(tag: str) -> bytes:
    return f"/watch-scale/{tag}/{os.getpid()}-{next(_ids)}-{time.monotonic_ns()}".encode()


def new_channel(endpoint: str) -> grpc.aio.Channel:
    """A channel with its own TCP connection (grpc otherwise shares subchannels between channels)."""
    return grpc.aio.insecure_channel(endpoint, options=[("grpc.use_local_subchannel_pool", 1)])


# --------------------------------------------------------------------------- an aio Watch stream


@dataclass
class AioStream:
    """One Watch stream with several watchers on one key; a reader task records what arrives."""

    channel: grpc.aio.Channel
    call: grpc.aio.StreamStreamCall[rpc_pb2.WatchRequest, rpc_pb2.WatchResponse]
    revisions: dict[int, list[int]] = field(default_factory=dict)  # watch id -> event revisions
    arrivals: dict[int, list[float]] = field(default_factory=dict)  # watch id -> perf_counter per event
    created: dict[int, int] = field(default_factory=dict)  # watch id -> created responses
    created_header: dict[int, int] = field(default_factory=dict)
    other: list[rpc_pb2.WatchResponse] = field(default_factory=list)  # cancels and the like
    ended: BaseException | None = None
    task: asyncio.Task[None] | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @classmethod
    async def open(cls, channel: grpc.aio.Channel, key: bytes, watchers: int, read: bool = True) -> AioStream:
        call = rpc_pb2_grpc.WatchStub(channel).Watch()
        stream = cls(channel, call)
        for _ in range(watchers):
            await call.write(rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(key=key)))
        if read:
            stream.task = asyncio.create_task(stream._read())
        return stream

    async def _read(self) -> None:
        try:
            while True:
                resp = await self.call.read()
                now = time.perf_counter()
                if resp is grpc.aio.EOF:
                    self.ended = EOFError("stream ended")
                    return
                if resp.created:
                    self.created[resp.watch_id] = self.created.get(resp.watch_id, 0) + 1
                    self.created_header[resp.watch_id] = resp.header.revision
                if resp.events:
                    revs = self.revisions.setdefault(resp.watch_id, [])
                    times = self.arrivals.setdefault(resp.watch_id, [])
                    for event in resp.events:
                        revs.append(event.kv.mod_revision)
                        times.append(now)
                elif not resp.created:
                    self.other.append(resp)
                self.changed.set()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self.ended = exc
            self.changed.set()

    def reached(self, revision: int, watchers: int) -> bool:
        return len(self.revisions) == watchers and all(r and r[-1] >= revision for r in self.revisions.values())

    async def close(self) -> None:
        self.call.cancel()
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        await self.channel.close()


async def open_streams(endpoint: str, key: bytes, connections: int, per_stream: int) -> list[AioStream]:
    streams = [await AioStream.open(new_channel(endpoint), key, per_stream) for _ in range(connections)]

    async def all_created() -> None:
        while sum(len(s.created) for s in streams) < connections * per_stream:
            dead = [s.ended for s in streams if s.ended is not None]
            assert not dead, dead
            await asyncio.sleep(0.02)

    await asyncio.wait_for(all_created(), 30)
    return streams


async def wait_reached(streams: list[AioStream], revision: int, per_stream: int, timeout: float) -> None:  # noqa: ASYNC109
    async def done() -> None:
        while not all(s.reached(revision, per_stream) for s in streams):
            dead = [s.ended for s in streams if s.ended is not None]
            assert not dead, dead
            await asyncio.sleep(0.02)

    try:
        await asyncio.wait_for(done(), timeout)
    except TimeoutError:
        behind = sum(not s.reached(revision, per_stream) for s in streams)
        raise AssertionError(f"{behind} of {len(streams)} streams did not reach revision {revision}") from None


async def close_all(streams: list[AioStream]) -> None:
    await asyncio.gather(*(s.close() for s in streams), return_exceptions=True)


async def put(kv: rpc_pb2_grpc.KVStub, key: bytes, value: bytes) -> int:
    resp = await kv.Put(rpc_pb2.PutRequest(key=key, value=value), timeout=10)
    return int(resp.header.revision)


# --------------------------------------------------------------------------- processes


def stable_metric(etcd: EtcdServer) -> float:
    """The watcher gauge once it stopped moving (0.5 s apart)."""

    seen: list[float] = []

    def settled() -> bool:
        first = etcd.metric(METRIC)
        time.sleep(0.5)
        seen.append(first)
        return etcd.metric(METRIC) == first

    wait_until(settled, 15, f"{METRIC} to settle")
    return seen[-1]


# --------------------------------------------------------------------------- 1,000 c-watchers


@pytest.mark.timeout(90)
@pytest.mark.parametrize("which", ["direct", "proxy"])
def test_thousand_watchers_cost_one_upstream_watcher(
    which: str, etcd_server: EtcdServer, proxy: Callable[..., ProxyProcess]
) -> None:
    """1,000 c-watchers (20 connections x 50) on one key: etcd +1 watcher through the proxy
    (+1,000 directly); every watcher gets all 20 events once, in order."""
    metrics_url = f"http://{LOCALHOST}:{free_port()}"
    running = proxy(workers=2, extra_args=(f"--metrics-addr={metrics_url}",)) if which == "proxy" else None
    endpoint = running.endpoint if running is not None else etcd_server.endpoint
    scraped: dict[str, float] = {}

    def proxy_metric(name: str) -> float:
        status, text = http_get(f"{metrics_url}/proxy/metrics")
        assert status == 200, text
        return sum_metric(text, name, {})

    workers = []
    if running is not None:
        workers = [pid for pid, cmd in children_with_titles(running.proc.pid).items() if "worker" in cmd]
        assert len(workers) == 2
    baseline = stable_metric(etcd_server)
    key = unique_key("thousand")
    per_worker: list[int] = []

    async def run() -> tuple[float, list[int], list[AioStream]]:
        streams = await open_streams(endpoint, key, connections=20, per_stream=50)
        try:
            if running is not None:
                per_worker.extend(established_connections(pid, running.port) for pid in workers)
            await asyncio.sleep(0.5)  # let any late upstream watcher show up before counting
            loop = asyncio.get_running_loop()
            watchers = await loop.run_in_executor(None, stable_metric, etcd_server)
            if running is not None:
                for name in ("etcd_grpc_proxy_watchers_coalescing_total", "etcd_grpc_proxy_events_coalescing_total"):
                    scraped[name] = await loop.run_in_executor(None, proxy_metric, name)
            async with grpc.aio.insecure_channel(etcd_server.endpoint) as direct:
                kv = rpc_pb2_grpc.KVStub(direct)
                written = [await put(kv, key, f"v{i}".encode()) for i in range(20)]
            await wait_reached(streams, written[-1], 50, 30)
            if running is not None:
                name = "etcd_grpc_proxy_events_coalescing_total"
                scraped["events delta"] = await loop.run_in_executor(None, proxy_metric, name) - scraped[name]
            return watchers, written, streams
        finally:
            await close_all(streams)

    watchers, written, streams = asyncio.run(asyncio.wait_for(run(), 75))
    print(f"\n{which}: etcd watchers {baseline} -> {watchers}; client connections per worker {per_worker}")
    if running is not None:
        assert sum(per_worker) == 20 and min(per_worker) >= 1, f"connections per worker: {per_worker}"
    assert watchers - baseline == (1 if which == "proxy" else 1000)
    for stream in streams:
        assert sorted(stream.created.values()) == [1] * 50
        for revs in stream.revisions.values():
            assert revs == written
        assert not stream.other
    if running is not None:
        # SPEC 4.11: watchers_coalescing = c-watchers - s-watchers; events += receivers - 1 per response
        print(f"proxy metrics: {scraped}")
        assert scraped["etcd_grpc_proxy_watchers_coalescing_total"] == 999
        assert scraped["events delta"] >= 20 * 999
        wait_until(lambda: etcd_server.metric(METRIC) == baseline, 10, f"{METRIC} back to the baseline")
        assert proxy_metric("etcd_grpc_proxy_watchers_coalescing_total") == 0


# --------------------------------------------------------------------------- kill -9 the hub


@pytest.mark.timeout(90)
def test_hub_killed_while_watching_loses_nothing(etcd_server: EtcdServer, proxy: Callable[..., ProxyProcess]) -> None:
    """100 c-watchers (10 connections x 10), a writer writing directly to etcd, kill -9 of the
    hub mid-way: every revision exactly once, in order, on the original streams, one created."""
    running = proxy(workers=2)
    supervisor = running.proc.pid
    hub = child_pid(supervisor, "etcdproxy: hub")
    assert hub is not None
    key = unique_key("hubkill")

    async def run() -> tuple[list[int], list[AioStream], int]:
        streams = await open_streams(running.endpoint, key, connections=10, per_stream=10)
        written: list[int] = []
        try:
            async with grpc.aio.insecure_channel(etcd_server.endpoint) as direct:
                kv = rpc_pb2_grpc.KVStub(direct)
                start = time.monotonic()
                killed_at = 0
                while time.monotonic() - start < 3.0:
                    written.append(await put(kv, key, f"v{len(written)}".encode()))
                    if not killed_at and time.monotonic() - start > 1.0:
                        os.kill(hub, signal.SIGKILL)
                        killed_at = len(written)
                    await asyncio.sleep(0.01)
            await wait_reached(streams, written[-1], 10, 30)
            new_hub = child_pid(supervisor, "etcdproxy: hub")
            assert len(written) - killed_at >= 20, f"only {len(written) - killed_at} writes after the kill"
            return written, streams, new_hub or 0
        finally:
            await close_all(streams)

    written, streams, new_hub = asyncio.run(asyncio.wait_for(run(), 75))
    assert new_hub not in (0, hub), "the hub was not replaced"
    for stream in streams:
        assert stream.ended is None
        assert sorted(stream.created.values()) == [1] * 10
        assert all(h < written[0] for h in stream.created_header.values())
        for revs in stream.revisions.values():
            assert revs == written
        assert not stream.other, stream.other


# --------------------------------------------------------------------------- the upstream connection breaks


class ThreadRelay:
    """A TCP relay (own thread and event loop) between the proxy and etcd; cut() drops every
    relayed connection at once, new connections are still accepted."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.loop = asyncio.new_event_loop()
        self.transports: list[asyncio.BaseTransport] = []
        self.ready = threading.Event()
        self.port = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(10)

    @property
    def endpoint(self) -> str:
        return f"{LOCALHOST}:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._accept, LOCALHOST, 0))
        self.port = server.sockets[0].getsockname()[1]
        self.ready.set()
        try:
            self.loop.run_forever()
        finally:
            server.close()
            self._cut()
            pending = asyncio.all_tasks(self.loop)
            for task in pending:
                task.cancel()
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.transport.abort()
            return
        self.transports += [writer.transport, up_writer.transport]
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True)

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        finally:
            dst.transport.abort()

    def _cut(self) -> None:
        transports, self.transports = self.transports, []
        for transport in transports:
            transport.abort()  # type: ignore[attr-defined]

    def cut(self) -> None:
        self.loop.call_soon_threadsafe(self._cut)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@pytest.mark.timeout(90)
def test_upstream_connection_breaks_lose_nothing(etcd_server: EtcdServer, proxy: Callable[..., ProxyProcess]) -> None:
    """The hub's connection to etcd is cut twice while a writer writes directly to etcd: the
    s-watchers resume with no gap, no duplicate and no second created response (50 watchers on
    a key and 10 on a prefix, over 6 connections)."""
    relay = ThreadRelay(etcd_server.endpoint)
    try:
        running = proxy(endpoints=[relay.endpoint], workers=2)
        key = unique_key("cut")

        async def run() -> tuple[list[int], list[int], list[AioStream], list[AioStream]]:
            on_key = await open_streams(running.endpoint, key, connections=5, per_stream=10)
            on_prefix_call = [await AioStream.open(new_channel(running.endpoint), b"", 0)]
            stream = on_prefix_call[0]
            for _ in range(10):
                create = rpc_pb2.WatchCreateRequest(key=key, range_end=key[:-1] + bytes([key[-1] + 1]))
                await stream.call.write(rpc_pb2.WatchRequest(create_request=create))
            while len(stream.created) < 10:
                assert stream.ended is None, stream.ended
                await asyncio.sleep(0.02)
            written: list[int] = []
            others: list[int] = []
            try:
                async with grpc.aio.insecure_channel(etcd_server.endpoint) as direct:
                    kv = rpc_pb2_grpc.KVStub(direct)
                    start = time.monotonic()
                    cuts = 0
                    while time.monotonic() - start < 3.0:
                        written.append(await put(kv, key, f"v{len(written)}".encode()))
                        if len(written) % 5 == 0:  # prefix-only events too
                            others.append(await put(kv, key + b"/sub", b"x"))
                        if cuts < 2 and time.monotonic() - start > 1.0 + cuts:
                            relay.cut()
                            cuts += 1
                        await asyncio.sleep(0.01)
                await wait_reached(on_key, written[-1], 10, 30)
                await wait_reached(on_prefix_call, max(written[-1], others[-1]), 10, 30)
                return written, others, on_key, on_prefix_call
            finally:
                await close_all(on_key + on_prefix_call)

        written, others, on_key, on_prefix = asyncio.run(asyncio.wait_for(run(), 75))
    finally:
        relay.close()
    both = sorted(written + others)
    for stream in on_key + on_prefix:
        assert stream.ended is None
        assert sorted(stream.created.values()) == [1] * 10
        assert not stream.other, stream.other
        for revs in stream.revisions.values():
            assert revs == (written if stream in on_key else both)


# --------------------------------------------------------------------------- a client that stops reading


@pytest.mark.timeout(60)
@pytest.mark.parametrize("which", ["direct", "proxy"])
def test_late_reader_gets_responses_within_grpc_limits(
    which: str, etcd_server: EtcdServer, shared_proxy: ProxyProcess
) -> None:
    """A watcher that reads late, after 8 puts of 1 MB: every event arrives, in responses a
    default grpc client accepts (etcd: one per revision; the proxy once merged all pending
    revisions into one 5-8 MB message, which the client refused with RESOURCE_EXHAUSTED)."""
    endpoint = shared_proxy.endpoint if which == "proxy" else etcd_server.endpoint
    key = unique_key("late")

    async def run() -> tuple[list[int], list[tuple[int, int]]]:
        async with (
            grpc.aio.insecure_channel(endpoint) as channel,
            grpc.aio.insecure_channel(etcd_server.endpoint) as direct,
        ):
            call = rpc_pb2_grpc.WatchStub(channel).Watch()
            await call.write(rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(key=key)))
            assert (await call.read()).created
            kv = rpc_pb2_grpc.KVStub(direct)
            written = [await put(kv, key, b"x" * 1_000_000) for _ in range(8)]
            await asyncio.sleep(0.5)  # the client reads nothing meanwhile
            responses: list[tuple[int, int]] = []
            revisions: list[int] = []
            while len(revisions) < len(written):
                resp = await asyncio.wait_for(call.read(), 10)
                assert resp is not grpc.aio.EOF
                revisions += [e.kv.mod_revision for e in resp.events]
                responses.append((len(resp.events), resp.ByteSize()))
            call.cancel()
            assert revisions == written
            return written, responses

    _, responses = asyncio.run(asyncio.wait_for(run(), 45))
    assert all(size < 4 * 1024 * 1024 for _, size in responses), responses


async def measure(endpoint: str, direct_endpoint: str, key: bytes, stalled: bool) -> tuple[float, int]:
    """p50 put-to-receive latency (ms) over 100 watchers for 40 puts of 16 KiB at 20/s.

    With ``stalled``, another client first opens 20 watchers on the same key on its own
    connection and never reads. Returns (p50 ms, deliveries).
    """
    streams = await open_streams(endpoint, key, connections=10, per_stream=10)
    stall: AioStream | None = None
    sent: dict[int, float] = {}
    try:
        if stalled:
            stall = await AioStream.open(new_channel(endpoint), key, 20, read=False)
            await asyncio.sleep(0.3)
        async with grpc.aio.insecure_channel(direct_endpoint) as direct:
            kv = rpc_pb2_grpc.KVStub(direct)
            pad = b"x" * 16384
            for i in range(40):
                t0 = time.perf_counter()
                rev = await put(kv, key, pad + str(i).encode())
                sent[rev] = t0
                await asyncio.sleep(0.05)
        await wait_reached(streams, max(sent), 10, 30)
    finally:
        if stall is not None:
            await stall.close()
        await close_all(streams)
    latencies = [
        (at - sent[rev]) * 1000
        for s in streams
        for wid, revs in s.revisions.items()
        for rev, at in zip(revs, s.arrivals[wid], strict=True)
        if rev in sent
    ]
    return statistics.median(latencies), len(latencies)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("which", ["direct", "proxy"])
def test_stalled_client_does_not_delay_others(
    which: str, etcd_server: EtcdServer, proxy: Callable[..., ProxyProcess]
) -> None:
    """p50 put-to-receive of 100 watchers with and without a stalled client on the same key
    differs by less than 20 ms (best of two runs without and one with; one more round of each
    if that is not enough, to absorb machine noise)."""
    running = proxy(workers=2) if which == "proxy" else None
    endpoint = running.endpoint if running is not None else etcd_server.endpoint

    async def run(rounds: int) -> dict[str, list[tuple[float, int]]]:
        out: dict[str, list[tuple[float, int]]] = {"without": [], "stalled": []}
        for _ in range(rounds):
            out["without"].append(await measure(endpoint, etcd_server.endpoint, unique_key("lat"), stalled=False))
            out["stalled"].append(await measure(endpoint, etcd_server.endpoint, unique_key("lat"), stalled=True))
        out["without"].append(await measure(endpoint, etcd_server.endpoint, unique_key("lat"), stalled=False))
        return out

    def difference(results: dict[str, list[tuple[float, int]]]) -> float:
        for runs in results.values():
            assert all(deliveries == 100 * 40 for _, deliveries in runs), results
        # best of each: machine noise only ever adds latency, a real delay shows in every run
        return min(p50 for p50, _ in results["stalled"]) - min(p50 for p50, _ in results["without"])

    results = asyncio.run(asyncio.wait_for(run(1), 80))
    if difference(results) >= 20:  # one more round before calling it a delay
        more = asyncio.run(asyncio.wait_for(run(1), 80))
        results = {name: results[name] + more[name] for name in results}
    print(f"\n{which}: p50 put->receive ms (p50, deliveries): {results}; difference {difference(results):.1f} ms")
    assert difference(results) < 20, results


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@pytest.mark.timeout(90)
def test_stalled_client_is_cancelled_with_a_reason(etcd_server: EtcdServer, proxy: Callable[..., ProxyProcess]) -> None:
    """A client that stops reading is cancelled after a bounded buffer (64 MiB of events): each of
    its watches ends with canceled + a reason after a gapless prefix of the events, the worker's
    memory stays bounded, and a reader on the same key keeps receiving everything."""
    running = proxy(workers=2)
    workers = [pid for pid, cmd in children_with_titles(running.proc.pid).items() if "worker" in cmd]
    rss_before = {pid: rss_kib(pid) for pid in workers}
    key = unique_key("stalled")

    async def run() -> tuple[list[int], AioStream, list[AioStream], dict[int, int]]:
        readers = await open_streams(running.endpoint, key, connections=1, per_stream=1)
        stalled = await AioStream.open(new_channel(running.endpoint), key, 100, read=False)
        peak: dict[int, int] = {}
        try:
            await asyncio.sleep(0.5)
            async with grpc.aio.insecure_channel(etcd_server.endpoint) as direct:
                kv = rpc_pb2_grpc.KVStub(direct)
                value = b"x" * 32768
                written = []
                # 100 watchers x 45 x 32 KiB = 144 MiB for the stalled client: the limit (64 MiB) is
                # passed even if its gRPC library and the kernel take in 20+ MiB (seen: up to 22 MiB)
                for _ in range(45):
                    written.append(await put(kv, key, value))
                    for pid in workers:
                        peak[pid] = max(peak.get(pid, 0), rss_kib(pid))
            await wait_reached(readers, written[-1], 1, 30)
            stalled.task = asyncio.create_task(stalled._read())  # start reading at last

            async def all_cancelled() -> None:
                while len({r.watch_id for r in stalled.other if r.canceled}) < 100:
                    assert stalled.ended is None, stalled.ended
                    await asyncio.sleep(0.05)

            await asyncio.wait_for(all_cancelled(), 30)
            return written, stalled, readers, peak
        finally:
            await close_all([stalled, *readers])

    written, stalled, readers, peak = asyncio.run(asyncio.wait_for(run(), 75))
    growth_mib = max(peak[pid] - rss_before[pid] for pid in workers) / 1024
    print(f"\nworker RSS growth with a stalled client: peak {growth_mib:.0f} MiB")
    assert len(stalled.created) == 100
    for response in stalled.other:
        assert response.canceled and response.cancel_reason, response
    for revs in stalled.revisions.values():
        assert revs == written[: len(revs)], "the events before the cancel have a gap"
    assert list(readers[0].revisions.values()) == [written]
    assert growth_mib < 400, f"worker RSS grew by {growth_mib:.0f} MiB"
