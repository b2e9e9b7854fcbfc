"""The accept balance of workers sharing one listening socket (etcdproxy/worker/balance.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from etcdproxy.worker.balance import DRAINING, MAX_DEFER_S, Board, Seat, record_of, should_defer


@pytest.mark.parametrize(
    ("own", "others", "defer"),
    [
        ((0, 0), [], False),  # alone
        ((0, 0), [(0, 0)], False),  # a tie: both try, the kernel gives it to one
        ((0, 9), [(0, 1)], False),  # short connections: whoever wakes first (accepted counts do not matter)
        ((5, 10), [(2, 50)], False),  # within the slack
        ((6, 10), [(2, 50)], True),  # four fewer open connections elsewhere
        ((2, 50), [(6, 10)], False),
        ((44, 0), [(36, 0)], False),  # a storm around an even split: no deferral
        ((45, 0), [(5, 0)], True),
        ((DRAINING, 0), [(500, 900)], True),  # a draining worker yields to anyone serving
    ],
)
def test_should_defer(own: tuple[int, int], others: list[tuple[int, int]], defer: bool) -> None:
    assert should_defer(own, others) is defer


def test_two_workers_never_yield_to_each_other() -> None:
    for a in range(60):
        for b in range(60):
            assert not (should_defer((a, 0), [(b, 0)]) and should_defer((b, 0), [(a, 0)]))


def test_records_of_a_rolling_worker_and_its_replacement_differ() -> None:
    assert record_of(0, 0) != record_of(0, 1)
    assert record_of(0, 2) == record_of(0, 0)
    assert len({record_of(i, g) for i in range(8) for g in range(2)}) == 16
    assert min(record_of(i, g) for i in range(8) for g in range(2)) == 1  # record 0 is the header


def test_long_lived_connections_spread_within_the_slack(tmp_path: Path) -> None:
    board = Board(str(tmp_path))
    seats = [Seat(board, i, 0, 1000 + i) for i in range(3)]
    for _ in range(30):  # each connection stays open; the kernel wakes the workers in the same order every time
        taker = next(s for s in seats if s.may_accept(0.0))
        taker.on_accept()
        taker.publish(taker.open + 1)
    opens = sorted(s.open for s in seats)
    assert sum(opens) == 30 and opens[-1] - opens[0] <= 6, opens


def test_a_silent_peer_delays_accepts_only_briefly(tmp_path: Path) -> None:
    board = Board(str(tmp_path))
    busy, stopped = Seat(board, 0, 0, 1000), Seat(board, 1, 0, 1001)
    busy.publish(5)  # the stopped one has 0 open and never accepts
    assert not busy.may_accept(10.0)
    assert not busy.may_accept(10.0 + MAX_DEFER_S / 2)
    assert busy.may_accept(10.0 + MAX_DEFER_S * 1.01)
    assert not busy.may_accept(11.0)  # a new connection: the peer gets its chance again
    board.clear(stopped.record, 1001)  # reaped by the supervisor
    assert busy.may_accept(11.0)


def test_clear_spares_a_record_taken_by_a_new_worker(tmp_path: Path) -> None:
    board = Board(str(tmp_path))
    Seat(board, 0, 0, 1000)
    Seat(board, 0, 2, 2000)  # same record: generation parity repeats
    board.clear(record_of(0, 0), 1000)  # the old pid's reap comes late
    assert board.loads(skip=-1) == [(0, 0)]


def test_draining_and_leaving(tmp_path: Path) -> None:
    board = Board(str(tmp_path))
    old, new = Seat(board, 0, 0, 1000), Seat(board, 0, 1, 1001)  # a rolling restart of worker 0
    new.publish(40)
    old.drain()
    assert new.may_accept(0.0)
    assert not old.may_accept(0.0)
    old.leave()
    assert board.loads(skip=new.base) == []
    # a second process maps the same file and sees the same records
    other = Board(str(tmp_path))
    assert other.loads(skip=-1) == [(40, 0)]
