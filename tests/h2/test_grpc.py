"""gRPC over HTTP/2 (grpc's PROTOCOL-HTTP2) on the proxy's client port, driven with raw frames.

The contract (notes/h2_contract.md) follows grpc-go's answers: unknown service/method, 405/415,
grpc-timeout (malformed: INTERNAL; valid: the call's deadline), grpc-encoding, the receive limit,
messages split across DATA frames or several in one, -bin metadata, trailers-only responses and
percent-encoded grpc-message.
"""

from __future__ import annotations

import gzip
import re
import struct
import time
from collections.abc import Iterator

import pytest

from etcdproxy.etcdpb import rpc_pb2, v3lock_pb2
from tests.h2.rawclient import (
    DATA,
    END_STREAM,
    RANGE_PATH,
    WATCH_PATH,
    H2Client,
    Response,
    bin_header,
    frame_bytes,
    grpc_message,
    grpc_request_headers,
    range_request,
    watch_create_request,
)
from tests.helpers import EtcdServer, ProxyProcess, Stubs, connect, wait_until

pytestmark = pytest.mark.timeout(30)

_GO_TIMEOUT_RST = "grpc-go 1.38 resets the stream (RST_STREAM PROTOCOL_ERROR), no grpc-status"
_CORE_ENCODING = "grpc-core: grpc-status 13 \"Error parsing 'grpc-encoding' metadata\""
_CORE_TIMEOUT = "grpc-core: grpc-status 13 \"Error parsing 'grpc-timeout' metadata\""
DEVIATIONS: dict[str, dict[str, str]] = {
    "go": {
        "test_method_not_post_is_405": "grpc-go 1.38 answers RST_STREAM PROTOCOL_ERROR, no :status 405",
        "test_content_type_not_grpc_is_415": "grpc-go 1.38 answers RST_STREAM PROTOCOL_ERROR, no :status 415",
        "test_grpc_timeout_malformed[1x]": _GO_TIMEOUT_RST,
        "test_grpc_timeout_malformed[abc]": _GO_TIMEOUT_RST,
        "test_grpc_timeout_malformed[123456789S]": _GO_TIMEOUT_RST,
        "test_grpc_timeout_malformed[-1S]": "grpc-go takes it as an expired deadline: 4 'context deadline exceeded'",
        "test_grpc_timeout_malformed[S]": _GO_TIMEOUT_RST,
        "test_upstream_error_is_trailers_only": "the Go proxy relays it as grpc-status 2 (Unknown), same message",
        "test_client_goaway_then_close": "grpc-go keeps the connection open (nothing within 5 s)",
        "test_request_trailers_accepted": "grpc-go 1.38 answers request trailers with RST_STREAM PROTOCOL_ERROR",
        "test_grpc_encoding_unknown_but_message_uncompressed": "grpc-go refuses from the header alone: 12 "
        "'grpc: Decompressor is not installed for grpc-encoding \"snappy\"'",
    },
    "grpcio": {
        "test_method_not_post_is_405": "grpc-core answers RST_STREAM INTERNAL_ERROR, no :status 405",
        "test_content_type_not_grpc_is_415": "grpc-core serves a text/plain request (grpc-status 0)",
        "test_grpc_timeout_malformed[1x]": _CORE_TIMEOUT,
        "test_grpc_timeout_malformed[abc]": _CORE_TIMEOUT,
        "test_grpc_timeout_malformed[123456789S]": "grpc-core accepts a 9-digit grpc-timeout and serves the call",
        "test_grpc_timeout_malformed[-1S]": _CORE_TIMEOUT,
        "test_grpc_timeout_malformed[S]": _CORE_TIMEOUT,
        "test_grpc_encoding_unknown": _CORE_ENCODING,
        "test_message_larger_than_the_limit": "grpc-core: 8 'SERVER: Received message larger than max (... vs. ...)'",
        "test_client_goaway_then_close": "grpc-core keeps the connection open (nothing within 5 s)",
        "test_grpc_encoding_unknown_but_message_uncompressed": _CORE_ENCODING,
        "test_grpc_timeout_valid_units[99999999H]": "grpc-core overflows: 4 'Deadline Exceeded' at once",
        "test_compressed_flag_with_identity_encoding": "grpc-core: 13 'Compression bit set but no encoding configured'",
    },
}

