"""Abuse limits of the client port (notes/h2_contract.md, issue 11), one test per limit.

Each test drives one abusive raw connection (tests/h2/rawclient.py) against a one-worker proxy (so the
abuser and the well-behaved client share a worker) while a grpcio client on its own connection keeps
calling Range. It checks that the abusive connection is closed (GOAWAY ENHANCE_YOUR_CALM or the error the
contract names, or a plain close), that the well-behaved client saw no error, and its p99 latency during
the abuse (loosely: < 1 s on a shared 2-core machine). Floods are bounded (a few thousand frames, a few
seconds) so the whole file stays well under a minute against a proxy that enforces its limits.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from etcdproxy.etcdpb import rpc_pb2, rpc_pb2_grpc
from tests.conftest import ProxyLauncher
from tests.h2.conftest import deviates
from tests.h2.rawclient import (
    ACK,
    COMPRESSION_ERROR,
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    ENHANCE_YOUR_CALM,
    GOAWAY,
    HEADERS,
    PING,
    PREFACE,
    PROTOCOL_ERROR,
    REFUSED_STREAM,
    RST_STREAM,
    SETTINGS,
    SETTINGS_TIMEOUT,
    WATCH_PATH,
    ConnectionClosed,
    H2Client,
    frame_bytes,
    grpc_message,
    grpc_request_headers,
    hpack_literal,
    range_request,
    tls_context,
    watch_create_request,
)
from tests.helpers import (
    LOCALHOST,
    READY_LINE,
    ROOT,
    EtcdServer,
    ProxyProcess,
    descendants,
    free_port,
    proxy_command,
    proxy_impl,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)

P99_LIMIT_S = 1.0
_GO_NO_LIMIT = "grpc-go 1.38 has no such limit: no GOAWAY and no close within 5 s after the flood"
_CORE_NO_LIMIT = "grpc-core has no such limit: no GOAWAY and no close within 5 s after the flood"
DEVIATIONS: dict[str, dict[str, str]] = {
    "go": {
        "test_rapid_reset": "grpc-go 1.38 predates the CVE-2023-44487 fix: 6,000 reset streams, no GOAWAY",
        "test_control_frame_flood[PING ACK]": _GO_NO_LIMIT,
        "test_control_frame_flood[SETTINGS]": _GO_NO_LIMIT,
        "test_control_frame_flood[unknown type]": _GO_NO_LIMIT,
        "test_control_frame_flood[PRIORITY]": _GO_NO_LIMIT,
        "test_control_frame_flood[WINDOW_UPDATE]": _GO_NO_LIMIT,
        "test_empty_data_flood": _GO_NO_LIMIT,
        "test_empty_continuation_flood": _GO_NO_LIMIT,
        "test_hpack_bomb": "grpc-go refuses that stream (RST_STREAM FRAME_SIZE_ERROR), keeps the connection",
        "test_header_list_over_the_limit": "grpc-go's header list limit is 16 MiB: the 80 KB request is served",
        "test_no_preface_closed": "grpc-go (ConnectionTimeout 120 s) leaves it open past 14 s",
        "test_settings_never_acked": "grpc-go has no SETTINGS ACK timeout: no GOAWAY within 14 s",
        "test_tls_handshake_stalled": "grpc-go (ConnectionTimeout 120 s) leaves it open past 14 s",
        "test_tls_alpn_http11_health": "the Go proxy selects no ALPN protocol when offered only http/1.1",
        "test_tls_flood_limit": _GO_NO_LIMIT,
    },
    "grpcio": {
        "test_rapid_reset": "grpc-core: 6,000 reset streams, no GOAWAY and no close within 5 s",
        "test_control_frame_flood[PING ACK]": _CORE_NO_LIMIT,
        "test_control_frame_flood[SETTINGS]": _CORE_NO_LIMIT,
        "test_control_frame_flood[unknown type]": _CORE_NO_LIMIT,
        "test_control_frame_flood[PRIORITY]": _CORE_NO_LIMIT,
        "test_control_frame_flood[WINDOW_UPDATE]": _CORE_NO_LIMIT,
        "test_empty_data_flood": _CORE_NO_LIMIT,
        "test_continuation_flood": "grpc-core takes 4 MiB of CONTINUATION without a GOAWAY or a close",
        "test_empty_continuation_flood": _CORE_NO_LIMIT,
        "test_hpack_bomb": "grpc-core refuses that stream (trailers-only, RST_STREAM NO_ERROR), keeps the connection",
        "test_no_preface_closed": "grpc-core leaves a connection without a preface open past 14 s",
        "test_settings_never_acked": "grpc-core has no SETTINGS ACK timeout: no GOAWAY within 14 s",
        "test_tls_handshake_stalled": "grpc-core leaves a stalled TLS handshake open past 14 s",
        "test_tls_alpn_http11_health": "grpc-core selects no ALPN protocol when offered only http/1.1",
        "test_tls_flood_limit": _CORE_NO_LIMIT,
    },
}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def abuse_proxy(etcd_server: EtcdServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    """One worker: the abusive connection and the well-behaved client land on the same event loop."""
    launcher = ProxyLauncher(tmp_path_factory.mktemp("abuse"), lambda: etcd_server)
    proxy = launcher(workers=1)
    yield proxy
    problems = launcher.close(failed=False)
    assert not problems, problems


@pytest.fixture
def abuser(abuse_proxy: ProxyProcess) -> Iterator[Callable[..., H2Client]]:
    opened: list[H2Client] = []

    def make(*, handshake: bool = True) -> H2Client:
        c = H2Client(LOCALHOST, abuse_proxy.port, timeout=5)
        opened.append(c)
        if handshake:
            c.connect()
        return c

    yield make
    for c in opened:
        c.close()
    assert abuse_proxy.alive(), abuse_proxy.log_tail()


@dataclass
class LatencyProbe:
    """A well-behaved grpcio client on its own connection: Range every 10 ms, latencies recorded."""

    endpoint: str
    samples: list[tuple[float, float]] = field(default_factory=list)  # (start, latency)
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.channel = grpc.insecure_channel(self.endpoint, options=[("grpc.use_local_subchannel_pool", 1)])
        self.kv = rpc_pb2_grpc.KVStub(self.channel)
        self.kv.Range(rpc_pb2.RangeRequest(key=b"h2abuse/probe"), timeout=10)  # connected before the abuse
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                self.kv.Range(rpc_pb2.RangeRequest(key=b"h2abuse/probe", serializable=True), timeout=5)
            except grpc.RpcError as exc:
                self.errors.append(f"{exc.code()}: {exc.details()}")
            self.samples.append((started, time.monotonic() - started))
            self.stop.wait(0.01)

    def finish(self, since: float = 0.0, min_samples: int = 20) -> tuple[float, int]:
        """Stop once ``min_samples`` calls started after ``since`` (the abuse's start); return their p99
        and how many there were."""
        with contextlib.suppress(AssertionError):
            wait_until(lambda: sum(t >= since for t, _ in self.samples) >= min_samples, 10, "probe samples")
        self.stop.set()
        self.thread.join(10)
        self.channel.close()
        assert not self.errors, self.errors[:5]
        ordered = sorted(lat for t, lat in self.samples if t >= since)
        assert ordered, "the well-behaved client made no call"
        return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], len(ordered)


@pytest.fixture
def probe(abuse_proxy: ProxyProcess) -> Iterator[LatencyProbe]:
    p = LatencyProbe(abuse_proxy.endpoint)
    yield p
    p.stop.set()


def assert_others_fine(probe: LatencyProbe, since: float = 0.0) -> None:
    p99, n = probe.finish(since)
    print(f"well-behaved client: p99 {p99 * 1000:.1f} ms over {n} calls")
    assert p99 < P99_LIMIT_S, f"well-behaved client p99 {p99 * 1000:.0f} ms during the abuse"


def closed_or_goaway(c: H2Client) -> bool:
    """Whether the server has reacted (GOAWAY) or closed; reads what is available without waiting."""
    if c.closed or c.send_error:
        return True
    try:
        c.poll()
    except ConnectionClosed:
        return True
    return any(f.type == GOAWAY for f in c.received)


def flood(c: H2Client, batch: bytes, *, batches: int, seconds: float = 5.0) -> int:
    """Send ``batch`` up to ``batches`` times (within ``seconds``), stopping once the server reacted.
    Returns how many batches were sent."""
    deadline = time.monotonic() + seconds
    sent = 0
    while sent < batches and time.monotonic() < deadline:
        c.send(batch)
        sent += 1
        if closed_or_goaway(c):
            break
    return sent


def proxy_rss_kib(proxy: ProxyProcess) -> int:
    total = 0
    for pid in [proxy.proc.pid, *(p for p, _ in descendants(proxy.proc.pid))]:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


# --------------------------------------------------------------------------- floods


def abuse_for(
    abuser: Callable[..., H2Client], probe: LatencyProbe, attack: Callable[[H2Client], object], seconds: float = 1.0
) -> int:
    """Run ``attack`` (which must see its connection punished) on fresh connections for ``seconds``, so the
    well-behaved client's p99 is measured under the abuse; then check that client. Returns the rounds."""
    started = time.monotonic()
    rounds = 0
    while rounds == 0 or time.monotonic() - started < seconds:
        c = abuser()
        attack(c)
        c.close()
        rounds += 1
    assert_others_fine(probe, since=started)
    return rounds


def rapid_reset(c: H2Client) -> None:
    sent_streams = 0
    deadline = time.monotonic() + 5
    while sent_streams < 6000 and time.monotonic() < deadline and not closed_or_goaway(c):
        out = b""
        for _ in range(100):
            sid = c.new_stream_id()
            out += frame_bytes(HEADERS, END_HEADERS, sid, c.encode(grpc_request_headers()))  # table hits
            out += frame_bytes(RST_STREAM, 0, sid, struct.pack(">I", 8))
            sent_streams += 1
        c.send(out)
    c.expect_connection_error(ENHANCE_YOUR_CALM, timeout=5)


def test_rapid_reset(abuser: Callable[..., H2Client], probe: LatencyProbe) -> None:
    """CVE-2023-44487: streams opened and reset at once, thousands of them (bucket: 1,000, +500/s)."""
    abuse_for(abuser, probe, rapid_reset)


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(frame_bytes(PING, 0, 0, b"pingpong"), id="PING"),
        pytest.param(frame_bytes(PING, ACK, 0, b"unasked!"), id="PING ACK"),
        pytest.param(frame_bytes(SETTINGS, 0, 0), id="SETTINGS"),
        pytest.param(frame_bytes(0x20, 0, 0, b""), id="unknown type"),
        pytest.param(frame_bytes(0x2, 0, 1, struct.pack(">IB", 0, 15)), id="PRIORITY"),
        pytest.param(frame_bytes(0x8, 0, 0, struct.pack(">I", 1)), id="WINDOW_UPDATE"),
    ],
)
def test_control_frame_flood(abuser: Callable[..., H2Client], probe: LatencyProbe, frame: bytes) -> None:
    """More than 1,000 frames that carry nothing within a second: GOAWAY ENHANCE_YOUR_CALM, close."""

    def attack(c: H2Client) -> None:
        c.auto_ping_ack = False
        flood(c, frame * 250, batches=24)  # up to 6,000 frames
        c.expect_connection_error(ENHANCE_YOUR_CALM, timeout=5)

    abuse_for(abuser, probe, attack)


