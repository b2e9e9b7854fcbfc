"""Spreading new connections over the workers that share one listening socket.

Every worker watches the same socket (the supervisor bound it: one instance per port, and the queue
survives restarts and upgrades). The kernel wakes all of them for each connection and the first to
call accept() wins, which favours whichever process the scheduler runs first: measured with 2 workers,
50 connections opened one after another went 45/5 (idle) and 46/4 (both cores busy), and a busy
worker kept winning. SO_REUSEPORT would hash connections over per-worker sockets but gives up the
bind as the one-instance guard and loses a queue whenever its socket closes.

So each worker publishes (open connections, connections accepted) in a small shared file of the run
directory, one record per (worker index, generation parity) so that a rolling worker and its
replacement never share one, and a worker holding ``SLACK`` more connections than another leaves the
connection to it, while still listening (the socket stays readable, so it asks again each loop turn);
it accepts anyway once it has been deferring for ``MAX_DEFER_S`` (a stopped or slow peer delays a
connection by at most that). The supervisor clears a record when it reaps its worker.

A deferring worker used to stop listening for 2 ms; in a burst (100 connections queued at once) the
other worker then took all of them before it listened again: 95/5 in bench/h2bench's watch mode.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterable

from etcdproxy.proc import BALANCE_FILE as FILE_NAME

# pid, open connections, connections accepted, (unused: was "not listening until") (int64 each)
RECORD_FIELDS = 4
# record 0 is the header: its first cell is how many records are in use (readers scan only those)
MAX_RECORDS = 2049  # worker indexes 0..1023, two generation parities each, after the header
SLACK = 4  # plus a quarter of the other's count (see should_defer)
MAX_DEFER_S = 0.02
# what a draining worker publishes as its open count: it accepts only when nobody else does
DRAINING = 1 << 40

Load = tuple[int, int]  # (open, accepted)


def should_defer(own: Load, others: Iterable[Load]) -> bool:
    """True if another live worker holds at least ``SLACK`` + 25% fewer open connections.

    The slack keeps two workers from ever yielding to each other (the one with the fewest never
    defers, so somebody always takes the connection), lets short connections (open counts near 0)
    go to whoever wakes first, and spreads long-lived ones to within the slack. The proportional part
    keeps a storm of short connections (counts moving by a few around an even split) from deferring
    at all: with deaf deferrals a tie-break on accepted counts cut conn-storm from 8,400 to 1,665
    conns/s and SLACK 2 alone to 2,834 (16,197 without deferral)."""
    mine = own[0]
    return any(other[0] + SLACK + other[0] // 4 <= mine for other in others)


def record_of(index: int, generation: int) -> int:
    return 1 + (index * 2 + generation % 2) % (MAX_RECORDS - 1)


class Board:
    """The shared file: records of int64 (pid, open, accepted, deaf until); pid 0 = no live worker there."""

    def __init__(self, run_dir: str) -> None:
        path = os.path.join(run_dir, FILE_NAME)
        size = MAX_RECORDS * RECORD_FIELDS * 8
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.cells = memoryview(self._map).cast("q")

    def clear(self, record: int, pid: int) -> None:
        """Forget a worker that exited (only if the record is still that worker's)."""
        base = record * RECORD_FIELDS
        if self.cells[base] == pid:
            self.cells[base] = 0

    def claim(self, record: int) -> None:
        """Make readers scan up to ``record`` (re-asserted on every publish: two workers starting
        at once may both read the old mark and one write may be lost)."""
        if self.cells[0] <= record:
            self.cells[0] = record + 1

    def loads(self, skip: int) -> list[Load]:
        """The loads of the other live workers."""
        cells = self.cells
        out = []
        for base in range(RECORD_FIELDS, min(cells[0], MAX_RECORDS) * RECORD_FIELDS, RECORD_FIELDS):
            if cells[base] and base != skip:
                out.append((cells[base + 1], cells[base + 2]))
        return out

    def close(self) -> None:
        self.cells.release()
        self._map.close()


class Seat:
    """One worker's record, and its decision for each readiness of the listening socket."""

    def __init__(self, board: Board, index: int, generation: int, pid: int) -> None:
        self.board = board
        self.record = record_of(index, generation)
        self.base = self.record * RECORD_FIELDS
        self.open = 0
        self.accepted = 0
        self.draining = False
        self.deferring_since: float | None = None
        cells = board.cells
        cells[self.base + 1] = 0
        cells[self.base + 2] = 0
        cells[self.base + 3] = 0
        cells[self.base] = pid
        board.claim(self.record)

    def publish(self, open_connections: int) -> None:
        self.open = open_connections
        self.board.claim(self.record)
        self.board.cells[self.base + 1] = DRAINING if self.draining else open_connections

    def drain(self) -> None:
        self.draining = True
        self.publish(self.open)

    def may_accept(self, now: float) -> bool:
        """``now``: the event loop's time (for the deferral cap). Called again each loop turn while the
        connection waits in the queue."""
        own = (DRAINING if self.draining else self.open, self.accepted)
        if not should_defer(own, self.board.loads(self.base)):
            self.deferring_since = None
            return True
        if self.deferring_since is None:
            self.deferring_since = now
        if now - self.deferring_since >= MAX_DEFER_S:
            self.deferring_since = None
            return True
        return False

    def on_accept(self) -> None:
        self.accepted += 1
        self.board.cells[self.base + 2] = self.accepted

    def leave(self) -> None:
        self.board.cells[self.base] = 0