OK, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, UNIMPLEMENTED, INTERNAL = 0, 4, 8, 12, 13


@pytest.fixture
def stubs(shared_proxy: ProxyProcess) -> Iterator[Stubs]:
    s = connect("grpcio", shared_proxy.endpoint)
    yield s
    s.close()


def assert_trailers_only(r: Response) -> None:
    assert r.trailers_only, f"expected a trailers-only response: {r}"
    assert r.status == "200" and (r.header("content-type") or "").startswith("application/grpc"), str(r)


def test_unary_response_shape(h2c: H2Client, stubs: Stubs) -> None:
    """HEADERS (:status 200, content-type application/grpc), one length-prefixed message, trailers with
    grpc-status 0, END_STREAM on the trailers; the message is the real RangeResponse."""
    stubs.kv.Put(rpc_pb2.PutRequest(key=b"h2grpc/shape", value=b"v1"))
    r = h2c.unary(body=range_request(key=b"h2grpc/shape"))
    assert r.status == "200" and r.header("content-type") == "application/grpc", str(r)
    assert r.header_blocks == 2 and r.ended and r.grpc_status == OK, str(r)
    (msg,) = r.messages
    resp = rpc_pb2.RangeResponse.FromString(msg)
    assert [(kv.key, kv.value) for kv in resp.kvs] == [(b"h2grpc/shape", b"v1")]


def test_unknown_service(h2c: H2Client, transport: str) -> None:
    r = h2c.unary("/nope.Svc/Call")
    assert_trailers_only(r)
    assert r.grpc_status == UNIMPLEMENTED, str(r)
    if transport != "grpcio":  # grpc-core says "Method not found!"
        assert r.grpc_message == "unknown service nope.Svc", str(r)


def test_unknown_method(h2c: H2Client, transport: str) -> None:
    r = h2c.unary("/etcdserverpb.KV/Nope")
    assert_trailers_only(r)
    assert r.grpc_status == UNIMPLEMENTED, str(r)
    if transport != "grpcio":
        assert r.grpc_message == "unknown method Nope for service etcdserverpb.KV", str(r)


def test_grpc_message_is_percent_encoded(h2c: H2Client, transport: str) -> None:
    if transport == "grpcio":
        pytest.skip("grpcio differs from the contract: grpc-core says 'Method not found!' (no method name to encode)")
    r = h2c.unary("/etcdserverpb.KV/F%C3%BC%20x")  # the method name itself holds '%'
    raw = r.trailer("grpc-message") or ""
    assert "%25" in raw and " " not in raw.replace("unknown method ", "").split(" for")[0], raw
    assert r.grpc_message == "unknown method F%C3%BC%20x for service etcdserverpb.KV", raw


def test_method_not_post_is_405(h2c: H2Client) -> None:
    headers = [(":method", "GET") if k == ":method" else (k, v) for k, v in grpc_request_headers()]
    sid = h2c.start_request(headers=headers, body=range_request())
    r = h2c.read_response(sid)
    assert r.status == "405", str(r)


def test_content_type_not_grpc_is_415(h2c: H2Client) -> None:
    headers = [(k, "text/plain" if k == "content-type" else v) for k, v in grpc_request_headers()]
    r = h2c.read_response(h2c.start_request(headers=headers, body=range_request()))
    assert r.status == "415", str(r)


@pytest.mark.parametrize("content_type", ["application/grpc+proto", "application/grpc;charset=utf-8"])
def test_content_type_variants_accepted(h2c: H2Client, content_type: str) -> None:
    headers = [(k, content_type if k == "content-type" else v) for k, v in grpc_request_headers()]
    r = h2c.read_response(h2c.start_request(headers=headers, body=range_request()))
    assert r.grpc_status == OK, str(r)