def test_empty_data_flood(abuser: Callable[..., H2Client], probe: LatencyProbe) -> None:
    def attack(c: H2Client) -> None:
        sid = c.start_request(WATCH_PATH, watch_create_request(b"h2abuse/empty"), end_stream=False)
        flood(c, frame_bytes(DATA, 0, sid, b"") * 250, batches=24)
        c.expect_connection_error(ENHANCE_YOUR_CALM, timeout=5)

    abuse_for(abuser, probe, attack)


def test_continuation_flood(abuser: Callable[..., H2Client], probe: LatencyProbe) -> None:
    """A header block that never ends: CONTINUATIONs of 16 KiB; cut off above 256 KiB."""

    def attack(c: H2Client) -> None:
        sid = c.new_stream_id()
        # a literal whose value is announced as 64 MiB long, so no decoder can finish it early
        start = c.encode(grpc_request_headers()) + b"\x00\x07x-flood\x7f" + bytes([0x81, 0x80, 0x80, 0x20])
        c.send(frame_bytes(HEADERS, END_STREAM, sid, start))
        sent = flood(c, frame_bytes(CONTINUATION, 0, sid, b"a" * 16384), batches=256)  # up to 4 MiB
        c.expect_connection_error(ENHANCE_YOUR_CALM, PROTOCOL_ERROR, COMPRESSION_ERROR, timeout=5)
        assert sent * 16384 <= 2 * 1024 * 1024, f"{sent * 16} KiB of CONTINUATION accepted"

    abuse_for(abuser, probe, attack)


