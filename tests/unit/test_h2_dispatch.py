"""The Dispatcher on a sans-I/O ServerConnection: the one-frame unary fast path (``complete``) and the slow paths
it must agree with (split messages, two messages, no message, deadlines, client streaming, resets)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from hpack import Decoder

from etcdproxy.h2 import frames as f
from etcdproxy.h2.rpc import (
    Abort,
    Context,
    Dispatcher,
    MethodHandler,
    stream_unary,
    unary_stream,
    unary_unary,
)
from etcdproxy.h2.server import ServerConnection, Settings
from tests.unit.test_h2_server import Client, Frame, parse


class Conn:
    """A Client whose connection runs a Dispatcher on a running event loop; counts wakeups."""

    def __init__(self, handlers: dict[str, MethodHandler]) -> None:
        self.loop = asyncio.get_running_loop()
        self.client = Client(handshake=False)
        self.wakeups = 0
        self.client.conn = ServerConnection(Dispatcher(handlers, self.loop), Settings(), 1000.0, self._wake)
        self.client.send(f.PREFACE + f.settings([]) + f.SETTINGS_ACK)
        self.decoder = Decoder()

    def _wake(self) -> None:
        self.wakeups += 1

    def data(self, sid: int, *messages: bytes, end: bool = True) -> bytes:
        body = b"".join(b"\x00" + len(m).to_bytes(4, "big") + m for m in messages)
        return f.frame(f.DATA, f.END_STREAM if end else 0, sid, body)

    def send(self, data: bytes) -> list[Frame]:
        return self.client.send(data)

    def take(self) -> list[Frame]:
        frames = parse(self.client.conn.take_output())
        self.client.received += frames
        return frames

    def answer(self, frames: list[Frame], sid: int) -> tuple[list[bytes], dict[bytes, bytes]]:
        """The messages and the last header block (trailers, or trailers-only) of stream ``sid``."""
        messages: list[bytes] = []
        last: dict[bytes, bytes] = {}
        for kind, _flags, stream_id, payload in frames:
            if stream_id != sid:
                continue
            if kind == f.DATA:
                messages.append(payload[5:])
            elif kind == f.HEADERS:
                last = dict(self.decoder.decode(payload, raw=True))
        return messages, last


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(test())


def test_inline_answer_is_written_within_receive_without_a_wakeup() -> None:
    seen: list[Any] = []

    def hit(request: bytes, context: Context) -> bytes | None:
        seen.append((request, context.invocation_metadata(), context.time_remaining()))
        return b"cached:" + request

    async def behaviour(request: bytes, context: Context) -> bytes:
        raise AssertionError("the inline answer must be used")

    async def main() -> None:
        c = Conn({"/s/M": unary_unary(behaviour, inline=hit)})
        frames = c.send(c.client.headers(1, "/s/M", extra=[("token", "t1")]) + c.data(1, b"abc"))
        assert [k for k, *_ in frames] == [f.HEADERS, f.DATA, f.HEADERS]
        messages, trailers = c.answer(frames, 1)
        assert messages == [b"cached:abc"] and trailers == {b"grpc-status": b"0"}
        assert seen == [(b"abc", (("token", "t1"),), None)]
        assert c.wakeups == 0  # the driver writes after receive(): no extra loop callback per read
        assert not c.client.conn.streams

    run(main)


def test_inline_miss_runs_the_behaviour_as_a_task() -> None:
    async def behaviour(request: bytes, context: Context) -> bytes:
        await asyncio.sleep(0)
        return b"slow:" + request

    async def main() -> None:
        c = Conn({"/s/M": unary_unary(behaviour, inline=lambda r, ctx: None)})
        assert c.send(c.client.headers(1, "/s/M") + c.data(1, b"x")) == []
        for _ in range(3):
            await asyncio.sleep(0)
        assert c.wakeups == 1
        messages, trailers = c.answer(c.take(), 1)
        assert messages == [b"slow:x"] and trailers[b"grpc-status"] == b"0"

    run(main)


def test_inline_abort_is_a_trailers_only_answer() -> None:
    def hit(request: bytes, context: Context) -> bytes | None:
        raise Abort(11, "compacted")

    async def main() -> None:
        c = Conn({"/s/M": unary_unary(lambda r, ctx: None, inline=hit)})  # type: ignore[arg-type,return-value]
        messages, trailers = c.answer(c.send(c.client.headers(1, "/s/M") + c.data(1, b"x")), 1)
        assert messages == [] and trailers[b"grpc-status"] == b"11" and trailers[b"grpc-message"] == b"compacted"
        assert trailers[b":status"] == b"200"

    run(main)


async def _echo(request: bytes, context: Context) -> bytes:
    return request


def test_two_messages_in_one_frame_are_refused_like_grpc_go() -> None:
    async def main() -> None:
        c = Conn({"/s/M": unary_unary(_echo, inline=lambda r, ctx: r)})
        _, trailers = c.answer(c.send(c.client.headers(1, "/s/M") + c.data(1, b"a", b"b")), 1)
        assert trailers[b"grpc-status"] == b"12"
        assert trailers[b"grpc-message"] == b"grpc: received more than one request message"

    run(main)


def test_message_split_across_frames_and_a_missing_message() -> None:
    async def main() -> None:
        c = Conn({"/s/M": unary_unary(_echo, inline=lambda r, ctx: b"i:" + r)})
        body = b"\x00" + (4).to_bytes(4, "big") + b"wxyz"
        split = f.frame(f.DATA, 0, 1, body[:3]) + f.frame(f.DATA, f.END_STREAM, 1, body[3:])
        messages, trailers = c.answer(c.send(c.client.headers(1, "/s/M") + split), 1)
        assert messages == [b"i:wxyz"] and trailers[b"grpc-status"] == b"0"
        _, trailers = c.answer(c.send(c.client.headers(3, "/s/M", end_stream=True)), 3)
        assert trailers[b"grpc-status"] == b"13"
        assert trailers[b"grpc-message"] == b"grpc: error while receiving request: EOF"
        # an empty message in its own DATA frame, then the half-close in another
        frames = c.send(c.client.headers(5, "/s/M") + c.data(5, b"", end=False) + f.frame(f.DATA, f.END_STREAM, 5))
        assert c.answer(frames, 5) == ([b"i:"], {b"grpc-status": b"0"})
        assert not c.client.conn.streams

    run(main)


def test_a_deadline_reaches_the_inline_function_and_counts_from_the_headers() -> None:
    remaining: list[float | None] = []

    def hit(request: bytes, context: Context) -> bytes | None:
        remaining.append(context.time_remaining())
        return b"ok"

    async def main() -> None:
        c = Conn({"/s/M": unary_unary(_echo, inline=hit)})
        c.send(c.client.headers(1, "/s/M", extra=[("grpc-timeout", "5S")]))
        await asyncio.sleep(0.05)
        messages, _ = c.answer(c.send(c.data(1, b"x")), 1)
        assert messages == [b"ok"]
        assert remaining[0] is not None and 4.0 < remaining[0] < 4.96

    run(main)


def test_unknown_method_and_content_length_mismatch() -> None:
    async def main() -> None:
        c = Conn({"/s/M": unary_unary(_echo)})
        _, trailers = c.answer(c.send(c.client.headers(1, "/s/Nope") + c.data(1, b"x")), 1)
        assert trailers[b"grpc-status"] == b"12" and trailers[b"grpc-message"] == b"unknown method Nope for service s"
        frames = c.send(c.client.headers(3, "/s/M", extra=[("content-length", "99")]) + c.data(3, b"x"))
        assert (f.RST_STREAM, 0, 3, f.PROTOCOL_ERROR.to_bytes(4, "big")) in frames
        assert not c.client.conn.streams

    run(main)


def test_client_streaming_request_in_one_frame() -> None:
    async def total(requests: AsyncIterator[bytes], context: Context) -> bytes:
        return b"+".join([r async for r in requests])

    async def main() -> None:
        c = Conn({"/s/C": stream_unary(total)})
        c.send(c.client.headers(1, "/s/C") + c.data(1, b"a"))
        c.send(c.client.headers(3, "/s/C") + c.data(3, b"a", b"b"))
        for _ in range(5):
            await asyncio.sleep(0)
        frames = c.take()
        assert c.answer(frames, 1)[0] == [b"a"] and c.answer(frames, 3)[0] == [b"a+b"]

    run(main)


def test_reset_before_the_answer_cancels_the_handler() -> None:
    cancelled: list[bool] = []

    async def forever(request: bytes, context: Context) -> AsyncIterator[bytes]:
        try:
            yield b"first"
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    async def main() -> None:
        c = Conn({"/s/W": unary_stream(forever)})
        c.send(c.client.headers(1, "/s/W") + c.data(1, b"go"))
        for _ in range(3):
            await asyncio.sleep(0)
        assert c.answer(c.take(), 1)[0] == [b"first"]
        c.send(f.rst_stream(1, f.CANCEL))
        for _ in range(3):
            await asyncio.sleep(0)
        assert cancelled == [True] and not c.client.conn.streams

    run(main)
