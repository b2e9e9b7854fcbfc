"""Transport behaviour the contract fixes beyond the RFC's MUSTs (notes/h2_contract.md): the SETTINGS we
advertise, flow control towards the client (our windows respected, a blocked stream never holds up
the others), the two-phase graceful GOAWAY on stop, and HTTP/1.1 health/metrics on the gRPC port.
"""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Callable, Iterator

import grpc
import pytest

from etcdproxy.etcdpb import rpc_pb2, rpc_pb2_grpc
from tests.h2.rawclient import (
    ACK,
    DATA,
    END_STREAM,
    FLOW_CONTROL_ERROR,
    GOAWAY,
    HEADERS,
    INITIAL_WINDOW_SIZE,
    NO_ERROR,
    PING,
    WATCH_PATH,
    ConnectionClosed,
    H2Client,
    frame_bytes,
    grpc_message,
    grpc_request_headers,
    range_request,
    watch_create_request,
)
from tests.helpers import IMPL_GO, LOCALHOST, EtcdServer, ProxyProcess, free_port, http_get, proxy_impl

pytestmark = pytest.mark.timeout(60)

Connect = Callable[..., H2Client]

BIG_KEY = b"h2transport/big"
BIG_VALUE = b"B" * 1_000_000

_CORE_NO_HTTP1 = "grpc-core answers an HTTP/1.1 request with its HTTP/2 SETTINGS (BadStatusLine)"
DEVIATIONS: dict[str, dict[str, str]] = {
    "go": {
        "test_server_settings": "grpc-go: {MAX_CONCURRENT_STREAMS: 2^32-1, MAX_FRAME_SIZE: 16384}, no WINDOW_UPDATE",
        "test_graceful_stop_two_phase_goaway": "etcd grpc-proxy closes on SIGTERM without any GOAWAY",
        "test_stream_opened_after_goaway_is_not_processed": "etcd grpc-proxy closes on SIGTERM without any GOAWAY",
        "test_graceful_stop_second_goaway_without_ping_ack": "etcd grpc-proxy closes on SIGTERM without any GOAWAY",
        "test_header_list_size_boundary[65537-8]": "grpc-go's header list limit is 16 MiB: served (grpc-status 0)",
        "test_initial_window_overflow_is_flow_control_error": "grpc-go ACKs the SETTINGS, no error within 3 s",
        "test_http1_health_on_the_grpc_port[/proxy/health]": "Go probes the advertised URL, empty in these tests: "
        '503 {"health":"false","reason":"no connection to proxy"}',
    },
    "grpcio": {
        "test_server_settings": "grpc-core: INITIAL_WINDOW_SIZE and MAX_FRAME_SIZE 4 MiB, MAX_HEADER_LIST_SIZE 16384",
        "test_graceful_stop_second_goaway_without_ping_ack": "grpc-core's second GOAWAY is INTERNAL_ERROR "
        "'Cancelling all calls' with last-stream-id 1",
        "test_header_list_size_boundary[65536-0]": "grpc-core: 8 'received metadata size exceeds hard limit "
        "(value length 65201 vs. 16384)'",
        "test_initial_window_overflow_is_flow_control_error": "grpc-core ACKs the SETTINGS, no error within 3 s",
        "test_server_keepalive": "grpc-core leaves a connection that never ACKs its keepalive PING open past 8 s",
        "test_http1_health_on_the_grpc_port[/health]": _CORE_NO_HTTP1,
        "test_http1_health_on_the_grpc_port[/proxy/health]": _CORE_NO_HTTP1,
        "test_http1_metrics_on_the_grpc_port[/metrics]": _CORE_NO_HTTP1,
        "test_http1_metrics_on_the_grpc_port[/proxy/metrics]": _CORE_NO_HTTP1,
        "test_http1_same_answers_as_metrics_addr": _CORE_NO_HTTP1,
        "test_http1_unknown_path_is_404": _CORE_NO_HTTP1,
        "test_http1_then_grpc_still_served": _CORE_NO_HTTP1,
        "test_http1_upgrade_to_h2c_not_taken": _CORE_NO_HTTP1,
        "test_http1_keep_alive": _CORE_NO_HTTP1,
    },
}


@pytest.fixture(scope="module")
def big_value(etcd_server: EtcdServer) -> Iterator[None]:
    with grpc.insecure_channel(etcd_server.endpoint) as ch:
        rpc_pb2_grpc.KVStub(ch).Put(rpc_pb2.PutRequest(key=BIG_KEY, value=BIG_VALUE), timeout=10)
    yield