def test_empty_continuation_flood(abuser: Callable[..., H2Client], probe: LatencyProbe) -> None:
    def attack(c: H2Client) -> None:
        sid = c.new_stream_id()
        c.send(frame_bytes(HEADERS, END_STREAM, sid, c.encode(grpc_request_headers())))
        flood(c, frame_bytes(CONTINUATION, 0, sid, b"") * 250, batches=24)
        c.expect_connection_error(ENHANCE_YOUR_CALM, timeout=5)

    abuse_for(abuser, probe, attack)


def test_moderate_rates_not_punished(abuser: Callable[..., H2Client]) -> None:
    """No false positives: for 2 s, 200 streams/s opened and reset (refill is 500/s) and 400 WINDOW_UPDATE +
    100 PRIORITY frames/s (limit 1,000/s): no GOAWAY, and calls keep being served."""
    c = abuser()
    started = time.monotonic()
    tick = 0
    while time.monotonic() - started < 2:
        out = b""
        for _ in range(20):
            sid = c.new_stream_id()
            out += frame_bytes(HEADERS, END_HEADERS, sid, c.encode(grpc_request_headers()))
            out += frame_bytes(RST_STREAM, 0, sid, struct.pack(">I", 8))
        out += frame_bytes(0x8, 0, 0, struct.pack(">I", 1)) * 40
        out += frame_bytes(0x2, 0, 2**31 - 1, struct.pack(">IB", 0, 15)) * 10
        c.send(out)
        tick += 1
        c.poll()
        time.sleep(max(0.0, started + tick * 0.1 - time.monotonic()))  # 10 rounds per second
    r = c.unary()
    assert r.grpc_status == 0, str(r)
    assert not [f for f in c.received if f.type == GOAWAY], [str(f) for f in c.received if f.type == GOAWAY]


