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

# Bumped whenever a message below changes shape; checked in the Hello/Pong exchange.
SCHEMA_VERSION = 1

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
    # hub -> worker
    PONG = 20
    REPLY = 21
    STREAM_RECV = 22
    STREAM_END = 23
    STALE = 24


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


WorkerMessage = Hello | Ping | Unary | Cancel | StreamOpen | StreamSend | StreamHalfClose | StreamAck
HubMessage = Pong | Reply | StreamRecv | StreamEnd | Stale
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
}
