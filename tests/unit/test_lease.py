"""core/lease.py: keepalive bookkeeping of the lease hub and the worker, as tables."""

from __future__ import annotations

from typing import Any

import pytest

from etcdproxy.core.lease import (
    Interest,
    Outstanding,
    RenewalBook,
    Verdict,
    Window,
    keepalive_request,
    late_answer,
    parse_response,
    remaining_ttl,
    with_ttl,
)
from etcdproxy.etcdpb import rpc_pb2


def response(lease_id: int, ttl: int, revision: int = 7) -> bytes:
    header = rpc_pb2.ResponseHeader(cluster_id=1, member_id=2, revision=revision, raft_term=3)
    return rpc_pb2.LeaseKeepAliveResponse(header=header, ID=lease_id, TTL=ttl).SerializeToString()  # type: ignore[no-any-return]


# ---- wire helpers ------------------------------------------------------------------------------


@pytest.mark.parametrize("lease_id", [0, 1, 2**62, -1, 2**63 - 1])
def test_keepalive_request_round_trip(lease_id: int) -> None:
    decoded = rpc_pb2.LeaseKeepAliveRequest.FromString(keepalive_request(lease_id))
    assert lease_id == decoded.ID


@pytest.mark.parametrize(("lease_id", "ttl"), [(5, 10), (5, 0), (2**62, 1), (-3, -1)])
def test_parse_and_with_ttl(lease_id: int, ttl: int) -> None:
    payload = response(lease_id, ttl)
    assert parse_response(payload) == (lease_id, ttl)
    changed = rpc_pb2.LeaseKeepAliveResponse.FromString(with_ttl(payload, 4))
    assert (changed.ID, changed.TTL, changed.header.revision) == (lease_id, 4, 7)


@pytest.mark.parametrize(
    ("granted", "sent_at", "now", "expected"),
    [
        (10, 100.0, 100.0, 10),  # same instant: the whole TTL
        (10, 100.0, 100.001, 9),  # any time passed: never round up
        (10, 100.0, 100.5, 9),
        (10, 100.0, 101.0, 9),
        (10, 100.0, 101.2, 8),
        (2, 100.0, 101.5, 0),
        (5, 100.0, 110.0, 0),  # clamped, never negative
    ],
)
def test_remaining_ttl(granted: int, sent_at: float, now: float, expected: int) -> None:
    assert remaining_ttl(granted, sent_at, now) == expected


# ---- Outstanding -------------------------------------------------------------------------------


def test_outstanding_counts_and_index() -> None:
    book: Outstanding[str] = Outstanding()
    assert book.add(1, "a") is True
    assert book.add(1, "a") is False
    assert book.add(1, "b") is False
    assert book.add(2, "a") is True
    assert (book.count(1, "a"), book.count(1, "b"), len(book)) == (2, 1, 2)
    assert book.pop(1) == {"a": 2, "b": 1}
    assert 1 not in book
    assert book.remove_waiter("a") == [2]  # lease 2 had only "a"
    assert len(book) == 0
    assert book.remove_waiter("b") == []  # "b" no longer waits on anything
    assert book.pop(9) == {}


def test_outstanding_remove_waiter_keeps_shared_leases() -> None:
    book: Outstanding[str] = Outstanding()
    book.add(1, "a")
    book.add(1, "b")
    book.add(2, "a")
    assert sorted(book.remove_waiter("a")) == [2]
    assert book.pop(1) == {"b": 1}


# ---- RenewalBook: a table of (time, event, argument) -> expected -------------------------------

# events: ("req", lease, worker) -> Verdict (+ TTL when ANSWER); ("sent", lease) -> None;
# ("ans", lease, ttl) -> sorted workers; ("lost",) -> None; ("unsent",) -> leases; ("gone", worker);
# ("revoking", lease) -> None
Step = tuple[float, tuple[Any, ...], Any]