# --------------------------------------------------------------------------- header lists


def test_hpack_bomb(abuser: Callable[..., H2Client], probe: LatencyProbe) -> None:
    """One 4 KB field in the dynamic table, then a block naming it 5,000 times (1 byte each: ~20 MB decoded,
    far above 4 x 65,536): a connection error, not just a refused stream."""

    def attack(c: H2Client) -> None:
        # literals without indexing, so the only dynamic entry is the bomb at index 62
        request = b"".join(hpack_literal(k, v) for k, v in grpc_request_headers())
        sid = c.new_stream_id()
        c.send(
            c.headers_frame(sid, request + hpack_literal("x-bomb", "b" * 4000, index=True))
            + frame_bytes(DATA, END_STREAM, sid, grpc_message(range_request()))
        )
        r = c.read_response(sid)
        assert r.grpc_status == 0, str(r)
        sid = c.new_stream_id()
        block = request + b"\xbe" * 5000  # 5,000 x 4,038 bytes: ~20 MB decoded from ~5 KB
        c.send(c.header_block_frames(sid, block, end_stream=False) + frame_bytes(DATA, END_STREAM, sid, b""))
        c.expect_connection_error(ENHANCE_YOUR_CALM, COMPRESSION_ERROR, timeout=5)

    abuse_for(abuser, probe, attack)