def test_server_settings(h2c: H2Client) -> None:
    """MAX_CONCURRENT_STREAMS 2^31-1 (etcd's default 2^32-1 clamped), INITIAL_WINDOW_SIZE 1 MiB and a
    connection WINDOW_UPDATE to 16 MiB, MAX_HEADER_LIST_SIZE 65536, no ENABLE_PUSH, default MAX_FRAME_SIZE."""
    s = h2c.server_settings
    assert s.get(0x3) == 2**31 - 1, s
    assert s.get(0x4) == 1 << 20, s
    assert s.get(0x6) == 65536, s
    assert 0x2 not in s and s.get(0x5, 16384) == 16384, s
    updates = [f.increment for f in h2c.received if f.type == 0x8 and f.stream_id == 0]
    assert 65535 + sum(updates) == 16 << 20, updates


def test_response_respects_our_windows(connect: Connect, big_value: None) -> None:
    """A 1 MB Range response with our default windows (65,535, no connection update): the server never
    sends more DATA than the stream and connection windows we granted, and finishes as we grant more."""
    c = connect(window=65535)
    sid = c.start_request(body=range_request(BIG_KEY))
    credit = {"conn": 65535, "stream": 65535}
    got = {"conn": 0, "stream": 0}
    deadline = time.monotonic() + 20
    while not c.responses.get(sid) or not c.responses[sid].ended:
        f = c.read_frame(max(0.1, deadline - time.monotonic()))
        assert f is not None, f"stalled after {got}"
        if f.type != DATA or not f.payload:
            continue
        assert len(f.payload) <= 16384, f"DATA of {len(f.payload)} bytes above our MAX_FRAME_SIZE"
        got["conn"] += len(f.payload)
        if f.stream_id == sid:
            got["stream"] += len(f.payload)
        assert got["conn"] <= credit["conn"] and got["stream"] <= credit["stream"], (got, credit)
        # grant back in 32 KiB steps, like a slow reader
        if credit["conn"] - got["conn"] < 32768:
            c.send_window_update(0, 32768)
            credit["conn"] += 32768
        if credit["stream"] - got["stream"] < 32768:
            c.send_window_update(sid, 32768)
            credit["stream"] += 32768
    r = c.responses[sid]
    assert r.grpc_status == 0, str(r)
    assert rpc_pb2.RangeResponse.FromString(r.messages[0]).kvs[0].value == BIG_VALUE


def test_larger_max_frame_size_respected(connect: Connect, big_value: None) -> None:
    """With our SETTINGS_MAX_FRAME_SIZE at 65,536 no DATA frame is larger (bigger ones are allowed)."""
    c = connect(settings=[(0x5, 65536), (INITIAL_WINDOW_SIZE, 4 << 20)])
    r = c.read_response(c.start_request(body=range_request(BIG_KEY)), timeout=20)
    assert r.grpc_status == 0 and max(r.data_frames) <= 65536, (max(r.data_frames), str(r)[:300])


def test_large_request_within_windows(connect: Connect, etcd_server: EtcdServer) -> None:
    """A 1.4 MB Put sent only as far as the server's windows allow: it must grant more (WINDOW_UPDATE)
    for the call to complete."""
    c = connect()
    value = b"P" * 1_400_000
    sid = c.start_request(end_stream=False, headers=grpc_request_headers("/etcdserverpb.KV/Put"))
    put = rpc_pb2.PutRequest(key=b"h2transport/put", value=value).SerializeToString()
    waits = c.send_data_flow_controlled(sid, grpc_message(put))
    r = c.read_response(sid, timeout=20)
    assert r.grpc_status == 0, f"{r} after waiting {waits} times for window"
    with grpc.insecure_channel(etcd_server.endpoint) as ch:
        got = rpc_pb2_grpc.KVStub(ch).Range(rpc_pb2.RangeRequest(key=b"h2transport/put"), timeout=10)
    assert got.kvs[0].value == value