RENEWAL_TABLE: list[tuple[str, float, list[Step]]] = [
    (
        "concurrent keepalives for one lease go upstream once and all get the answer",
        0.5,
        [
            (0.0, ("req", 1, "w1"), Verdict.SEND),
            (0.0, ("sent", 1), None),
            (0.01, ("req", 1, "w2"), Verdict.JOIN),
            (0.02, ("req", 1, "w1"), Verdict.JOIN),
            (0.03, ("ans", 1, 10), ["w1", "w2"]),
        ],
    ),
    (
        "a keepalive within the window is answered from the renewal with the TTL left",
        0.5,
        [
            (0.0, ("req", 1, "w1"), Verdict.SEND),
            (0.0, ("sent", 1), None),
            (0.01, ("ans", 1, 10), ["w1"]),
            (0.2, ("req", 1, "w2"), (Verdict.ANSWER, 9)),
            (0.5, ("req", 1, "w1"), (Verdict.ANSWER, 9)),
            (0.51, ("req", 1, "w1"), Verdict.SEND),  # window over: renew again
        ],
    ),
    (
        "window 0: every keepalive is renewed upstream",
        0.0,
        [
            (0.0, ("req", 1, "w1"), Verdict.SEND),
            (0.0, ("sent", 1), None),
            (0.01, ("ans", 1, 10), ["w1"]),
            (0.01, ("req", 1, "w1"), Verdict.SEND),
        ],
    ),
    (
        "a renewal is reused only while at least 1 s is left",
        5.0,
        [
            (0.0, ("req", 1, "w1"), Verdict.SEND),
            (0.0, ("sent", 1), None),
            (0.0, ("ans", 1, 2), ["w1"]),
            (0.9, ("req", 1, "w1"), (Verdict.ANSWER, 1)),
            (1.1, ("req", 1, "w1"), Verdict.SEND),
        ],
    ),
    (
        "TTL 0 (revoked, expired, unknown) is never reused",
        0.5,
        [
            (0.0, ("req", 7, "w1"), Verdict.SEND),
            (0.0, ("sent", 7), None),
            (0.01, ("ans", 7, 0), ["w1"]),
            (0.02, ("req", 7, "w1"), Verdict.SEND),
        ],
    ),
    (
        "a broken stream leaves in-flight renewals unsent; they are sent again",
        0.5,
        [
            (0.0, ("req", 1, "w1"), Verdict.SEND),
            (0.0, ("sent", 1), None),
            (0.0, ("req", 2, "w2"), Verdict.SEND),  # stream down: not sent yet
            (0.1, ("lost",), None),
            (0.1, ("unsent",), [1, 2]),
            (0.2, ("req", 1, "w2"), Verdict.SEND),  # nothing in flight any more
            (0.3, ("sent", 1), None),
            (0.3, ("sent", 2), None),
            (0.3, ("unsent",), []),
            (0.4, ("ans", 1, 10), ["w1", "w2"]),
            (0.4, ("ans", 2, 10), ["w2"]),
        ],
    ),
    (
        "a gone worker is not answered; the others are",
        0.5,
        [
            (0.0, ("req", 1, "w1"), Verdict.SEND),
            (0.0, ("sent", 1), None),
            (0.0, ("req", 1, "w2"), Verdict.JOIN),
            (0.0, ("gone", "w1"), None),
            (0.1, ("ans", 1, 10), ["w2"]),
        ],
    ),
    (
        "a revoke through the proxy drops the recent renewal",
        0.5,
        [
            (0.0, ("req", 1, "w1"), Verdict.SEND),
            (0.0, ("sent", 1), None),
            (0.01, ("ans", 1, 10), ["w1"]),
            (0.02, ("revoking", 1), None),
            (0.03, ("req", 1, "w1"), Verdict.SEND),
        ],
    ),
    (
        "a renewal in flight while a revoke is forwarded is answered but not reused",
        0.5,
        [
            (0.0, ("req", 1, "w1"), Verdict.SEND),
            (0.0, ("sent", 1), None),
            (0.01, ("revoking", 1), None),
            (0.02, ("ans", 1, 10), ["w1"]),
            (0.03, ("req", 1, "w1"), Verdict.SEND),
            (0.03, ("sent", 1), None),
            (0.04, ("ans", 1, 10), ["w1"]),  # after the revoke: reusable again (etcd said alive)
            (0.05, ("req", 1, "w2"), (Verdict.ANSWER, 9)),
        ],
    ),
    (
        "an answer for a lease not in flight is not reused",
        0.5,
        [
            (0.0, ("ans", 3, 10), []),
            (0.1, ("req", 3, "w1"), Verdict.SEND),
        ],
    ),
]