def test_header_list_over_the_limit(abuser: Callable[..., H2Client], probe: LatencyProbe) -> None:
    """80 KB of headers (over 65,536, under 4x): that stream gets RESOURCE_EXHAUSTED; the connection lives."""

    def attack(c: H2Client) -> None:
        sid = c.new_stream_id()
        extra = [(f"x-big-{i}", "h" * 4000) for i in range(20)]
        block = c.encode(grpc_request_headers(extra=extra), huffman=False)
        c.send(c.header_block_frames(sid, block) + frame_bytes(DATA, END_STREAM, sid, grpc_message(range_request())))
        r = c.read_response(sid)
        assert r.grpc_status == 8 and r.trailers_only, str(r)
        ok = c.unary()
        assert ok.grpc_status == 0, str(ok)

    abuse_for(abuser, probe, attack)


# --------------------------------------------------------------------------- streams


def test_too_many_streams(proxy: Callable[..., ProxyProcess], transport: str) -> None:
    """Beyond MAX_CONCURRENT_STREAMS: each extra stream is refused (RST_STREAM REFUSED_STREAM); the
    streams within the limit keep working, and so does everyone else."""
    deviates(transport, go="etcd grpc-proxy has no --max-concurrent-streams flag (grpc-go advertises 2^32-1)")
    p = proxy(workers=1, extra_args=("--max-concurrent-streams=10",))
    probe = LatencyProbe(p.endpoint)
    try:
        with H2Client(LOCALHOST, p.port) as c:
            c.connect()
            assert c.server_settings.get(0x3) == 10, c.server_settings
            create = watch_create_request(b"h2abuse/many")
            keep = [c.start_request(WATCH_PATH, create, end_stream=False) for _ in range(10)]
            for sid in keep:
                c.wait_for_data(sid)
            extra = [c.start_request(WATCH_PATH, create, end_stream=False) for _ in range(200)]
            for sid in extra:
                c.expect_stream_error(sid, REFUSED_STREAM, PROTOCOL_ERROR)
            assert not c.closed, "refusing streams must not close the connection"
            assert all(c.responses[sid].reset is None for sid in keep), [str(c.responses[s]) for s in keep]
            c.expect_alive()
        assert_others_fine(probe)
    finally:
        probe.stop.set()


def test_stream_slots_are_freed(proxy: Callable[..., ProxyProcess], transport: str) -> None:
    """Streams the client reset, and calls that finished, give their slot back: with a limit of 5, rounds
    of 5 watches reset and 5 unary calls never get REFUSED_STREAM; frames the client had in flight on a
    stream refused meanwhile are ignored (no connection error)."""
    deviates(transport, go="etcd grpc-proxy has no --max-concurrent-streams flag (grpc-go advertises 2^32-1)")
    p = proxy(workers=1, extra_args=("--max-concurrent-streams=5",))
    with H2Client(LOCALHOST, p.port) as c:
        c.connect()
        create = watch_create_request(b"h2abuse/slots")
        for _ in range(4):
            sids = [c.start_request(WATCH_PATH, create, end_stream=False) for _ in range(5)]
            for sid in sids:
                c.wait_for_data(sid)
            for sid in sids:
                c.send_rst(sid)
            for _ in range(5):
                r = c.unary()
                assert r.grpc_status == 0 and r.reset is None, str(r)
        held = [c.start_request(WATCH_PATH, create, end_stream=False) for _ in range(5)]
        refused = c.start_request(end_stream=False)  # the 6th: refused
        c.send_data(refused, grpc_message(range_request()), end_stream=True)  # already in flight
        c.expect_stream_error(refused, REFUSED_STREAM, PROTOCOL_ERROR)
        c.expect_alive()
        for sid in held:
            c.wait_for_data(sid)
            assert c.responses[sid].reset is None, str(c.responses[sid])


