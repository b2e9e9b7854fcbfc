"""Every message exchanged between the hub and the workers; nothing else defines one.

Each message is one ZeroMQ frame holding a msgpack array ``[kind, *fields]`` (see codec.py).
etcd payloads stay serialized protobuf bytes, so nothing is decoded twice.

Invariants:
* Every hub -> worker message carries the hub's ``epoch`` (random, fixed for the life of one
  hub process) and a per-worker ``seq`` that starts at 1 and grows by one per message. A
  worker that sees a new epoch knows the hub restarted; a seq gap means a lost message.
* Every worker -> hub request carries the epoch the worker believes in. A hub executes only
  requests addressed to its own epoch and answers the others with ``Stale``, so a request is
  executed by at most one hub even when ZeroMQ re-delivers it after a reconnect.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from etcdproxy.core.events import WireEvent as WireEvent  # re-exported: s.WireEvent

# Bumped whenever a message below changes shape; checked in the Hello/Pong exchange.
SCHEMA_VERSION = 5

# metadata forwarded from a client call to etcd: (key, value) pairs such as ("token", "...")
Metadata = list[tuple[str, str]]


class Kind(enum.IntEnum):
    # worker -> hub
    HELLO = 1
    PING = 2
    UNARY = 3
    CANCEL = 4
    STREAM_OPEN = 5
    STREAM_SEND = 6
    STREAM_HALF_CLOSE = 7
    STREAM_ACK = 8
    WATCH_CREATE = 9
    WATCH_CANCEL = 10
    WATCH_PROGRESS_REQUEST = 11
    LEASE_KEEPALIVE = 12
    CACHE_SYNC = 16
    CACHE_ACK = 17
    HTTP_REQUEST = 18
    LEASE_FORGOTTEN = 19
    # hub -> worker
    PONG = 20
    REPLY = 21
    STREAM_RECV = 22
    STREAM_END = 23
    STALE = 24
    WATCH_CREATED = 25
    WATCH_CANCELED = 26
    WATCH_EVENTS = 27
    WATCH_REPLAY = 28
    WATCH_PROGRESS = 29
    LEASE_ANSWER = 30
    LEASE_NO_LEADER = 31
    CACHE_STATE = 36
    CACHE_INVALIDATE = 37
    HTTP_ANSWER = 38
    LEASE_FORGET = 39


@dataclass(frozen=True, slots=True)
class Hello:
    """A worker announces itself (sent at start and whenever it stops hearing the hub)."""

    schema_version: int
    worker_index: int
    pid: int
    kind: Kind = Kind.HELLO


@dataclass(frozen=True, slots=True)
class Ping:
    """Liveness probe; the hub answers with Pong carrying its epoch."""

    epoch: int
    kind: Kind = Kind.PING


@dataclass(frozen=True, slots=True)
class Unary:
    """Forward one unary call. ``timeout_s`` is the client's remaining deadline (None: none)."""

    epoch: int
    req_id: int
    method: int  # index in core.methods.METHODS
    payload: bytes
    metadata: Metadata
    timeout_s: float | None
    kind: Kind = Kind.UNARY


@dataclass(frozen=True, slots=True)
class Cancel:
    """The client went away: cancel the unary call or stream with this id."""

    epoch: int
    req_id: int
    kind: Kind = Kind.CANCEL


@dataclass(frozen=True, slots=True)
class StreamOpen:
    """Open an upstream stream for one client stream; ``req_id`` names it from now on."""

    epoch: int
    req_id: int
    method: int
    metadata: Metadata
    timeout_s: float | None
    kind: Kind = Kind.STREAM_OPEN


@dataclass(frozen=True, slots=True)
class StreamSend:
    """One client message (serialized request) for an open stream."""

    epoch: int
    req_id: int
    payload: bytes
    kind: Kind = Kind.STREAM_SEND


@dataclass(frozen=True, slots=True)
class StreamHalfClose:
    """The client finished sending on the stream (it still reads)."""

    epoch: int
    req_id: int
    kind: Kind = Kind.STREAM_HALF_CLOSE


@dataclass(frozen=True, slots=True)
class StreamAck:
    """Flow-control credit: the worker wrote ``count`` more StreamRecv messages to its client."""

    epoch: int
    req_id: int
    count: int
    kind: Kind = Kind.STREAM_ACK


@dataclass(frozen=True, slots=True)
class Pong:
    epoch: int
    seq: int
    schema_version: int
    kind: Kind = Kind.PONG


@dataclass(frozen=True, slots=True)
class Reply:
    """Answer to Unary. code 0: ``body`` is the serialized response; else the status message."""

    epoch: int
    seq: int
    req_id: int
    code: int  # grpc.StatusCode value[0]
    body: bytes | str
    kind: Kind = Kind.REPLY