@pytest.mark.parametrize("value", ["1x", "abc", "123456789S", "-1S", "S"])
def test_grpc_timeout_malformed(h2c: H2Client, value: str) -> None:
    r = h2c.unary(extra=[("grpc-timeout", value)])
    assert r.grpc_status == INTERNAL, str(r)
    assert r.grpc_message.startswith("transport: malformed grpc-timeout"), str(r)


@pytest.mark.parametrize("value", ["5S", "5000m", "5000000u", "1M", "1H", "99999999n", "99999999H"])
def test_grpc_timeout_valid_units(h2c: H2Client, value: str) -> None:
    r = h2c.unary(extra=[("grpc-timeout", value)])
    assert r.grpc_status == OK, str(r)


def test_grpc_timeout_is_the_deadline(h2c: H2Client, stubs: Stubs) -> None:
    """A Lock on a held lock blocks; with grpc-timeout 300m it ends DEADLINE_EXCEEDED well before 3 s."""
    holder = stubs.lease.LeaseGrant(rpc_pb2.LeaseGrantRequest(TTL=30)).ID
    waiter = stubs.lease.LeaseGrant(rpc_pb2.LeaseGrantRequest(TTL=30)).ID
    name = f"h2grpc/lock-{time.monotonic_ns()}".encode()
    try:
        stubs.lock.Lock(v3lock_pb2.LockRequest(name=name, lease=holder), timeout=10)
        body = v3lock_pb2.LockRequest(name=name, lease=waiter).SerializeToString()
        started = time.monotonic()
        r = h2c.unary("/v3lockpb.Lock/Lock", body, extra=[("grpc-timeout", "300m")], timeout=10)
        took = time.monotonic() - started
        assert r.grpc_status == DEADLINE_EXCEEDED, str(r)
        assert 0.25 < took < 3, took
    finally:
        for lease in (holder, waiter):
            stubs.lease.LeaseRevoke(rpc_pb2.LeaseRevokeRequest(ID=lease))


def test_grpc_encoding_unknown(h2c: H2Client) -> None:
    sid = h2c.new_stream_id()
    h2c.send(
        h2c.headers_frame(sid, grpc_request_headers(extra=[("grpc-encoding", "snappy")]))
        + frame_bytes(DATA, END_STREAM, sid, grpc_message(b"\x00\x01\x02", compressed=True))
    )
    r = h2c.read_response(sid)
    assert r.grpc_status == UNIMPLEMENTED, str(r)
    assert r.grpc_message == 'grpc: Decompressor is not installed for grpc-encoding "snappy"', str(r)


def test_grpc_encoding_unknown_but_message_uncompressed(h2c: H2Client) -> None:
    """An unknown grpc-encoding is refused from the header alone, like grpc-go, even for an uncompressed message."""
    r = h2c.unary(extra=[("grpc-encoding", "snappy")])
    assert r.grpc_status == 12, str(r)
    assert r.grpc_message == 'grpc: Decompressor is not installed for grpc-encoding "snappy"', str(r)


def test_grpc_encoding_gzip(h2c: H2Client, stubs: Stubs) -> None:
    stubs.kv.Put(rpc_pb2.PutRequest(key=b"h2grpc/gzip", value=b"zipped"))
    sid = h2c.new_stream_id()
    h2c.send(
        h2c.headers_frame(sid, grpc_request_headers(extra=[("grpc-encoding", "gzip")]))
        + frame_bytes(DATA, END_STREAM, sid, grpc_message(gzip.compress(range_request(b"h2grpc/gzip")), True))
    )
    r = h2c.read_response(sid)
    assert r.grpc_status == OK, str(r)
    assert rpc_pb2.RangeResponse.FromString(r.messages[0]).kvs[0].value == b"zipped"


def test_grpc_encoding_identity_uncompressed(h2c: H2Client) -> None:
    r = h2c.unary(extra=[("grpc-encoding", "identity"), ("grpc-accept-encoding", "identity")])
    assert r.grpc_status == OK, str(r)


