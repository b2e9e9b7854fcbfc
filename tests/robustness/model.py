"""The keyspace replayed from the ground-truth watch: its state at any revision, and the events
any watcher should have seen. Keys and values are latin-1 strings (see ``history``)."""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

KV = dict[str, Any]
Event = dict[str, Any]


def in_range(key: str, start: str, end: str) -> bool:
    """etcd's range rule: empty end is the one key, "\\0" is every key >= start."""
    if end == "":
        return key == start
    if end == "\0":
        return key >= start
    return start <= key < end


def prefix_end(prefix: str) -> str:
    """etcd's GetPrefixRangeEnd on latin-1 strings."""
    chars = list(prefix)
    for i in range(len(chars) - 1, -1, -1):
        if ord(chars[i]) < 0xFF:
            return "".join(chars[:i]) + chr(ord(chars[i]) + 1)
    return "\0"


@dataclass
class Replay:
    """Built from the ground-truth events in revision order (duplicates from a resumed truth
    watch are dropped)."""

    events: list[Event] = field(default_factory=list)
    by_key: dict[str, list[tuple[int, KV | None]]] = field(default_factory=dict)
    revisions: list[int] = field(default_factory=list)  # every revision with an event, ascending
    by_revision: dict[int, list[Event]] = field(default_factory=dict)

    @classmethod
    def of(cls, events: Iterable[Event]) -> Replay:
        r = cls()
        seen: set[tuple[int, str]] = set()
        for ev in events:
            rev, key = ev["kv"]["mod_revision"], ev["kv"]["key"]
            if (rev, key) in seen:
                continue
            seen.add((rev, key))
            r.events.append(ev)
            r.by_key.setdefault(key, []).append((rev, None if ev["type"] == "DELETE" else ev["kv"]))
            if not r.revisions or r.revisions[-1] != rev:
                r.revisions.append(rev)
            r.by_revision.setdefault(rev, []).append(ev)
        return r

    @property
    def last_revision(self) -> int:
        return self.revisions[-1] if self.revisions else 1

    def get(self, key: str, rev: int) -> KV | None:
        history = self.by_key.get(key)
        if not history:
            return None
        i = bisect.bisect_right(history, rev, key=lambda h: h[0])
        return history[i - 1][1] if i else None

    def range_at(self, start: str, end: str, rev: int) -> list[KV]:
        out = []
        for key in sorted(self.by_key):
            if in_range(key, start, end):
                kv = self.get(key, rev)
                if kv is not None:
                    out.append(kv)
        return out

    def events_in(self, start: str, end: str, from_rev: int, to_rev: int | None = None) -> list[Event]:
        """Events on keys in [start, end) with from_rev <= revision (<= to_rev)."""
        i = bisect.bisect_left(self.events, from_rev, key=lambda e: e["kv"]["mod_revision"])
        out = []
        for ev in self.events[i:]:
            rev = ev["kv"]["mod_revision"]
            if to_rev is not None and rev > to_rev:
                break
            if in_range(ev["kv"]["key"], start, end):
                out.append(ev)
        return out

    def change_revisions(self, start: str, end: str, upto: int) -> list[int]:
        """Revisions <= upto at which the range changed, ascending, starting with 0."""
        revs = [0]
        for ev in self.events_in(start, end, 1, upto):
            if revs[-1] != ev["kv"]["mod_revision"]:
                revs.append(ev["kv"]["mod_revision"])
        return revs
