"""etcdproxy.ipc.codec against etcdproxy.ipc.schema: pure byte-level tests, no sockets, no loop.

A ZeroMQ frame is several ``encode()`` outputs joined back to back (see ipc/sockets.py);
``decode_frame`` must give every message back, in order, or raise CodecError.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import msgpack
import pytest

from etcdproxy.ipc import schema as s
from etcdproxy.ipc.codec import CodecError, decode, decode_frame, encode

U64 = 2**64 - 1  # largest msgpack uint
I64_MIN = -(2**63)  # smallest msgpack int
BIN = b"\x00\xff\x00\x80\xfe\x7f"  # NULs, high bytes: must stay bytes, never text
TEXT = "clé ✓ 鍵 \U0001f600"  # non-ASCII, astral plane
META = [("token", "t\u00f6ken-\u2713"), ("x-empty", ""), ("authorization", "Bearer \x00")]
EVENTS = [(I64_MIN, True, BIN, b""), (U64, False, b"\xff" * 3, BIN)]
INTERVALS = [(b"\x00", b"\xff"), (b"a", b""), (b"", b"\x00")]

# Every message class at least once, every field away from any neutral value; several
# samples for the fields that take alternative shapes (None vs float, bytes vs str, [] vs [...]).
SAMPLES: list[s.Message] = [
    s.Hello(s.SCHEMA_VERSION, 7, 2**31 - 1),
    s.HttpRequest(U64, 3, "GET", "/health"),
    s.LeaseForget(U64, 4, 9, -1),
    s.LeaseForgotten(U64, 9),
    s.HttpAnswer(U64, 2, 3, 503, "text/plain; charset=utf-8", b"{}\n"),
    s.Hello(s.SCHEMA_VERSION + 1, -1, 0),  # the codec does not judge the version: Hello/Pong do
    s.Ping(U64),
    s.Ping(I64_MIN),
    s.Unary(U64, 2**40, 3, BIN, META, 1.5),
    s.Unary(1, -2, 0, b"", [], None),
    s.Cancel(2**63, -(2**62)),
    s.StreamOpen(9, 2**33, 11, META, 0.001),
    s.StreamOpen(9, 1, 0, [], None),
    s.StreamSend(U64, 5, BIN * 100),
    s.StreamHalfClose(3, -3),
    s.StreamAck(4, 5, 2**32 + 1),
    s.WatchCreate(U64, 12, BIN, b"\xff\xff", -1, META, True),
    s.WatchCreate(1, 0, b"", b"\x00", 2**62, [], False),
    s.WatchCancel(5, -12),
    s.WatchProgressRequest(6, 2**50, META),
    s.WatchProgressRequest(6, 0, []),
    s.LeaseKeepAlive(7, I64_MIN),
    s.CacheSync(U64),
    s.CacheAck(8, 2**63 - 1),
    s.Pong(U64, 2**48, s.SCHEMA_VERSION),
    s.Reply(U64, 2**40, -7, 0, BIN),
    s.Reply(1, 2, 3, 14, TEXT),  # error reply: body is the status text, a str
    s.StreamRecv(9, 10, 11, BIN * 3),
    s.StreamEnd(9, 10, 11, 13, TEXT),
    s.Stale(12, 13, -14),
    s.WatchCreated(15, 16, 17, 18, 2**63 + 5, BIN),
    s.WatchCanceled(19, 20, -1, 21, BIN, 2**40, TEXT, True),
    s.WatchCanceled(19, 20, 4, 21, b"", 0, "", False),
    s.WatchEvents(22, 23, 24, BIN, EVENTS, True),
    s.WatchEvents(22, 23, 24, BIN, [], False),  # progress notification
    s.WatchReplay(25, 26, 27, BIN, EVENTS),
    s.WatchReplay(25, 26, 27, b"", []),
    s.WatchProgress(28, 29, -30, BIN),
    s.LeaseAnswer(31, 32, 2**62, BIN, 12345.678, 60),
    s.LeaseAnswer(31, 33, -1, b"", 0.0, 0),
    s.LeaseNoLeader(33, U64),
    s.CacheState(34, 35, True, 2**60),
    s.CacheState(34, 35, False, -1),
    s.CacheInvalidate(36, 37, 38, INTERVALS, True, 2**50, U64),
    s.CacheInvalidate(36, 37, 0, [], False, 0, -1),
]


def _has_wire_tuples(message: s.Message) -> bool:
    """A non-metadata list field holding tuples (WireEvent, interval): decoded as lists, see below."""
    return any(
        f.name != "metadata" and isinstance(v, list) and any(isinstance(x, tuple) for x in v)
        for f in dataclasses.fields(message)
        for v in [getattr(message, f.name)]
    )


# Deliberate: only metadata pairs are turned back into tuples. Event and interval lists stay
# lists of lists (their readers unpack each item), so the hottest path, WatchEvents fan-out,
# pays no per-event conversion; the exact-equality test therefore leaves those samples out.


def _id(message: s.Message) -> str:
    return type(message).__name__


def _params(*, exact: bool) -> list[Any]:
    return [pytest.param(m, id=f"{_id(m)}-{i}") for i, m in enumerate(SAMPLES) if not (exact and _has_wire_tuples(m))]


def _plain(value: Any) -> Any:
    """Tuples and lists alike (msgpack has only arrays); everything else as is."""
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _types(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return [_types(v) for v in value]
    return type(value)


def _shape(message: Any) -> list[Any]:
    """Class, then each field's value and exact scalar types (so b"x" != "x", True != 1, 1 != 1.0)."""
    values = [getattr(message, f.name) for f in dataclasses.fields(message)]
    return [type(message), *((_plain(v), _types(v)) for v in values)]