def test_compressed_flag_with_identity_encoding(h2c: H2Client) -> None:
    """The compressed flag without a grpc-encoding: grpc-go's INTERNAL answer."""
    sid = h2c.new_stream_id()
    h2c.send(
        h2c.headers_frame(sid, grpc_request_headers())
        + frame_bytes(DATA, END_STREAM, sid, grpc_message(range_request(), compressed=True))
    )
    r = h2c.read_response(sid)
    assert r.grpc_status == INTERNAL, str(r)
    assert r.grpc_message == "grpc: compressed flag set with identity or empty encoding", str(r)


def test_request_trailers_accepted(h2c: H2Client) -> None:
    """A request ending with a trailing HEADERS (END_STREAM) instead of END_STREAM on DATA is served."""
    sid = h2c.new_stream_id()
    h2c.send(
        h2c.headers_frame(sid, grpc_request_headers())
        + frame_bytes(DATA, 0, sid, grpc_message(range_request()))
        + h2c.headers_frame(sid, [("x-client-trailer", "1")], end_stream=True)
    )
    r = h2c.read_response(sid)
    assert r.grpc_status == OK, str(r)


def test_message_larger_than_the_limit(h2c: H2Client) -> None:
    """A message whose declared length is above the receive limit is refused from its prefix alone
    (nothing near that size is sent)."""
    sid = h2c.new_stream_id()
    h2c.send(
        h2c.headers_frame(sid, grpc_request_headers())
        + frame_bytes(DATA, 0, sid, struct.pack(">BI", 0, 1 << 30) + b"\x0a\x01k")
    )
    r = h2c.read_response(sid)
    assert r.grpc_status == RESOURCE_EXHAUSTED, str(r)
    m = re.fullmatch(r"grpc: received message larger than max \((\d+) vs\. (\d+)\)", r.grpc_message)
    assert m and int(m.group(1)) == 1 << 30 and int(m.group(2)) < 1 << 30, str(r)


def test_message_split_across_data_frames(h2c: H2Client, stubs: Stubs) -> None:
    """One message in 1-byte DATA frames (the 5-byte prefix split too)."""
    stubs.kv.Put(rpc_pb2.PutRequest(key=b"h2grpc/split", value=b"pieces"))
    sid = h2c.new_stream_id()
    msg = grpc_message(range_request(b"h2grpc/split"))
    out = h2c.headers_frame(sid, grpc_request_headers())
    out += b"".join(frame_bytes(DATA, 0, sid, msg[i : i + 1]) for i in range(len(msg)))
    out += frame_bytes(DATA, END_STREAM, sid, b"")
    h2c.send(out)
    r = h2c.read_response(sid)
    assert r.grpc_status == OK, str(r)
    assert rpc_pb2.RangeResponse.FromString(r.messages[0]).kvs[0].value == b"pieces"


def test_two_messages_in_one_data_frame(h2c: H2Client) -> None:
    """Two WatchCreateRequests in one DATA frame on a Watch stream: two created responses."""
    sid = h2c.new_stream_id()
    body = grpc_message(watch_create_request(b"h2grpc/w1")) + grpc_message(watch_create_request(b"h2grpc/w2"))
    h2c.send(h2c.headers_frame(sid, grpc_request_headers(WATCH_PATH)) + frame_bytes(DATA, 0, sid, body))
    deadline = time.monotonic() + 5
    while len(h2c.responses.get(sid, Response(sid)).messages) < 2 and time.monotonic() < deadline:
        h2c.read_frame(0.2)
    r = h2c.responses[sid]
    created = [rpc_pb2.WatchResponse.FromString(m) for m in r.messages]
    assert len(created) == 2 and all(w.created for w in created), str(r)
    assert created[0].watch_id != created[1].watch_id
    h2c.send_rst(sid)


def test_bin_metadata_accepted(h2c: H2Client) -> None:
    r = h2c.unary(extra=[("x-trace-bin", bin_header(b"\x00\x01\xfe\xff")), ("x-plain", "text")])
    assert r.grpc_status == OK, str(r)