def test_many_streams_pipelined_and_interleaved(connect: Connect, etcd_server: EtcdServer) -> None:
    """200 calls written at once, their HEADERS first and their messages cut in two and interleaved across
    streams: every response belongs to its own stream."""
    with grpc.insecure_channel(etcd_server.endpoint) as ch:
        kv = rpc_pb2_grpc.KVStub(ch)
        for i in range(20):
            kv.Put(rpc_pb2.PutRequest(key=f"h2transport/m{i}".encode(), value=f"value-{i}".encode()), timeout=10)
    c = connect()
    sids = {c.new_stream_id(): i % 20 for i in range(200)}
    bodies = {sid: grpc_message(range_request(f"h2transport/m{k}".encode())) for sid, k in sids.items()}
    out = b"".join(c.headers_frame(sid, grpc_request_headers()) for sid in sids)
    out += b"".join(frame_bytes(DATA, 0, sid, bodies[sid][:7]) for sid in sids)
    out += b"".join(frame_bytes(DATA, END_STREAM, sid, bodies[sid][7:]) for sid in reversed(list(sids)))
    c.send(out)
    for sid, k in sids.items():
        r = c.read_response(sid, timeout=20)
        assert r.grpc_status == 0, str(r)
        (kv_,) = rpc_pb2.RangeResponse.FromString(r.messages[0]).kvs
        assert (kv_.key, kv_.value) == (f"h2transport/m{k}".encode(), f"value-{k}".encode()), (sid, k)


def _header_list_size(headers: list[tuple[str, str]]) -> int:
    return sum(len(k.encode()) + len(v.encode()) + 32 for k, v in headers)


@pytest.mark.parametrize(("size", "status"), [(65536, 0), (65537, 8)])
def test_header_list_size_boundary(h2c: H2Client, size: int, status: int) -> None:
    """SETTINGS_MAX_HEADER_LIST_SIZE 65536 (RFC 9113 size: name + value + 32 per field): exactly 65,536
    is served; one byte more gets trailers-only RESOURCE_EXHAUSTED."""
    headers = grpc_request_headers()
    pad = size - _header_list_size(headers) - 32 - len("x-pad")
    headers.append(("x-pad", "p" * pad))
    assert _header_list_size(headers) == size
    sid = h2c.new_stream_id()
    block = h2c.encode(headers, huffman=False)
    h2c.send(h2c.header_block_frames(sid, block) + frame_bytes(DATA, END_STREAM, sid, grpc_message(range_request())))
    r = h2c.read_response(sid)
    assert r.grpc_status == status, str(r)[:400]


def test_initial_window_overflow_is_flow_control_error(connect: Connect) -> None:
    """RFC 9113 6.9.2: a SETTINGS_INITIAL_WINDOW_SIZE change that takes an open stream's window above
    2^31-1 is a connection error FLOW_CONTROL_ERROR."""
    c = connect()
    sid = c.start_request(WATCH_PATH, watch_create_request(b"h2transport/overflow"), end_stream=False)
    consumed = sum(c.wait_for_data(sid).data_frames)
    c.send_window_update(sid, 2**31 - 1 - 65535 + consumed)  # the stream's window is now at the maximum
    c.send_settings([(INITIAL_WINDOW_SIZE, 65536)])  # +1 on every open stream
    c.expect_connection_error(FLOW_CONTROL_ERROR)


def test_blocked_stream_does_not_block_others(connect: Connect, big_value: None) -> None:
    """A stream whose window we never open (a big response half sent) must not hold up other streams."""
    c = connect(settings=[(INITIAL_WINDOW_SIZE, 65535)])
    blocked = c.start_request(body=range_request(BIG_KEY))
    c.read_until(lambda f: f.type == DATA and f.stream_id == blocked, what="the big response's first DATA")
    for _ in range(3):
        started = time.monotonic()
        r = c.unary(timeout=5)
        assert r.grpc_status == 0, str(r)
        assert time.monotonic() - started < 2
    assert not c.responses[blocked].ended
    c.send_rst(blocked)


def test_reset_stream_sends_nothing_more(connect: Connect, big_value: None) -> None:
    """A big response blocked by our stream window, then RST_STREAM CANCEL from us: opening the window
    afterwards brings no more DATA for that stream (its queued bytes are dropped), and other calls go on."""
    c = connect(settings=[(INITIAL_WINDOW_SIZE, 65535)])
    sid = c.start_request(body=range_request(BIG_KEY))
    c.wait_for_data(sid)
    c.drain(0.3)
    c.send_rst(sid)
    c.drain(0.3)  # what was already in flight
    before = len(c.responses[sid].data)
    c.send_window_update(sid, 4 << 20)
    r = c.unary()
    assert r.grpc_status == 0, str(r)
    c.drain(0.5)
    assert len(c.responses[sid].data) == before, f"{len(c.responses[sid].data) - before} bytes after the reset"