@dataclass(frozen=True, slots=True)
class StreamRecv:
    """One upstream message for a client stream (serialized response)."""

    epoch: int
    seq: int
    req_id: int
    payload: bytes
    kind: Kind = Kind.STREAM_RECV


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """The upstream stream ended with this status (code 0: OK)."""

    epoch: int
    seq: int
    req_id: int
    code: int
    message: str
    kind: Kind = Kind.STREAM_END


@dataclass(frozen=True, slots=True)
class Stale:
    """The request named a different hub epoch and was not executed."""

    epoch: int
    seq: int
    req_id: int
    kind: Kind = Kind.STALE


# ---- watch hub (issue 4) --------------------------------------------------------------------
# An event travels hub -> worker as core.events.WireEvent (imported above).


@dataclass(frozen=True, slots=True)
class WatchCreate:
    """Register c-watcher ``wid`` (unique within the worker process) on [key, range_end).

    ``start_revision`` 0 means "from now". ``resume`` is set when the worker re-registers a
    c-watcher after a hub restart: the client already got its created response.
    """

    epoch: int
    wid: int
    key: bytes
    range_end: bytes
    start_revision: int
    metadata: Metadata
    resume: bool
    kind: Kind = Kind.WATCH_CREATE


@dataclass(frozen=True, slots=True)
class WatchCancel:
    epoch: int
    wid: int
    kind: Kind = Kind.WATCH_CANCEL


@dataclass(frozen=True, slots=True)
class WatchProgressRequest:
    """A client asked for progress (RequestProgress) on a stream holding these c-watchers."""

    epoch: int
    req_id: int
    metadata: Metadata
    kind: Kind = Kind.WATCH_PROGRESS_REQUEST


@dataclass(frozen=True, slots=True)
class WatchCreated:
    """c-watcher ``wid`` joined s-watcher ``sw_id``; it must deliver events from ``next_revision``.

    ``header`` is the serialized ResponseHeader of the created response.
    """

    epoch: int
    seq: int
    wid: int
    sw_id: int
    next_revision: int
    header: bytes
    kind: Kind = Kind.WATCH_CREATED


@dataclass(frozen=True, slots=True)
class WatchCanceled:
    """Cancel c-watchers: ``wid`` alone (>= 0), or every c-watcher of ``sw_id`` (wid -1).

    ``created`` tells whether the cancel is the answer to the create (a rejection).
    """

    epoch: int
    seq: int
    wid: int
    sw_id: int
    header: bytes
    compact_revision: int
    reason: str
    created: bool
    kind: Kind = Kind.WATCH_CANCELED


@dataclass(frozen=True, slots=True)
class WatchEvents:
    """One upstream response of s-watcher ``sw_id``, for every c-watcher of it in the worker.

    No events: a progress notification; ``progress_only`` marks one the hub asked for itself
    (it advances revisions but is not shown to clients as a progress notification).
    """

    epoch: int
    seq: int
    sw_id: int
    header: bytes
    events: list[WireEvent]
    progress_only: bool
    kind: Kind = Kind.WATCH_EVENTS


@dataclass(frozen=True, slots=True)
class WatchReplay:
    """Events from the hub's history for c-watcher ``wid`` alone (it joined late)."""

    epoch: int
    seq: int
    wid: int
    header: bytes
    events: list[WireEvent]
    kind: Kind = Kind.WATCH_REPLAY


@dataclass(frozen=True, slots=True)
class WatchProgress:
    """Answer to WatchProgressRequest: every event up to header.revision was sent before it."""

    epoch: int
    seq: int
    req_id: int
    header: bytes
    kind: Kind = Kind.WATCH_PROGRESS


# ---- lease hub (issue 5) ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LeaseKeepAlive:
    """A client asked to renew ``lease_id`` once; the hub answers with LeaseAnswer."""

    epoch: int
    lease_id: int
    kind: Kind = Kind.LEASE_KEEPALIVE


@dataclass(frozen=True, slots=True)
class LeaseAnswer:
    """The serialized LeaseKeepAliveResponse for every client waiting on ``lease_id``; ``sent_at`` (the hub's
    time.monotonic() when the renewal left) and ``granted_ttl`` let the worker answer later keepalives within the
    window itself (core.lease.Window); sent_at 0: not reusable."""

    epoch: int
    seq: int
    lease_id: int
    payload: bytes
    sent_at: float
    granted_ttl: int
    kind: Kind = Kind.LEASE_ANSWER


@dataclass(frozen=True, slots=True)
class LeaseForget:
    """A LeaseRevoke of ``lease_id`` is being forwarded (or just was): drop its recent renewal, then ack."""

    epoch: int
    seq: int
    ack_id: int
    lease_id: int
    kind: Kind = Kind.LEASE_FORGET


@dataclass(frozen=True, slots=True)
class LeaseForgotten:
    """A worker dropped the lease of LeaseForget ``ack_id``."""

    epoch: int
    ack_id: int
    kind: Kind = Kind.LEASE_FORGOTTEN


