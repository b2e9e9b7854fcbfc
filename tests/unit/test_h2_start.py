"""Unary calls run by a ``start`` function (rpc.MethodHandler.start), without a Task: the Dispatcher's side
(answers now or later, deadline, reset, errors, inline first), and the worker's forwarded unary methods on it
(worker/handlers.py ``_Route``) with a real HubClient over ZeroMQ, the test playing the hub's end of the IPC link
with real schema messages: answers, etcd errors, validation, namespace rewriting, cancellation and deadlines
reaching the hub as Cancel, a hub restart, and the RpcStats counts of each."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import zmq

from etcdproxy import metrics
from etcdproxy.core.namespace import Namespace
from etcdproxy.etcdpb import kv_pb2, rpc_pb2
from etcdproxy.h2 import frames as f
from etcdproxy.h2.rpc import Abort, Context, Respond, Stop, unary_unary
from etcdproxy.ipc import codec
from etcdproxy.ipc import schema as s
from etcdproxy.worker.handlers import Handlers
from etcdproxy.worker.hubclient import HubClient
from tests.unit.test_h2_dispatch import Conn, run


async def _unused(request: bytes, context: Context) -> bytes:
    raise AssertionError("a start handler's behaviour must not run")


def _tasks() -> int:
    return len(asyncio.all_tasks())


async def _turns(n: int = 3) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


# ---- the Dispatcher ---------------------------------------------------------------------------------


def test_start_answers_later_without_a_task() -> None:
    pending: list[tuple[bytes, Respond]] = []

    def start(request: bytes, context: Context, respond: Respond) -> Stop | None:
        pending.append((request, respond))
        return lambda: None

    async def main() -> None:
        c = Conn({"/s/M": unary_unary(_unused, start=start)})
        before = _tasks()
        assert c.send(c.client.headers(1, "/s/M") + c.data(1, b"a")) == []
        assert c.send(c.client.headers(3, "/s/M") + c.data(3, b"b")) == []
        assert _tasks() == before  # no Task per call
        assert [r for r, _ in pending] == [b"a", b"b"]
        pending[1][1](0, b"answer-b")
        pending[0][1](5, "not found")
        frames = c.take()
        assert c.answer(frames, 3) == ([b"answer-b"], {b"grpc-status": b"0"})
        messages, trailers = c.answer(frames, 1)
        assert messages == [] and trailers[b"grpc-status"] == b"5" and trailers[b"grpc-message"] == b"not found"
        assert not c.client.conn.streams

    run(main)


def test_start_that_answers_at_once_or_raises() -> None:
    def now(request: bytes, context: Context, respond: Respond) -> Stop | None:
        respond(0, b"now:" + request)
        return None

    def aborts(request: bytes, context: Context, respond: Respond) -> Stop | None:
        raise Abort(3, "bad request")

    def breaks(request: bytes, context: Context, respond: Respond) -> Stop | None:
        raise ValueError("boom")

    async def main() -> None:
        c = Conn(
            {
                "/s/N": unary_unary(_unused, start=now),
                "/s/A": unary_unary(_unused, start=aborts),
                "/s/B": unary_unary(_unused, start=breaks),
            }
        )
        assert c.answer(c.send(c.client.headers(1, "/s/N") + c.data(1, b"x")), 1) == (
            [b"now:x"],
            {b"grpc-status": b"0"},
        )
        _, trailers = c.answer(c.send(c.client.headers(3, "/s/A") + c.data(3, b"x")), 3)
        assert trailers[b"grpc-status"] == b"3" and trailers[b"grpc-message"] == b"bad request"
        _, trailers = c.answer(c.send(c.client.headers(5, "/s/B") + c.data(5, b"x")), 5)
        assert trailers[b"grpc-status"] == b"2" and trailers[b"grpc-message"] == b"Unexpected ValueError: boom"
        assert not c.client.conn.streams

    run(main)


def test_inline_answer_comes_before_start() -> None:
    started: list[bytes] = []

    def start(request: bytes, context: Context, respond: Respond) -> Stop | None:
        started.append(request)
        respond(0, b"forwarded")
        return None

    async def main() -> None:
        c = Conn({"/s/M": unary_unary(_unused, inline=lambda r, ctx: b"hit" if r == b"h" else None, start=start)})
        assert c.answer(c.send(c.client.headers(1, "/s/M") + c.data(1, b"h")), 1)[0] == [b"hit"]
        assert c.answer(c.send(c.client.headers(3, "/s/M") + c.data(3, b"m")), 3)[0] == [b"forwarded"]
        # with a deadline the Call exists from the headers: the same order
        frames = c.send(c.client.headers(5, "/s/M", extra=[("grpc-timeout", "5S")]) + c.data(5, b"h"))
        assert c.answer(frames, 5)[0] == [b"hit"]
        assert started == [b"m"]

    run(main)


def test_reset_and_deadline_stop_the_call_once_and_late_answers_are_dropped() -> None:
    responds: dict[bytes, Respond] = {}
    stopped: list[tuple[bytes, float | None]] = []

    def start(request: bytes, context: Context, respond: Respond) -> Stop | None:
        responds[request] = respond
        return lambda: stopped.append((request, context.time_remaining()))

    async def main() -> None:
        c = Conn({"/s/M": unary_unary(_unused, start=start)})
        c.send(c.client.headers(1, "/s/M") + c.data(1, b"reset"))
        c.send(c.client.headers(3, "/s/M", extra=[("grpc-timeout", "30m")]) + c.data(3, b"late"))
        c.send(c.client.headers(5, "/s/M", extra=[("grpc-timeout", "5S")]) + c.data(5, b"in-time"))
        c.send(f.rst_stream(1, f.CANCEL))
        assert stopped == [(b"reset", None)]
        await asyncio.sleep(0.1)
        assert [r for r, _ in stopped] == [b"reset", b"late"] and stopped[1][1] == 0.0
        frames = c.take()
        _, trailers = c.answer(frames, 3)
        assert trailers[b"grpc-status"] == b"4" and trailers[b"grpc-message"] == b"context deadline exceeded"
        responds[b"reset"](0, b"too late")
        responds[b"late"](0, b"too late")
        responds[b"in-time"](0, b"ok")  # answered: its deadline timer is gone
        frames = c.take()
        assert {sid for _, _, sid, _ in frames} == {5}
        assert c.answer(frames, 5) == ([b"ok"], {b"grpc-status": b"0"})
        assert len(stopped) == 2 and not c.client.conn.streams

    run(main)


# ---- forwarded unary methods of a worker ------------------------------------------------------------

PUT = "/etcdserverpb.KV/Put"
EPOCH = 7


class HubEnd:
    """The hub's end of a worker's IPC link (a ROUTER), speaking the real schema."""

    def __init__(self, tmp_path: Path) -> None:
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.endpoint = f"ipc://{tmp_path}/hub.sock"
        self.sock.bind(self.endpoint)
        self.identity = b""
        self.seq = 0
        self.epoch = EPOCH

    async def received(self, kind: s.Kind, within: float = 5.0) -> list[Any]:
        """Every message of ``kind`` the worker sent until the first one arrives (pings are skipped)."""
        end = time.monotonic() + within
        while time.monotonic() < end:
            try:
                identity, frame = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                await asyncio.sleep(0.005)
                continue
            self.identity = identity
            found = [m for m in codec.decode_frame(frame) if m.kind is kind]
            if found:
                return found
        raise AssertionError(f"no {kind.name} from the worker within {within} s")

    async def nothing(self, kind: s.Kind, wait: float = 0.1) -> None:
        end = time.monotonic() + wait
        while time.monotonic() < end:
            try:
                _, frame = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                await asyncio.sleep(0.005)
                continue
            assert not [m for m in codec.decode_frame(frame) if m.kind is kind]

    def send(self, *messages: Any) -> None:
        self.sock.send_multipart([self.identity, b"".join(codec.encode(m) for m in messages)])

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def reply(self, req_id: int, code: int, body: bytes | str) -> None:
        self.send(s.Reply(self.epoch, self.next_seq(), req_id, code, body))

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


Scenario = Callable[[HubEnd, HubClient, Conn], Awaitable[None]]


def _with_worker(tmp_path: Path, scenario: Scenario, namespace: Namespace | None = None) -> None:
    async def main() -> None:
        hub_end = HubEnd(tmp_path)
        hub = HubClient(hub_end.endpoint, 0, asyncio.get_running_loop())
        hub.start()
        try:
            await hub_end.received(s.Kind.HELLO)
            hub_end.send(s.Pong(EPOCH, hub_end.next_seq(), s.SCHEMA_VERSION))
            for _ in range(200):
                if hub.epoch == EPOCH:
                    break
                await asyncio.sleep(0.005)
            assert hub.epoch == EPOCH
            await scenario(hub_end, hub, Conn(Handlers(hub, namespace).method_handlers()))
        finally:
            hub.close()
            hub_end.close()

    run(main)


def _put(key: bytes) -> bytes:
    data: bytes = rpc_pb2.PutRequest(key=key, value=b"v").SerializeToString()
    return data


def _counts(name: str) -> tuple[int, int, int, int, dict[str, int]]:
    stats = metrics.rpc_stats("unary", "etcdserverpb.KV", name)
    return stats.started, stats.received, stats.sent, stats.open, dict(stats.handled)


def _delta(before: tuple[Any, ...], after: tuple[Any, ...]) -> tuple[Any, ...]:
    handled = {k: v - before[4].get(k, 0) for k, v in after[4].items() if v != before[4].get(k, 0)}
    return (after[0] - before[0], after[1] - before[1], after[2] - before[2], after[3] - before[3], handled)


def test_forwarded_put_answers_errors_and_validation(tmp_path: Path) -> None:
    answer = rpc_pb2.PutResponse(header=rpc_pb2.ResponseHeader(revision=9)).SerializeToString()

    async def scenario(hub_end: HubEnd, hub: HubClient, c: Conn) -> None:
        before = _counts("Put")
        tasks = _tasks()
        c.send(c.client.headers(1, PUT, extra=[("token", "tok"), ("other", "x")]) + c.data(1, _put(b"k1")))
        c.send(c.client.headers(3, PUT) + c.data(3, _put(b"k2")))
        assert _tasks() == tasks
        unary = await hub_end.received(s.Kind.UNARY)
        if len(unary) < 2:
            unary += await hub_end.received(s.Kind.UNARY)
        assert [u.payload for u in unary] == [_put(b"k1"), _put(b"k2")]
        assert unary[0].metadata == [("token", "tok")] and unary[0].timeout_s is None
        hub_end.reply(unary[0].req_id, 0, answer)
        hub_end.reply(unary[1].req_id, 9, "etcdserver: requested lease not found")
        await asyncio.sleep(0.05)
        frames = c.take()
        assert c.answer(frames, 1) == ([answer], {b"grpc-status": b"0"})
        _, trailers = c.answer(frames, 3)
        assert trailers[b"grpc-status"] == b"9"
        assert trailers[b"grpc-message"] == b"etcdserver: requested lease not found"
        # malformed bytes: refused like etcd, nothing reaches the hub
        _, trailers = c.answer(c.send(c.client.headers(5, PUT) + c.data(5, b"\x0a\x05ab")), 5)
        assert trailers[b"grpc-status"] == b"13"
        assert trailers[b"grpc-message"].startswith(b"grpc: error unmarshalling request: ")
        await hub_end.nothing(s.Kind.UNARY)
        assert _delta(before, _counts("Put")) == (3, 3, 1, 0, {"OK": 1, "FailedPrecondition": 1, "Internal": 1})
        assert not hub.calls and not c.client.conn.streams

    _with_worker(tmp_path, scenario)


def test_forwarded_call_cancelled_or_expired_tells_the_hub(tmp_path: Path) -> None:
    async def scenario(hub_end: HubEnd, hub: HubClient, c: Conn) -> None:
        before = _counts("DeleteRange")
        path = "/etcdserverpb.KV/DeleteRange"
        request = rpc_pb2.DeleteRangeRequest(key=b"k").SerializeToString()
        c.send(c.client.headers(1, path) + c.data(1, request))
        (unary,) = await hub_end.received(s.Kind.UNARY)
        c.send(f.rst_stream(1, f.CANCEL))
        (cancel,) = await hub_end.received(s.Kind.CANCEL)
        assert (cancel.epoch, cancel.req_id) == (EPOCH, unary.req_id)
        hub_end.reply(unary.req_id, 0, b"")  # crossed the Cancel: dropped
        c.send(c.client.headers(3, path, extra=[("grpc-timeout", "100m")]) + c.data(3, request))
        (unary,) = await hub_end.received(s.Kind.UNARY)
        assert unary.timeout_s is not None and 0 < unary.timeout_s <= 0.1
        (cancel,) = await hub_end.received(s.Kind.CANCEL)
        assert cancel.req_id == unary.req_id
        hub_end.reply(unary.req_id, 0, b"")
        await asyncio.sleep(0.05)
        frames = c.take()
        assert not [fr for fr in frames if fr[2] == 1]
        _, trailers = c.answer(frames, 3)
        assert trailers[b"grpc-status"] == b"4" and trailers[b"grpc-message"] == b"context deadline exceeded"
        assert _delta(before, _counts("DeleteRange")) == (2, 2, 0, 0, {"Canceled": 1, "DeadlineExceeded": 1})
        assert not hub.calls and not c.client.conn.streams

    _with_worker(tmp_path, scenario)


def test_forwarded_put_in_flight_when_the_hub_restarts_is_unavailable(tmp_path: Path) -> None:
    async def scenario(hub_end: HubEnd, hub: HubClient, c: Conn) -> None:
        c.send(c.client.headers(1, PUT) + c.data(1, _put(b"k")))
        await hub_end.received(s.Kind.UNARY)
        hub_end.epoch, hub_end.seq = EPOCH + 1, 0
        hub_end.send(s.Pong(hub_end.epoch, hub_end.next_seq(), s.SCHEMA_VERSION))
        await asyncio.sleep(0.05)
        _, trailers = c.answer(c.take(), 1)
        assert trailers[b"grpc-status"] == b"14"  # a mutation in doubt: UNAVAILABLE, never re-sent
        assert not hub.calls

    _with_worker(tmp_path, scenario)


def test_forwarded_call_under_a_namespace(tmp_path: Path) -> None:
    namespace = Namespace(b"ns/")

    async def scenario(hub_end: HubEnd, hub: HubClient, c: Conn) -> None:
        path = "/etcdserverpb.KV/DeleteRange"
        request = rpc_pb2.DeleteRangeRequest(key=b"a", prev_kv=True).SerializeToString()
        c.send(c.client.headers(1, path) + c.data(1, request))
        (unary,) = await hub_end.received(s.Kind.UNARY)
        assert rpc_pb2.DeleteRangeRequest.FromString(unary.payload).key == b"ns/a"
        etcd_answer = rpc_pb2.DeleteRangeResponse(deleted=1, prev_kvs=[kv_pb2.KeyValue(key=b"ns/a")])
        hub_end.reply(unary.req_id, 0, etcd_answer.SerializeToString())
        await asyncio.sleep(0.05)
        (message,), trailers = c.answer(c.take(), 1)
        assert trailers == {b"grpc-status": b"0"}
        assert [kv.key for kv in rpc_pb2.DeleteRangeResponse.FromString(message).prev_kvs] == [b"a"]
        # refused by the namespace (whole key space): PERMISSION_DENIED from the worker, like the old path
        compact = rpc_pb2.CompactionRequest(revision=1).SerializeToString()
        _, trailers = c.answer(c.send(c.client.headers(3, "/etcdserverpb.KV/Compact") + c.data(3, compact)), 3)
        assert trailers[b"grpc-status"] == b"7"
        await hub_end.nothing(s.Kind.UNARY)

    _with_worker(tmp_path, scenario, namespace)