def _same_modulo_tuples(got: Any, want: Any) -> None:
    assert _shape(got) == _shape(want)


# ---- coverage of the schema --------------------------------------------------------------------


def test_classes_table_matches_kind_enum() -> None:
    assert set(s.CLASSES) == set(s.Kind)
    for kind, cls in s.CLASSES.items():
        assert cls.__dataclass_fields__["kind"].default is kind, cls.__name__
    assert len(set(s.CLASSES.values())) == len(s.CLASSES)


def test_every_message_class_has_a_sample() -> None:
    """Adding a message to the schema without a sample here must fail."""
    assert {type(m) for m in SAMPLES} == set(s.CLASSES.values())
    assert {m.kind for m in SAMPLES} == set(s.Kind)


def test_every_sample_kind_is_its_class_default() -> None:
    # ``kind`` travels first on the wire and is never set by hand
    for m in SAMPLES:
        assert s.CLASSES[m.kind] is type(m)


# ---- round trip ------------------------------------------------------------------------------


@pytest.mark.parametrize("message", _params(exact=True))
def test_round_trip_exact(message: s.Message) -> None:
    assert decode_frame(encode(message)) == [message]
    assert decode(encode(message)) == message


@pytest.mark.parametrize("message", _params(exact=False))
def test_round_trip_values_and_types(message: s.Message) -> None:
    """Equal field by field with the same scalar types; tuples may come back as lists."""
    (got,) = decode_frame(encode(message))
    _same_modulo_tuples(got, message)
    _same_modulo_tuples(decode(encode(message)), message)
    assert got.kind is message.kind
    if getattr(message, "metadata", None):
        assert all(type(pair) is tuple for pair in got.metadata)  # type: ignore[union-attr]


def test_encoding_is_a_msgpack_array_kind_first() -> None:
    m = s.Unary(1, 2, 3, BIN, META, None)
    assert msgpack.unpackb(encode(m), raw=False) == [int(s.Kind.UNARY), 1, 2, 3, BIN, [list(p) for p in META], None]


# ---- batching ----------------------------------------------------------------------------------


def test_empty_frame_is_no_messages() -> None:
    assert decode_frame(b"") == []


@pytest.mark.parametrize(
    "batch",
    [
        pytest.param(SAMPLES, id="every-sample"),
        pytest.param(SAMPLES[::-1], id="every-sample-reversed"),
        pytest.param([s.Ping(1)] * 5, id="same-message-repeated"),
        pytest.param([s.Reply(1, i, i, 0, bytes([i % 256]) * i) for i in range(300)], id="300-replies"),
        pytest.param([s.StreamSend(1, 2, b""), s.StreamSend(1, 2, b"\x00")], id="tiny-payloads"),
    ],
)
def test_batched_frame_decodes_every_message_in_order(batch: list[s.Message]) -> None:
    frame = b"".join(encode(m) for m in batch)  # what sockets.py sends for one loop tick
    got = decode_frame(frame)
    assert len(got) == len(batch)
    for g, want in zip(got, batch, strict=True):
        _same_modulo_tuples(g, want)


def test_batched_frame_with_trailing_garbage_raises() -> None:
    frame = encode(s.Ping(1)) + encode(s.Ping(2)) + b"\xc1"
    with pytest.raises(CodecError):
        decode_frame(frame)


def test_single_decode_refuses_a_batch() -> None:
    with pytest.raises(CodecError):
        decode(encode(s.Ping(1)) + encode(s.Ping(2)))


# ---- errors ------------------------------------------------------------------------------------

_PING = encode(s.Ping(5))
_UNARY = encode(s.Unary(1, 2, 3, BIN, META, 1.0))


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


