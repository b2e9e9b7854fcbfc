"""What the hub subsystems (watch, lease, cache, cluster, http) need of the hub process.

Each subsystem is typed against the narrow Protocol below instead of ``hub.process.Hub``, so the
process module imports its subsystems and none of them imports it back (tests/unit/test_layering.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from etcdproxy import proc
    from etcdproxy.config import Config
    from etcdproxy.h2 import aio
    from etcdproxy.hub.forward import Forwarder, UpstreamStream
    from etcdproxy.ipc import schema as s
    from etcdproxy.ipc.sockets import HubLink


class Cancellable(Protocol):
    def cancel(self) -> Any: ...


@dataclass(slots=True)
class WorkerState:
    identity: bytes
    seq: int = 0
    last_seen: float = 0.0
    calls: dict[int, Cancellable] = field(default_factory=dict)  # a Task, or a call without one (DirectCall)
    streams: dict[int, UpstreamStream] = field(default_factory=dict)


class UpstreamHost(Protocol):
    """The event loop, the upstream channel and the shutdown hooks: what every subsystem uses."""

    config: Config
    loop: asyncio.AbstractEventLoop
    epoch: int
    forwarder: Forwarder
    closers: list[Callable[[], Awaitable[None]]]

    @property
    def channel(self) -> aio.AioChannel: ...


class WorkerHost(UpstreamHost, Protocol):
    """For subsystems that talk to workers (watch, lease, cache)."""

    workers: dict[bytes, WorkerState]
    worker_gone: list[Callable[[WorkerState], None]]

    def register(self, kind: s.Kind, handler: Callable[[WorkerState, Any], None]) -> None: ...

    def next_seq(self, worker: WorkerState) -> int: ...

    def send(self, worker: WorkerState, message: s.HubMessage) -> None: ...


class ClusterHost(UpstreamHost, Protocol):
    hostname: str


class WatchCounts(Protocol):
    @property
    def c_watchers(self) -> int: ...

    @property
    def s_watchers(self) -> int: ...


class HttpHost(UpstreamHost, Protocol):
    """For the metrics/health HTTP server."""

    spec: proc.ChildSpec
    link: HubLink
    workers: dict[bytes, WorkerState]
    handlers: dict[s.Kind, Callable[[WorkerState, Any], None]]

    @property
    def watches(self) -> WatchCounts: ...