def test_never_reading_client(
    abuse_proxy: ProxyProcess, abuser: Callable[..., H2Client], probe: LatencyProbe, etcd_server: EtcdServer
) -> None:
    """A client with 8 watch streams that never reads nor opens its window while 24 MB of events flow:
    the proxy's memory stays bounded and other clients are served; its connection may be closed."""
    c = abuser()
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sids = [c.start_request(WATCH_PATH, watch_create_request(b"h2abuse/flow"), end_stream=False) for _ in range(8)]
    c.drain(0.5)
    before = proxy_rss_kib(abuse_proxy)
    started = time.monotonic()
    direct = grpc.insecure_channel(etcd_server.endpoint)
    try:
        kv = rpc_pb2_grpc.KVStub(direct)
        for i in range(50):
            kv.Put(rpc_pb2.PutRequest(key=b"h2abuse/flow", value=bytes([i % 256]) * 60_000), timeout=10)
        time.sleep(1.0)
        grown_mib = (proxy_rss_kib(abuse_proxy) - before) / 1024
    finally:
        direct.close()
    # 50 events x 60 KB x 8 streams = 24 MB generated; held all at once it is still bounded by that
    print(f"proxy RSS grew by {grown_mib:.1f} MiB")
    assert grown_mib < 200, f"proxy RSS grew by {grown_mib:.0f} MiB"
    assert_others_fine(probe, since=started)
    assert sids


def test_never_reading_big_responses(
    abuse_proxy: ProxyProcess, abuser: Callable[..., H2Client], probe: LatencyProbe, etcd_server: EtcdServer
) -> None:
    """40 Range calls of a 1 MB value on a connection that never reads nor grants window: at most the
    responses themselves are held (40 MB), other clients are served meanwhile."""
    with grpc.insecure_channel(etcd_server.endpoint) as direct:
        rpc_pb2_grpc.KVStub(direct).Put(rpc_pb2.PutRequest(key=b"h2abuse/big", value=b"R" * 1_000_000), timeout=10)
    c = abuser(handshake=False)
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    c.connect(window=65535)
    before = proxy_rss_kib(abuse_proxy)
    started = time.monotonic()
    for _ in range(40):
        c.start_request(body=range_request(b"h2abuse/big"))
    time.sleep(1.5)
    grown_mib = (proxy_rss_kib(abuse_proxy) - before) / 1024
    print(f"proxy RSS grew by {grown_mib:.1f} MiB")
    assert grown_mib < 200, f"proxy RSS grew by {grown_mib:.0f} MiB"
    assert_others_fine(probe, since=started)


# --------------------------------------------------------------------------- slow peers


def test_keepalive_too_many_pings(abuser: Callable[..., H2Client]) -> None:
    """grpc-go's policy: pings closer than --grpc-keepalive-min-time (5 s): the 3rd strike gets
    GOAWAY ENHANCE_YOUR_CALM "too_many_pings"."""
    c = abuser()
    sid = c.start_request(WATCH_PATH, watch_create_request(b"h2abuse/pings"), end_stream=False)
    c.read_until(lambda f: f.type == DATA and f.stream_id == sid, what="created")
    for i in range(4):
        with contextlib.suppress(ConnectionClosed):
            c.send_ping(f"ping{i:04d}".encode())
    goaway = c.expect_goaway(ENHANCE_YOUR_CALM, timeout=5)
    assert goaway.debug_data == b"too_many_pings", str(goaway)


def test_keepalive_pings_without_streams(abuser: Callable[..., H2Client]) -> None:
    """With no stream open the minimum ping interval is 2 h (PermitWithoutStream=false): pings on an idle
    connection are strikes at once; the 3rd strike gets GOAWAY ENHANCE_YOUR_CALM "too_many_pings"."""
    c = abuser()
    for i in range(4):
        c.send_ping(f"idle{i:04d}".encode())
    goaway = c.expect_goaway(ENHANCE_YOUR_CALM, timeout=5)
    assert goaway.debug_data == b"too_many_pings", str(goaway)