def test_initial_window_change_applies_to_open_streams(connect: Connect, big_value: None) -> None:
    """RFC 9113 6.9.2: raising SETTINGS_INITIAL_WINDOW_SIZE widens the windows of streams already open."""
    c = connect(settings=[(INITIAL_WINDOW_SIZE, 1000)])
    sid = c.start_request(body=range_request(BIG_KEY))
    c.read_until(lambda f: f.type == DATA and f.stream_id == sid, what="first DATA")
    c.drain(0.3)
    before = len(c.responses[sid].data)
    assert before <= 1000, before
    c.send_settings([(INITIAL_WINDOW_SIZE, 2_000_000)])
    r = c.read_response(sid, timeout=20)
    assert r.grpc_status == 0 and len(r.data) > 1_000_000, str(r)


def test_graceful_stop_two_phase_goaway(proxy: Callable[..., ProxyProcess]) -> None:
    """On SIGTERM: GOAWAY(2^31-1, NO_ERROR) and a PING; after our PING ACK, GOAWAY(last stream id);
    the open streams are then ended by the server and the connection closes."""
    p = proxy(workers=1, extra_args=() if proxy_impl() == IMPL_GO else ("--graceful-timeout=3s",))
    c = H2Client(LOCALHOST, p.port, timeout=10).connect()
    try:
        sid = c.start_request(WATCH_PATH, watch_create_request(b"h2transport/graceful"), end_stream=False)
        c.read_until(lambda f: f.type == DATA and f.stream_id == sid, what="created")
        p.proc.send_signal(signal.SIGTERM)
        first = c.expect_goaway(timeout=10)
        assert (first.last_stream_id, first.error_code) == (2**31 - 1, NO_ERROR), str(first)
        frames = c.read_until(lambda f: f.type == GOAWAY, timeout=5, what="the second GOAWAY")
        pings = [f for f in c.received if f.type == PING and not f.flags & ACK]
        assert pings, "the first GOAWAY must be followed by a PING"
        second = frames[-1]
        assert (second.last_stream_id, second.error_code) == (sid, NO_ERROR), str(second)
        c.expect_closed(10)
    finally:
        c.close()
        p.stop()
        proxy.started.remove(p)  # type: ignore[attr-defined]


def test_graceful_stop_second_goaway_without_ping_ack(proxy: Callable[..., ProxyProcess]) -> None:
    """A client that never ACKs the shutdown PING still gets the final GOAWAY about 1 s later."""
    p = proxy(workers=1, extra_args=() if proxy_impl() == IMPL_GO else ("--graceful-timeout=3s",))
    c = H2Client(LOCALHOST, p.port, timeout=10).connect()
    c.auto_ping_ack = False
    try:
        sid = c.start_request(WATCH_PATH, watch_create_request(b"h2transport/noack"), end_stream=False)
        c.wait_for_data(sid)
        p.proc.send_signal(signal.SIGTERM)
        first = c.expect_goaway(timeout=10)
        at_first = time.monotonic()
        assert first.last_stream_id == 2**31 - 1, str(first)
        second = c.read_until(lambda f: f.type == GOAWAY, timeout=5, what="the second GOAWAY")[-1]
        assert second.last_stream_id == sid and time.monotonic() - at_first < 3, str(second)
    finally:
        c.close()
        p.stop()
        proxy.started.remove(p)  # type: ignore[attr-defined]


def test_stream_opened_after_goaway_is_not_processed(proxy: Callable[..., ProxyProcess]) -> None:
    """After the final GOAWAY, a new stream above its last-stream-id is ignored or refused, never served."""
    p = proxy(workers=1, extra_args=() if proxy_impl() == IMPL_GO else ("--graceful-timeout=3s",))
    c = H2Client(LOCALHOST, p.port, timeout=10).connect()
    try:
        sid = c.start_request(WATCH_PATH, watch_create_request(b"h2transport/late"), end_stream=False)
        c.read_until(lambda f: f.type == DATA and f.stream_id == sid, what="created")
        p.proc.send_signal(signal.SIGTERM)
        c.read_until(lambda f: f.type == GOAWAY and f.last_stream_id < 2**31 - 1, timeout=10, what="final GOAWAY")
        late = c.start_request(body=range_request())
        try:
            r = c.read_response(late, timeout=5)
        except AssertionError:
            return  # ignored: fine
        assert r.grpc_status != 0 or r.reset is not None or r.closed, str(r)
    finally:
        c.close()
        p.stop()
        proxy.started.remove(p)  # type: ignore[attr-defined]