@pytest.mark.parametrize(
    ("window", "steps"), [(w, s) for _, w, s in RENEWAL_TABLE], ids=[n for n, _, _ in RENEWAL_TABLE]
)
def test_renewal_book(window: float, steps: list[Step]) -> None:
    book: RenewalBook[str] = RenewalBook(window)
    for now, event, expected in steps:
        op = event[0]
        if op == "req":
            verdict, payload = book.request(event[1], event[2], now)
            if verdict is Verdict.ANSWER:
                assert (verdict, parse_response(payload)[1]) == expected, (now, event)
                assert parse_response(payload)[0] == event[1]
            else:
                assert (verdict, payload) == (expected, b""), (now, event)
        elif op == "sent":
            book.sent(event[1], now)
        elif op == "ans":
            assert sorted(book.answered(event[1], event[2], response(event[1], event[2]))) == expected, (now, event)
        elif op == "lost":
            book.stream_lost()
        elif op == "unsent":
            assert sorted(book.unsent()) == expected, (now, event)
        elif op == "revoking":
            book.revoking(event[1])
        elif op == "gone":
            book.worker_gone(event[1])
        else:
            raise AssertionError(op)


def test_renewal_book_prune() -> None:
    book: RenewalBook[str] = RenewalBook(0.5)
    for lease_id in (1, 2):
        book.request(lease_id, "w", 0.0)
        book.sent(lease_id, 0.0 if lease_id == 1 else 0.4)
        book.answered(lease_id, 10, response(lease_id, 10))
    book.prune(0.6)
    assert list(book.recent) == [2]
    book.prune(1.0)
    assert book.recent == {}


def test_renewal_answer_keeps_header_and_exact_ttl_at_same_instant() -> None:
    book: RenewalBook[str] = RenewalBook(0.5)
    book.request(1, "w", 10.0)
    book.sent(1, 10.0)
    payload = response(1, 10, revision=42)
    book.answered(1, 10, payload)
    assert book.request(1, "w", 10.0) == (Verdict.ANSWER, payload)  # no time passed: the same bytes
    _, later = book.request(1, "w", 10.3)
    decoded = rpc_pb2.LeaseKeepAliveResponse.FromString(later)
    assert (decoded.TTL, decoded.header.revision, decoded.header.member_id) == (9, 42, 2)


# ---- Interest (worker side) --------------------------------------------------------------------


def test_interest_asks_once_per_lease_while_outstanding() -> None:
    interest: Interest[str] = Interest()
    assert interest.request(1, "s1", 0.0) is True
    assert interest.request(1, "s1", 0.1) is False
    assert interest.request(1, "s2", 0.2) is False
    assert interest.request(2, "s2", 0.2) is True
    assert interest.answer(1) == {"s1": 2, "s2": 1}  # one answer per request
    assert interest.request(1, "s1", 0.3) is True  # answered: the next request asks again
    assert sorted(interest.ask_all(1.0)) == [1, 2]


@pytest.mark.parametrize(
    ("asked", "now", "after", "expected"),
    [
        ({1: 0.0, 2: 2.0}, 3.5, 3.0, [1]),
        ({1: 0.0, 2: 2.0}, 2.9, 3.0, []),
        ({1: 0.0, 2: 0.0}, 10.0, 3.0, [1, 2]),
    ],
)
def test_interest_overdue(asked: dict[int, float], now: float, after: float, expected: list[int]) -> None:
    interest: Interest[str] = Interest()
    for lease_id, at in asked.items():
        interest.request(lease_id, "s", at)
    assert sorted(interest.overdue(now, after)) == expected
    assert interest.overdue(now, after) == []  # asked again just now


