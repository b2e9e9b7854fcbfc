"""Forwarding of client calls to etcd as raw bytes: unary calls and generic streams.

Bytes in, bytes out: nothing is decoded, so etcd's responses, status codes and messages
reach the client exactly as etcd produced them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from etcdproxy.core.methods import Method, Shape
from etcdproxy.h2 import aio
from etcdproxy.h2.status import StatusCode
from etcdproxy.ipc.schema import Metadata
from etcdproxy.upstream import interrupted

if TYPE_CHECKING:
    from etcdproxy.upstream import Upstream

log = logging.getLogger(__name__)

OK = int(StatusCode.OK)
UNAVAILABLE = int(StatusCode.UNAVAILABLE)
CANCELLED = int(StatusCode.CANCELLED)
# Like clientv3's retry interceptor for "repeatable" calls: up to 100 tries, 25 ms apart,
# bounded by the client's deadline.
RETRY_ATTEMPTS = 100
RETRY_BACKOFF_S = 0.025
# Flow control for upstream -> client streams: messages in flight to a worker before the
# hub stops reading from etcd and waits for the worker's StreamAck credit.
STREAM_WINDOW = 64


def status_of(exc: aio.RpcError) -> tuple[int, str]:
    return int(exc.code()), exc.details() or ""


# What a client sees when the endpoint its call was on is left (see upstream.py): like a
# broken connection to etcd, so clients retry what they consider safe to retry.
MOVED = (int(StatusCode.UNAVAILABLE), "etcdproxy: connection to etcd lost (endpoint failover)")
# A client deadline that passed while its mutation waited for a connection (grpc-go's wording).
DEADLINE = (int(StatusCode.DEADLINE_EXCEEDED), "context deadline exceeded")
# How often a mutation waiting for a connection re-checks that the upstream did not move.
READY_POLL_S = 0.25


class Forwarder:
    """Makes the upstream calls; one per hub, always on the upstream's current channel."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream

    async def unary(
        self, method: Method, payload: bytes, metadata: Metadata, timeout_s: float | None
    ) -> tuple[int, bytes | str]:
        """(0, response bytes) or (status code, message)."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        attempt = 0
        while True:
            attempt += 1
            channel = self.upstream.channel
            if not method.idempotent and channel.get_state(try_to_connect=True) is not aio.ChannelConnectivity.READY:
                # A mutation waits for a connection here, not inside the channel (wait_for_ready): one
                # that never left can then follow a failover to the next endpoint instead of
                # failing with the channel it was queued on.
                ready = await self._until_ready(channel, deadline)
                if ready is None:
                    return DEADLINE
                if not ready:
                    continue  # moved meanwhile: wait on the new channel
            remaining = None if deadline is None else max(deadline - loop.time(), 0.0)
            code, message, response, unprocessed = await channel.unary(
                method.path, payload, metadata, remaining, method.idempotent
            )
            if code == OK:
                return OK, response or b""
            # the upstream left this channel's endpoint (upstream.py): etcd may or may not have seen the call
            moved = code in (CANCELLED, UNAVAILABLE) and channel is not self.upstream.channel
            # a call etcd never processed (never sent, REFUSED_STREAM, above a GOAWAY's last stream id) is
            # repeatable whatever it is, mutations included
            repeatable = method.idempotent or unprocessed
            retry = (
                repeatable
                and (code == UNAVAILABLE or moved)
                and attempt < RETRY_ATTEMPTS
                and (deadline is None or deadline - loop.time() > RETRY_BACKOFF_S)
            )
            if not retry:
                return MOVED if moved else (code, message)
            if moved:
                continue  # the new endpoint is there already: no pause
            await asyncio.sleep(RETRY_BACKOFF_S)

    async def _until_ready(self, channel: aio.AioChannel, deadline: float | None) -> bool | None:
        """True once ``channel`` is READY, False if the upstream moved to another channel
        meanwhile, None if the deadline passed first."""
        loop = asyncio.get_running_loop()
        while True:
            if channel is not self.upstream.channel:
                return False
            state = channel.get_state(try_to_connect=True)
            if state is aio.ChannelConnectivity.READY:
                return True
            left = READY_POLL_S if deadline is None else min(READY_POLL_S, deadline - loop.time())
            if left <= 0:
                return None
            try:
                await asyncio.wait_for(channel.wait_for_state_change(state), left)
            except TimeoutError:
                pass
            except asyncio.CancelledError:
                if not interrupted():
                    raise
            except Exception:  # the channel was closed under us: the loop sees the move
                await asyncio.sleep(0.05)


class UpstreamStream:
    """One client stream mirrored onto one upstream stream.

    ``emit(payload)`` is called per upstream message and ``finish(code, message)`` exactly
    once at the end (not when cancelled: then the worker is gone or gave up).
    """

    def __init__(
        self,
        upstream: Upstream,
        method: Method,
        metadata: Metadata,
        timeout_s: float | None,
        emit: Callable[[bytes], None],
        finish: Callable[[int, str], None],
    ) -> None:
        self.method = method
        self._upstream = upstream
        self._channel: aio.AioChannel | None = None
        self._metadata = metadata
        self._timeout_s = timeout_s
        self._emit = emit
        self._finish = finish
        self._outbox: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._window = STREAM_WINDOW
        self._credit = asyncio.Event()
        self._call: Any = None
        self.task = asyncio.get_running_loop().create_task(self._run())

    def send(self, payload: bytes) -> None:
        self._outbox.put_nowait(payload)

    def half_close(self) -> None:
        self._outbox.put_nowait(None)

    def ack(self, count: int) -> None:
        self._window += count
        if self._window > 0:
            self._credit.set()

    def cancel(self) -> None:
        if self._call is not None:
            self._call.cancel()
        self.task.cancel()

    async def _write_loop(self) -> None:
        while True:
            payload = await self._outbox.get()
            if payload is None:
                await self._call.done_writing()
                return
            await self._call.write(payload)

    async def _run(self) -> None:
        writer: asyncio.Task[None] | None = None
        try:
            if self.method.shape is Shape.SERVER_STREAM:
                first = await self._outbox.get()
                if first is None:  # half-closed without a request: grpc-go's answer
                    self._finish(int(StatusCode.INTERNAL), "grpc: error unmarshalling request: EOF")
                    return
                self._channel = self._upstream.channel
                self._call = self._channel.unary_stream(self.method.path)(
                    first, metadata=self._metadata, timeout=self._timeout_s, wait_for_ready=True
                )
            else:
                self._channel = self._upstream.channel
                self._call = self._channel.stream_stream(self.method.path)(
                    metadata=self._metadata, timeout=self._timeout_s, wait_for_ready=True
                )
                writer = asyncio.get_running_loop().create_task(self._write_loop())
            while True:
                message = await self._call.read()
                if message is aio.EOF:
                    break
                self._emit(message)
                self._window -= 1
                while self._window <= 0:
                    self._credit.clear()
                    await self._credit.wait()
            code = await self._call.code()
            self._finish(int(code), await self._call.details() or "")
        except aio.RpcError as exc:
            lost = exc.code() in (StatusCode.CANCELLED, StatusCode.UNAVAILABLE)
            moved = lost and self._channel is not self._upstream.channel
            self._finish(*(MOVED if moved else status_of(exc)))
        except asyncio.CancelledError:
            if interrupted():  # its channel was closed to fail over (upstream.py)
                self._finish(*MOVED)
                return
            if self._call is not None:
                self._call.cancel()
            raise
        except Exception as exc:  # a bug here must end the client's stream, not hang it
            log.exception("upstream stream %s failed", self.method.path)
            self._finish(int(StatusCode.UNKNOWN), f"etcdproxy: {exc}")
        finally:
            if writer is not None:
                writer.cancel()