def test_keepalive_strikes_reset_by_data(abuser: Callable[..., H2Client]) -> None:
    """Strikes are forgiven when the client sends HEADERS/DATA: ping x3, a call, ping x2 is no abuse."""
    c = abuser()
    sid = c.start_request(WATCH_PATH, watch_create_request(b"h2abuse/strikes"), end_stream=False)
    c.wait_for_data(sid)
    for i in range(3):
        c.ping_roundtrip(f"strk{i:04d}".encode())
    r = c.unary()
    assert r.grpc_status == 0, str(r)
    for i in range(2):
        c.ping_roundtrip(f"more{i:04d}".encode())
    frames = c.drain(0.5)
    assert not [f for f in c.received if f.type == GOAWAY], [str(f) for f in frames]


@dataclass
class SlowPeer:
    """A stalling connection opened when the module starts, watched by a thread: the ~10 s the server
    takes to drop it elapse while the other tests run. ``watch`` blocks until the server's reaction and
    describes it (AssertionError if it never comes)."""

    name: str
    watch: Callable[[], str]
    started: float = field(default_factory=time.monotonic)
    result: str = ""
    error: BaseException | None = None
    took: float = 0.0
    done: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        try:
            self.result = self.watch()
        except BaseException as exc:
            self.error = exc
        finally:
            self.took = time.monotonic() - self.started
            self.done.set()

    def outcome(self) -> tuple[str, float]:
        assert self.done.wait(max(0.1, 16 - (time.monotonic() - self.started))), f"{self.name}: no outcome"
        if self.error is not None:
            raise AssertionError(f"{self.name}: {self.error}")
        return self.result, self.took


def _closed_within(c: H2Client, seconds: float) -> str:
    frames = c.expect_closed(seconds)
    return f"closed after {[str(f) for f in frames]}"


def _tls_closed_within(s: socket.socket, seconds: float) -> str:
    s.settimeout(seconds)
    try:
        data = s.recv(4096)
    except ConnectionResetError:
        return "reset"
    except TimeoutError as exc:
        raise AssertionError(f"still open after {seconds} s") from exc
    assert data == b"" or data[:1] == b"\x15", data[:20]  # EOF, or a TLS alert then EOF
    return f"closed ({data[:8]!r})"


@pytest.fixture(scope="module", autouse=True)
def slow_peers(abuse_proxy: ProxyProcess, tls_proxy: tuple[ProxyProcess, Path]) -> Iterator[dict[str, SlowPeer]]:
    silent = H2Client(LOCALHOST, abuse_proxy.port)
    half = H2Client(LOCALHOST, abuse_proxy.port)
    half.send(PREFACE[:10])
    unacked = H2Client(LOCALHOST, abuse_proxy.port)
    unacked.auto_settings_ack = False
    unacked.send(PREFACE + frame_bytes(SETTINGS, 0, 0))
    tls_silent = socket.create_connection((LOCALHOST, tls_proxy[0].port))
    tls_partial = socket.create_connection((LOCALHOST, tls_proxy[0].port))
    tls_partial.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # a ClientHello cut short
    peers = {
        "silent": SlowPeer("no preface at all", lambda: _closed_within(silent, 14)),
        "half": SlowPeer("half a preface", lambda: _closed_within(half, 14)),
        "unacked": SlowPeer(
            "SETTINGS never ACKed", lambda: unacked.expect_connection_error(SETTINGS_TIMEOUT, timeout=14)
        ),
        "tls_silent": SlowPeer("TLS: nothing sent", lambda: _tls_closed_within(tls_silent, 14)),
        "tls_partial": SlowPeer("TLS: half a ClientHello", lambda: _tls_closed_within(tls_partial, 14)),
    }
    yield peers
    for c in (silent, half, unacked):
        c.close()
    tls_silent.close()
    tls_partial.close()