def test_server_keepalive(proxy: Callable[..., ProxyProcess]) -> None:
    """--grpc-keepalive-interval/--grpc-keepalive-timeout 1 s: the proxy pings idle connections; one that
    never ACKs is closed within a few seconds, one that ACKs stays open."""
    p = proxy(workers=1, extra_args=("--grpc-keepalive-interval=1s", "--grpc-keepalive-timeout=1s"))
    silent = H2Client(LOCALHOST, p.port, timeout=10).connect()
    silent.auto_ping_ack = False
    polite = H2Client(LOCALHOST, p.port, timeout=10).connect()
    try:
        started = time.monotonic()
        while time.monotonic() - started < 8:  # read both: the polite one ACKs as it reads
            try:
                silent.read_frame(0.1)
            except ConnectionClosed:
                break
            polite.poll()
        took = time.monotonic() - started
        assert silent.closed, f"the silent connection is still open after {took:.1f} s"
        assert any(f.type == PING and not f.flags & ACK for f in silent.received), [str(f) for f in silent.received]
        assert 1 < took < 8, took
        polite.drain(0.5)
        assert any(f.type == PING and not f.flags & ACK for f in polite.received), "no keepalive ping"
        r = polite.unary()
        assert r.grpc_status == 0, str(r)
    finally:
        silent.close()
        polite.close()


# --------------------------------------------------------------------------- HTTP/1.1 on the gRPC port


@pytest.mark.parametrize("path", ["/health", "/proxy/health"])
def test_http1_health_on_the_grpc_port(shared_proxy: ProxyProcess, path: str) -> None:
    status, body = http_get(f"http://{shared_proxy.endpoint}{path}", timeout=5)
    assert status == 200 and '"health":"true"' in body.replace(" ", ""), (status, body)


@pytest.mark.parametrize("path", ["/metrics", "/proxy/metrics"])
def test_http1_metrics_on_the_grpc_port(shared_proxy: ProxyProcess, path: str) -> None:
    status, body = http_get(f"http://{shared_proxy.endpoint}{path}", timeout=5)
    assert status == 200 and "# TYPE" in body, (status, body[:200])


def test_http1_same_answers_as_metrics_addr(proxy: Callable[..., ProxyProcess]) -> None:
    """/health on --listen-addr answers exactly like on --metrics-addr."""
    metrics_port = free_port()
    p = proxy(workers=1, extra_args=(f"--metrics-addr=http://{LOCALHOST}:{metrics_port}",))
    on_grpc = http_get(f"http://{p.endpoint}/health", timeout=5)
    on_metrics = http_get(f"http://{LOCALHOST}:{metrics_port}/health", timeout=5)
    assert on_grpc == on_metrics and on_grpc[0] == 200, (on_grpc, on_metrics)


def test_http1_unknown_path_is_404(shared_proxy: ProxyProcess) -> None:
    status, _ = http_get(f"http://{shared_proxy.endpoint}/nope", timeout=5)
    assert status == 404


def test_http1_then_grpc_still_served(shared_proxy: ProxyProcess, h2c: H2Client) -> None:
    """HTTP/1.1 and HTTP/2 connections share the port: one does not disturb the other."""
    http_get(f"http://{shared_proxy.endpoint}/health", timeout=5)
    r = h2c.unary()
    assert r.grpc_status == 0 and r.header(":status") == "200", str(r)
    assert any(f.type == HEADERS for f in h2c.received)


def _http1_exchange(endpoint: str, request: bytes, responses: int = 1, timeout: float = 5) -> bytes:
    """Send raw HTTP/1.1 bytes; read until ``responses`` status lines arrived and their bodies ended (or EOF)."""
    host, port = endpoint.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(request)
        data = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            data += chunk
            if data.count(b"HTTP/1.1 ") >= responses and data.rstrip().endswith((b"}", b"found", b"\n")):
                s.settimeout(0.3)  # maybe more to come; stop at the first pause
        return data


def test_http1_upgrade_to_h2c_not_taken(shared_proxy: ProxyProcess) -> None:
    """An HTTP/1.1 request asking to upgrade to h2c is answered as plain HTTP/1.1 (no 101)."""
    data = _http1_exchange(
        shared_proxy.endpoint,
        b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        b"HTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n",
    )
    assert data.startswith(b"HTTP/1.1 200"), data[:200]


def test_http1_keep_alive(shared_proxy: ProxyProcess) -> None:
    """Two requests on one HTTP/1.1 connection get two answers."""
    req = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    data = _http1_exchange(shared_proxy.endpoint, req + req, responses=2)
    assert data.count(b"HTTP/1.1 200") == 2, data[:400]