@dataclass(frozen=True, slots=True)
class LeaseNoLeader:
    """etcd lost its leader: require-leader keepalive streams end with etcdserver: no leader."""

    epoch: int
    seq: int
    kind: Kind = Kind.LEASE_NO_LEADER


# ---- range cache (issue 6) -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CacheSync:
    """The worker flushed its cache (start, hub restart, lost frame); the hub answers CacheState."""

    epoch: int
    kind: Kind = Kind.CACHE_SYNC


@dataclass(frozen=True, slots=True)
class CacheAck:
    """The worker applied CacheInvalidate ``ack_id`` (the hub holds the writer's reply until then)."""

    epoch: int
    ack_id: int
    kind: Kind = Kind.CACHE_ACK


@dataclass(frozen=True, slots=True)
class CacheState:
    """Serve hits (flush first; refuse answers older than ``revision``) or stop serving them.

    Off while the hub's invalidation watch is down: writes made elsewhere would go unseen.
    """

    epoch: int
    seq: int
    enabled: bool
    revision: int
    kind: Kind = Kind.CACHE_STATE


@dataclass(frozen=True, slots=True)
class CacheInvalidate:
    """Drop entries: wire [key, range_end) ``intervals``, or everything (``flush``); raise the
    compacted revision. ``revision`` is the write's revision (0: unknown); ``ack_id`` 0: no ack.
    """

    epoch: int
    seq: int
    ack_id: int
    intervals: list[tuple[bytes, bytes]]
    flush: bool
    compact_revision: int
    revision: int
    kind: Kind = Kind.CACHE_INVALIDATE


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """An HTTP/1.1 GET/HEAD a worker received on the gRPC port (/health, /metrics, ...), for the hub's routes."""

    epoch: int
    req_id: int
    method: str
    path: str
    kind: Kind = Kind.HTTP_REQUEST


@dataclass(frozen=True, slots=True)
class HttpAnswer:
    """The hub's answer to an HttpRequest: the same status, content type and body as on --metrics-addr."""

    epoch: int
    seq: int
    req_id: int
    status: int
    content_type: str
    body: bytes
    kind: Kind = Kind.HTTP_ANSWER


WorkerMessage = (
    Hello
    | Ping
    | Unary
    | Cancel
    | StreamOpen
    | StreamSend
    | StreamHalfClose
    | StreamAck
    | WatchCreate
    | WatchCancel
    | WatchProgressRequest
    | LeaseKeepAlive
    | CacheSync
    | CacheAck
    | HttpRequest
    | LeaseForgotten
)
HubMessage = (
    Pong
    | Reply
    | StreamRecv
    | StreamEnd
    | Stale
    | WatchCreated
    | WatchCanceled
    | WatchEvents
    | WatchReplay
    | WatchProgress
    | LeaseAnswer
    | LeaseNoLeader
    | CacheState
    | CacheInvalidate
    | HttpAnswer
    | LeaseForget
)
Message = WorkerMessage | HubMessage

CLASSES: dict[Kind, type[Message]] = {
    Kind.HELLO: Hello,
    Kind.PING: Ping,
    Kind.UNARY: Unary,
    Kind.CANCEL: Cancel,
    Kind.STREAM_OPEN: StreamOpen,
    Kind.STREAM_SEND: StreamSend,
    Kind.STREAM_HALF_CLOSE: StreamHalfClose,
    Kind.STREAM_ACK: StreamAck,
    Kind.PONG: Pong,
    Kind.REPLY: Reply,
    Kind.STREAM_RECV: StreamRecv,
    Kind.STREAM_END: StreamEnd,
    Kind.STALE: Stale,
    Kind.WATCH_CREATE: WatchCreate,
    Kind.WATCH_CANCEL: WatchCancel,
    Kind.WATCH_PROGRESS_REQUEST: WatchProgressRequest,
    Kind.WATCH_CREATED: WatchCreated,
    Kind.WATCH_CANCELED: WatchCanceled,
    Kind.WATCH_EVENTS: WatchEvents,
    Kind.WATCH_REPLAY: WatchReplay,
    Kind.WATCH_PROGRESS: WatchProgress,
    Kind.LEASE_KEEPALIVE: LeaseKeepAlive,
    Kind.LEASE_ANSWER: LeaseAnswer,
    Kind.LEASE_NO_LEADER: LeaseNoLeader,
    Kind.CACHE_SYNC: CacheSync,
    Kind.CACHE_ACK: CacheAck,
    Kind.CACHE_STATE: CacheState,
    Kind.CACHE_INVALIDATE: CacheInvalidate,
    Kind.HTTP_REQUEST: HttpRequest,
    Kind.HTTP_ANSWER: HttpAnswer,
    Kind.LEASE_FORGET: LeaseForget,
    Kind.LEASE_FORGOTTEN: LeaseForgotten,
}