def test_cancel_then_connection_still_serves(h2c: H2Client) -> None:
    """RST_STREAM CANCEL ends a Watch stream; the connection and its other streams carry on."""
    sid = h2c.start_request(WATCH_PATH, watch_create_request(b"h2grpc/cancel"), end_stream=False)
    other = h2c.start_request(WATCH_PATH, watch_create_request(b"h2grpc/other"), end_stream=False)
    for s in (sid, other):
        h2c.wait_for_data(s)
    h2c.send_rst(sid)
    r = h2c.unary(RANGE_PATH, range_request())
    assert r.grpc_status == OK, str(r)
    h2c.expect_alive()
    assert h2c.responses[other].reset is None and not h2c.responses[other].ended, str(h2c.responses[other])
    h2c.send_rst(other)


def test_upstream_error_is_trailers_only(h2c: H2Client) -> None:
    """An error etcd answers (Range without a key: InvalidArgument) comes back as one HEADERS frame with
    :status 200, content-type, grpc-status and grpc-message, END_STREAM set."""
    r = h2c.unary(body=rpc_pb2.RangeRequest().SerializeToString())
    assert_trailers_only(r)
    assert r.grpc_status == 3 and r.grpc_message == "etcdserver: key is not provided", str(r)


def test_cancel_reaches_etcd(h2c: H2Client, stubs: Stubs) -> None:
    """RST_STREAM CANCEL on a Lock blocked behind a held lock: the forwarded call is cancelled too, so
    etcd's lock service withdraws the waiter's key (it would stay while the call lived)."""
    holder = stubs.lease.LeaseGrant(rpc_pb2.LeaseGrantRequest(TTL=60)).ID
    waiter = stubs.lease.LeaseGrant(rpc_pb2.LeaseGrantRequest(TTL=60)).ID
    name = f"h2grpc/cancel-lock-{time.monotonic_ns()}".encode()
    prefix = rpc_pb2.RangeRequest(key=name + b"/", range_end=name + b"0", count_only=True)
    try:
        stubs.lock.Lock(v3lock_pb2.LockRequest(name=name, lease=holder), timeout=10)
        body = v3lock_pb2.LockRequest(name=name, lease=waiter).SerializeToString()
        sid = h2c.start_request("/v3lockpb.Lock/Lock", body)
        wait_until(lambda: stubs.kv.Range(prefix).count == 2, 10, "the waiter's key")
        h2c.send_rst(sid)
        wait_until(lambda: stubs.kv.Range(prefix).count == 1, 10, "the waiter's key to go after the cancel")
        h2c.expect_alive()
    finally:
        for lease in (holder, waiter):
            stubs.lease.LeaseRevoke(rpc_pb2.LeaseRevokeRequest(ID=lease))


def test_client_goaway_then_close(h2c: H2Client) -> None:
    """GOAWAY from the client: the stream in flight finishes, then the server closes the connection."""
    sid = h2c.start_request(WATCH_PATH, watch_create_request(b"h2grpc/goaway"), end_stream=False)
    h2c.read_until(lambda f: f.type == DATA and f.stream_id == sid, what="created")
    unary = h2c.start_request(body=range_request())
    h2c.send_goaway(last_stream_id=0)
    r = h2c.read_response(unary)
    assert r.grpc_status == OK, str(r)
    h2c.send_rst(sid)  # the last open stream ends: nothing keeps the connection
    h2c.expect_closed(5)


def test_watch_cancel_reaches_etcd(h2c: H2Client, etcd_server: EtcdServer) -> None:
    """RST_STREAM CANCEL on the only Watch of a key: the proxy's watcher on etcd goes away too."""

    def watchers() -> float:
        return etcd_server.metric("etcd_debugging_mvcc_watcher_total")

    base = watchers()
    key = f"h2grpc/wcancel-{time.monotonic_ns()}".encode()
    sid = h2c.start_request(WATCH_PATH, watch_create_request(key), end_stream=False)
    h2c.wait_for_data(sid)
    wait_until(lambda: watchers() > base, 10, "a watcher on etcd")
    h2c.send_rst(sid)
    wait_until(lambda: watchers() <= base, 10, "the watcher on etcd to go after the cancel")
