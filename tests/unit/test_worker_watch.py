"""The worker's Watch state machine across a hub restart, driven with the hub's own IPC messages.

The hub side is replaced by a recorder of what the worker sends (the messages are the real schema, the
WatchService is the real one): the cases are exact interleavings a soak against real etcd produced and
that an end-to-end test cannot time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from etcdproxy.etcdpb import kv_pb2, rpc_pb2
from etcdproxy.ipc import schema as s
from etcdproxy.worker.watch import WatchService, WatchStream

pytestmark = pytest.mark.timeout(30)


class RecordingHub:
    """What WatchService uses of HubClient: handler tables, the current epoch, and send."""

    def __init__(self) -> None:
        self.handlers: dict[s.Kind, Callable[[Any], None]] = {}
        self.on_new_epoch: list[Callable[[], None]] = []
        self.on_gap: list[Callable[[], None]] = []
        self.epoch = 1
        self.last_epoch = 1
        self.sent: list[Any] = []
        self._seq = 0

    def send(self, message: Any) -> None:
        self.sent.append(message)

    def seq(self) -> int:
        self._seq += 1
        return self._seq

    def restart(self) -> None:
        """A new hub (new epoch): the worker registers its c-watchers again."""
        self.epoch = self.last_epoch = self.epoch + 1
        self.sent.clear()
        for callback in self.on_new_epoch:
            callback()


def header(revision: int) -> bytes:
    return rpc_pb2.ResponseHeader(cluster_id=1, member_id=2, revision=revision, raft_term=3).SerializeToString()


def put_event(key: bytes, revision: int) -> s.WireEvent:
    event = kv_pb2.Event(
        type=kv_pb2.Event.PUT, kv=kv_pb2.KeyValue(key=key, value=b"v", create_revision=revision, mod_revision=revision)
    ).SerializeToString()
    return (revision, False, event, event)


def responses(stream: WatchStream) -> list[rpc_pb2.WatchResponse]:
    for watcher in list(stream.dirty.values()):
        stream.flush(watcher)
    return [rpc_pb2.WatchResponse.FromString(data) for data in stream.out]


def test_created_header_of_a_from_now_watch_survives_a_hub_restart() -> None:
    """Soak, seed 256792300: a "from now" watch created by the first hub (events from 3770, header 3769)
    but not yet answered (an earlier create of the stream was still waiting) was resumed by a new hub, whose
    header (3770) went out in its created answer, followed by event 3770: etcd never sends an event at or
    below a from-now watch's created revision."""

    async def scenario() -> None:
        hub = RecordingHub()
        service = WatchService(hub)  # type: ignore[arg-type]
        stream = WatchStream([], False)
        # an earlier create with a past start revision, not answered before the restart: it holds the fifo
        service._create(stream, rpc_pb2.WatchCreateRequest(key=b"/k/0", range_end=b"/k/1", start_revision=3760))
        service._create(stream, rpc_pb2.WatchCreateRequest(key=b"/k/0", range_end=b"/k/1"))
        first, from_now = (m.wid for m in hub.sent)
        service.on_created(s.WatchCreated(hub.epoch, hub.seq(), from_now, 7, 3770, header(3769)))
        assert not stream.out  # held behind the first create

        hub.restart()
        resumed = {m.wid: m for m in hub.sent}
        assert resumed[from_now].resume and resumed[from_now].start_revision == 3770
        assert not resumed[first].resume and resumed[first].start_revision == 3760
        service.on_created(s.WatchCreated(hub.epoch, hub.seq(), from_now, 3, 3770, header(3770)))
        service.on_created(s.WatchCreated(hub.epoch, hub.seq(), first, 4, 3760, header(3770)))
        service.on_events(s.WatchEvents(hub.epoch, hub.seq(), 3, header(3781), [put_event(b"/k/09", 3770)], False))

        out = responses(stream)
        created = {r.watch_id: r for r in out if r.created}
        assert sorted(created) == [0, 1]
        assert created[1].header.revision == 3769  # the first hub's: the watch starts after it
        events = [e.kv.mod_revision for r in out if r.watch_id == 1 for e in r.events]
        assert events == [3770]  # nothing lost either
        assert all(e > created[1].header.revision for e in events)

    asyncio.run(scenario())


def test_resumed_watch_neither_repeats_nor_skips_events() -> None:
    """A created watch that delivered up to 3772 resumes at 3773 on a new hub; the new hub's replay from an
    earlier revision is not repeated, and its created answer is not sent a second time."""

    async def scenario() -> None:
        hub = RecordingHub()
        service = WatchService(hub)  # type: ignore[arg-type]
        stream = WatchStream([], False)
        service._create(stream, rpc_pb2.WatchCreateRequest(key=b"/a", range_end=b"/b"))
        (wid,) = (m.wid for m in hub.sent)
        service.on_created(s.WatchCreated(hub.epoch, hub.seq(), wid, 1, 3771, header(3770)))
        batch = [put_event(b"/a1", 3771), put_event(b"/a2", 3772)]
        service.on_events(s.WatchEvents(hub.epoch, hub.seq(), 1, header(3772), batch, False))
        before = responses(stream)
        stream.out.clear()

        hub.restart()
        (resume,) = hub.sent
        assert resume.resume and resume.start_revision == 3773
        service.on_created(s.WatchCreated(hub.epoch, hub.seq(), wid, 5, 3773, header(3790)))
        service.on_replay(
            s.WatchReplay(hub.epoch, hub.seq(), wid, header(3790), [put_event(b"/a2", 3772), put_event(b"/a3", 3775)])
        )
        after = responses(stream)
        assert [r.created for r in before] == [True, False]
        assert not any(r.created for r in after)
        delivered = [e.kv.mod_revision for r in before + after for e in r.events]
        assert delivered == [3771, 3772, 3775]

    asyncio.run(scenario())