def test_no_preface_closed(slow_peers: dict[str, SlowPeer]) -> None:
    """A connection that never sends its preface is closed ~10 s after accept; half a preface too."""
    for key in ("silent", "half"):
        _, took = slow_peers[key].outcome()
        assert 5 < took < 14, (key, took)


def test_settings_never_acked(slow_peers: dict[str, SlowPeer]) -> None:
    """Our SETTINGS are never acknowledged: GOAWAY SETTINGS_TIMEOUT after ~10 s."""
    _, took = slow_peers["unacked"].outcome()
    assert 5 < took < 14, took


# --------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def tls_proxy(etcd_server: EtcdServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ProxyProcess, Path]]:
    from tests.e2e.test_tls import issue, make_ca

    d = tmp_path_factory.mktemp("h2tls")
    ca = make_ca(d, "ca")
    pair = issue(ca, d, "server", cn="proxy")
    launcher = ProxyLauncher(d, lambda: etcd_server)
    impl = proxy_impl()
    port = free_port()
    args = proxy_command(impl, [etcd_server.endpoint], port, workers=1, advertise_client_url="", extra_args=())
    args += [f"--cert-file={pair.cert}", f"--key-file={pair.key}"]
    log_path = d / f"proxy-tls-{port}.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    with log_path.open("ab") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=ROOT)
    proxy = ProxyProcess(impl=impl, port=port, log_path=log_path, args=args, proc=proc)
    launcher.started.append(proxy)
    wait_until(lambda: not proxy.alive() or READY_LINE in log_path.read_text(errors="replace"), 30, "TLS proxy start")
    assert proxy.alive(), proxy.log_tail()
    yield proxy, ca.path
    problems = launcher.close(failed=False)
    assert not problems, problems


def test_tls_alpn_h2_call(tls_proxy: tuple[ProxyProcess, Path]) -> None:
    proxy, ca = tls_proxy
    with H2Client(LOCALHOST, proxy.port, tls=tls_context(str(ca)), timeout=10) as c:
        assert isinstance(c.sock, ssl.SSLSocket) and c.sock.selected_alpn_protocol() == "h2"
        c.connect()
        r = c.unary()
        assert r.grpc_status == 0, str(r)


def test_tls_handshake_stalled(slow_peers: dict[str, SlowPeer]) -> None:
    """TCP connected, then nothing (or half a ClientHello): closed within ~10 s (+ slack)."""
    for key in ("tls_silent", "tls_partial"):
        _, took = slow_peers[key].outcome()
        assert took < 14, (key, took)


def test_tls_alpn_http11_health(tls_proxy: tuple[ProxyProcess, Path]) -> None:
    """ALPN "http/1.1" on the TLS port: the HTTP endpoints are served like on plain text."""
    proxy, ca = tls_proxy
    ctx = tls_context(str(ca), alpn=("http/1.1",))
    with (
        socket.create_connection((LOCALHOST, proxy.port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname=LOCALHOST) as s,
    ):
        assert s.selected_alpn_protocol() == "http/1.1"
        s.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200") and b'"health":"true"' in data.replace(b" ", b""), data[:300]


def test_tls_flood_limit(tls_proxy: tuple[ProxyProcess, Path]) -> None:
    """The flood limit holds over TLS too (SETTINGS flood: GOAWAY ENHANCE_YOUR_CALM, close)."""
    proxy, ca = tls_proxy
    with H2Client(LOCALHOST, proxy.port, tls=tls_context(str(ca)), timeout=10) as c:
        c.connect()
        flood(c, frame_bytes(SETTINGS, 0, 0) * 250, batches=24)
        c.expect_connection_error(ENHANCE_YOUR_CALM, timeout=5)


def test_tls_invalid_preface(tls_proxy: tuple[ProxyProcess, Path]) -> None:
    proxy, ca = tls_proxy
    with H2Client(LOCALHOST, proxy.port, tls=tls_context(str(ca)), timeout=10) as c:
        c.send(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n" + frame_bytes(SETTINGS, 0, 0))
        c.expect_connection_error(PROTOCOL_ERROR)