def test_interest_stream_gone_forgets_its_leases() -> None:
    interest: Interest[str] = Interest()
    interest.request(1, "s1", 0.0)
    interest.request(1, "s2", 0.0)
    interest.request(2, "s1", 0.0)
    interest.stream_gone("s1")
    assert interest.answer(1) == {"s2": 1}
    assert interest.answer(2) == {}
    assert interest.asked_at == {}
    assert interest.request(2, "s2", 1.0) is True


# ---- the worker's window (core.lease.Window) ---------------------------------------------------------


def _response(lease_id: int, ttl: int) -> bytes:
    return rpc_pb2.LeaseKeepAliveResponse(
        header=rpc_pb2.ResponseHeader(revision=7), ID=lease_id, TTL=ttl
    ).SerializeToString()


@pytest.mark.parametrize(
    ("sent_at", "ttl", "now", "expected_ttl"),
    [
        (100.0, 10, 100.0, 10),  # the renewal's own answer
        (100.0, 10, 100.4, 9),  # floor(10 - 0.4): never longer than etcd left
        (100.0, 10, 100.5, 9),  # the window's edge
        (100.0, 10, 100.51, None),  # past the window: ask the hub
        (100.0, 1, 100.2, None),  # under 1 s left: ask
        (0.0, 10, 0.1, None),  # sent_at 0: the hub said not reusable
        (100.0, 0, 100.0, None),  # TTL 0 (revoked, expired, unknown) is never reused
    ],
)
def test_window_answers_like_the_hub(sent_at: float, ttl: int, now: float, expected_ttl: int | None) -> None:
    window = Window(0.5)
    window.record(5, sent_at, ttl, _response(5, ttl))
    answer = window.answer(5, now)
    if expected_ttl is None:
        assert answer is None
    else:
        assert answer is not None and parse_response(answer) == (5, expected_ttl)
        assert rpc_pb2.LeaseKeepAliveResponse.FromString(answer).header.revision == 7


def test_window_forget_clear_prune_and_off() -> None:
    window = Window(0.5)
    for lease_id in (1, 2, 3):
        window.record(lease_id, 100.0, 10, _response(lease_id, 10))
    window.forget(1)
    assert window.answer(1, 100.1) is None and window.answer(2, 100.1) is not None
    window.prune(101.0)
    assert not window.recent
    window.record(3, 200.0, 10, _response(3, 10))
    window.clear()
    assert window.answer(3, 200.0) is None
    off = Window(0.0)
    off.record(4, 100.0, 10, _response(4, 10))
    assert off.answer(4, 100.0) is None


@pytest.mark.parametrize(
    ("ttl", "sent_at", "now", "expected"),
    [
        (3, 100.0, 100.002, 3),  # read at once: etcd's answer as it is
        (3, 100.0, 100.99, 3),
        (3, 100.0, 101.0, 2),  # a second late: what is left
        (10, 100.0, 102.5, 7),
        (3, 100.0, 102.02, 1),  # soak: TTL 3 read 2 s late (hub stopped) -> 1, never 0 for a renewed lease
        (3, 100.0, 110.0, 1),
        (0, 100.0, 105.0, 0),  # etcd's "expired or unknown" passes untouched
        (3, 0.0, 105.0, 3),  # no send time known: untouched
    ],
)
def test_late_answer_tells_what_is_left(ttl: int, sent_at: float, now: float, expected: int) -> None:
    answer = rpc_pb2.LeaseKeepAliveResponse.FromString(late_answer(response(5, ttl), ttl, sent_at, now))
    assert (answer.ID, answer.TTL, answer.header.revision) == (5, expected, 7)
