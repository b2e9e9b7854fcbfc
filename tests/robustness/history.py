"""The recorder: one JSON object per line, thread-safe, flushed as it goes (so a run killed half
way still leaves a readable file), and the loader the validators work on.

Bytes (keys, values) are stored as latin-1 strings: reversible and readable for ASCII keys.
Record kinds (field ``kind``):

* ``meta``: seed, target, profile, scenario, run parameters (first line);
* ``op``: one client unary call: client, op, req, invoke, ret (monotonic s), ok, resp or
  error {code, message}, rev (header revision), via ("proxy" or "direct");
* ``wreq``: a request sent on a Watch stream (client, stream, t, req);
* ``wresp``: a Watch response (client, stream, t, resp);
* ``wend``: a Watch stream ended (stream, t, by: "client" or "server", error {code, message} or None);
* ``truth``: a response of the direct whole-keyspace ground-truth watch (t, events, rev);
* ``ka``: a LeaseKeepAlive request sent (client, lease, sent; recv and ttl None), and one per
  answer (the same with recv and ttl);
* ``fault``: a fault window (name, start, end, type: "conn" breaks client connections, "member" an etcd member);
* ``sample``: RSS and open fds of a proxy process (t, pid, title, rss_kb, fds);
* ``end``: end of the run (final revision, drained watch streams).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import grpc

from etcdproxy.etcdpb import kv_pb2, rpc_pb2

Record = dict[str, Any]


def b2s(value: bytes) -> str:
    return value.decode("latin-1")


def s2b(value: str) -> bytes:
    return value.encode("latin-1")


def now() -> float:
    return time.monotonic()


def kv_dict(kv: kv_pb2.KeyValue) -> dict[str, Any]:
    return {
        "key": b2s(kv.key),
        "value": b2s(kv.value),
        "create_revision": kv.create_revision,
        "mod_revision": kv.mod_revision,
        "version": kv.version,
        "lease": kv.lease,
    }


def event_dict(ev: kv_pb2.Event) -> dict[str, Any]:
    out: dict[str, Any] = {
        "type": "DELETE" if ev.type == kv_pb2.Event.DELETE else "PUT",
        "kv": kv_dict(ev.kv),
    }
    if ev.HasField("prev_kv"):
        out["prev_kv"] = kv_dict(ev.prev_kv)
    return out


def watch_response_dict(resp: rpc_pb2.WatchResponse) -> dict[str, Any]:
    out: dict[str, Any] = {"watch_id": resp.watch_id, "rev": resp.header.revision}
    if resp.created:
        out["created"] = True
    if resp.canceled:
        out["canceled"] = True
        out["cancel_reason"] = resp.cancel_reason
        out["compact_revision"] = resp.compact_revision
    if resp.fragment:
        out["fragment"] = True
    if resp.events:
        out["events"] = [event_dict(e) for e in resp.events]
    elif not resp.created and not resp.canceled:
        out["progress"] = True
    return out


def error_dict(exc: grpc.RpcError) -> dict[str, str]:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return {"code": code.name if code is not None else "UNKNOWN", "message": details or ""}


class Recorder:
    """Appends records to ``path`` (JSON lines) and keeps them in memory for the validators."""

    def __init__(self, path: Path, meta: Record) -> None:
        self.path = path
        self.records: list[Record] = []
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: TextIO | None = path.open("w")
        self.write({"kind": "meta", **meta, "t": now()})

    def write(self, record: Record) -> None:
        line = json.dumps(record, separators=(",", ":"))
        with self._lock:
            self.records.append(record)
            if self._file is not None:
                self._file.write(line + "\n")

    def flush(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.flush()

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def load(path: Path) -> list[Record]:
    """The records of a recorded run; a torn last line (a run killed mid-write) is skipped."""
    out: list[Record] = []
    with path.open() as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


@dataclass
class History:
    """A recorded run split by kind, in recording order (the order records were written)."""

    meta: Record = field(default_factory=dict)
    ops: list[Record] = field(default_factory=list)
    watch: list[Record] = field(default_factory=list)  # wreq, wresp and wend, interleaved
    truth: list[Record] = field(default_factory=list)
    keepalives: list[Record] = field(default_factory=list)
    faults: list[Record] = field(default_factory=list)
    samples: list[Record] = field(default_factory=list)
    end: Record = field(default_factory=dict)

    @classmethod
    def of(cls, records: list[Record]) -> History:
        h = cls()
        for r in records:
            kind = r.get("kind")
            if kind == "meta":
                h.meta = r
            elif kind == "op":
                h.ops.append(r)
            elif kind in ("wreq", "wresp", "wend"):
                h.watch.append(r)
            elif kind == "truth":
                h.truth.append(r)
            elif kind == "ka":
                h.keepalives.append(r)
            elif kind == "fault":
                h.faults.append(r)
            elif kind == "sample":
                h.samples.append(r)
            elif kind == "end":
                h.end = r
        return h

    def truth_events(self) -> Iterator[dict[str, Any]]:
        for r in self.truth:
            for ev in r.get("events", ()):
                yield {**ev, "t": r["t"]}