BAD_FRAMES: list[Any] = [
    pytest.param(b"\xc1", id="reserved-byte"),
    pytest.param(b"\xc1" * 16, id="reserved-bytes"),
    pytest.param(b"hello world", id="ascii-garbage"),
    pytest.param(b"\xff" * 8, id="negative-fixints"),
    pytest.param(_pack(0), id="scalar-int"),
    pytest.param(_pack(None), id="scalar-nil"),
    pytest.param(_pack("PING"), id="scalar-str"),
    pytest.param(_pack(b"\x02\x05"), id="scalar-bin"),
    pytest.param(_pack({"kind": 2, "epoch": 5}), id="map"),
    pytest.param(_pack([]), id="empty-array"),
    pytest.param(_pack([99, 1]), id="unknown-kind-99"),
    pytest.param(_pack([13, 1]), id="unknown-kind-in-gap"),
    pytest.param(_pack([0]), id="unknown-kind-0"),
    pytest.param(_pack([-1, 1]), id="unknown-kind-negative"),
    pytest.param(_pack(["PING", 1]), id="kind-as-name"),
    pytest.param(_pack([None, 1]), id="kind-nil"),
    pytest.param(_pack([[2], 1]), id="kind-array"),
    pytest.param(_pack([int(s.Kind.PING)]), id="too-few-fields"),
    pytest.param(_pack([int(s.Kind.PING), 1, 2]), id="too-many-fields"),
    pytest.param(_pack([int(s.Kind.UNARY), 1, 2, 3, b"", []]), id="unary-missing-timeout"),
    pytest.param(_pack([int(s.Kind.UNARY), 1, 2, 3, b"", 5, None]), id="metadata-not-a-list"),
    pytest.param(_pack([int(s.Kind.UNARY), 1, 2, 3, b"", [1], None]), id="metadata-pair-not-a-list"),
    pytest.param(_PING + _pack([]), id="good-then-empty-array"),
    pytest.param(_PING + _pack(7), id="good-then-scalar"),
    pytest.param(_PING[:-1], id="truncated-ping"),
    pytest.param(_UNARY[: len(_UNARY) // 2], id="truncated-unary"),
    pytest.param(_PING + _UNARY[:-1], id="batch-truncated-last"),
    pytest.param(b"\x91", id="array-header-only"),
    pytest.param(b"\xc6\x00\x00\x00\x10", id="bin32-header-only"),
]


@pytest.mark.parametrize("frame", BAD_FRAMES)
def test_bad_frame_raises_codec_error(frame: bytes) -> None:
    with pytest.raises(CodecError):
        decode_frame(frame)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"\xc1", id="reserved-byte"),
        pytest.param(b"", id="empty"),
        pytest.param(_pack(0), id="scalar-int"),
        pytest.param(_pack([]), id="empty-array"),
        pytest.param(_pack([99, 1]), id="unknown-kind-99"),
        pytest.param(_pack([int(s.Kind.PING), 1, 2]), id="too-many-fields"),
        pytest.param(_PING[:-1], id="truncated-ping"),
        pytest.param(_UNARY[: len(_UNARY) // 2], id="truncated-unary"),
        pytest.param(_pack([int(s.Kind.UNARY), 1, 2, 3, b"", 5, None]), id="metadata-not-a-list"),
        pytest.param(
            _pack([int(s.Kind.UNARY), 1, 2, 3, b"", [1], None]),
            id="metadata-pair-not-a-list",
        ),
    ],
)
def test_bad_single_message_raises_codec_error(data: bytes) -> None:
    with pytest.raises(CodecError):
        decode(data)


def test_codec_error_is_a_value_error() -> None:
    assert issubclass(CodecError, ValueError)


# ---- large frame -------------------------------------------------------------------------------

MiB = 1024 * 1024


def _available_mib() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 0


@pytest.mark.timeout(30)
@pytest.mark.skipif(_available_mib() < 2048, reason="needs ~2 GB available memory (allocates ~400 MB)")
def test_frame_over_msgpack_default_buffer_cap_decodes() -> None:
    """A batch carrying a Range response above msgpack's 100 MiB default buffer cap."""
    body = b"\x00\xff" * (101 * MiB // 2)
    frame = encode(s.Ping(1)) + encode(s.Reply(2, 3, 4, 0, body)) + encode(s.Ping(5))
    assert len(frame) > 100 * MiB
    start = time.monotonic()
    got = decode_frame(frame)
    elapsed = time.monotonic() - start
    assert [type(m) for m in got] == [s.Ping, s.Reply, s.Ping]
    reply = got[1]
    assert isinstance(reply, s.Reply)
    assert (reply.epoch, reply.seq, reply.req_id, reply.code) == (2, 3, 4, 0)
    assert isinstance(reply.body, bytes) and len(reply.body) == 101 * MiB
    assert reply.body == body
    assert elapsed < 3.0
