"""Load generators: KV, Watch and Lease clients (grpcio sync stubs, one thread each), and the
ground-truth watch. Every call and response goes to the ``Recorder``. Seeded: each client has
its own ``random.Random`` derived from the run's seed.

Rates are modest on purpose (a 2-core machine runs etcd, the proxy and these clients at once).
"""

from __future__ import annotations

import contextlib
import queue
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import grpc

from etcdproxy.etcdpb import rpc_pb2, rpc_pb2_grpc
from tests.robustness.history import (
    Recorder,
    error_dict,
    event_dict,
    kv_dict,
    now,
    watch_response_dict,
)
from tests.robustness.model import prefix_end

KEYS = [f"/k/{i:02d}" for i in range(16)]
CALL_TIMEOUT = 3.0
ALL, ALL_END = "\0", "\0"


@dataclass
class Shared:
    """State the clients share: the stop flag, the highest revision seen, the endpoint to use."""

    stop: threading.Event = field(default_factory=threading.Event)
    revision: int = 1
    compacted: int = 0
    truth_reached: int = 0

    def saw(self, rev: int) -> None:
        self.revision = max(self.revision, rev)


def channel(endpoint: str) -> grpc.Channel:
    # a subchannel of its own: each client its own connection, spread over the proxy's workers
    return grpc.insecure_channel(endpoint, options=[("grpc.use_local_subchannel_pool", 1)])


def random_range(rng: random.Random) -> tuple[str, str]:
    """A key, a prefix, a span, the /k/ prefix, or everything from a key."""
    roll = rng.random()
    key = rng.choice(KEYS)
    if roll < 0.35:
        return key, ""
    if roll < 0.55:
        return key[:-1], prefix_end(key[:-1])
    if roll < 0.75:
        other = rng.choice(KEYS)
        lo, hi = sorted((key, other))
        return lo, hi if hi != lo else prefix_end(lo)
    if roll < 0.9:
        return "/k/", prefix_end("/k/")
    return key, ALL_END


def _b(s: str) -> bytes:
    return s.encode("latin-1")


class Client(threading.Thread):
    def __init__(self, name: str, endpoint: str, rec: Recorder, shared: Shared, rng: random.Random, via: str) -> None:
        super().__init__(name=name, daemon=True)
        self.endpoint = endpoint
        self.rec = rec
        self.shared = shared
        self.rng = rng
        self.via = via
        self.ops = 0

    def call(self, op: str, req: dict[str, Any], fn: Callable[[], Any], out: Callable[[Any], dict[str, Any]]) -> Any:
        invoke = now()
        try:
            resp = fn()
        except grpc.RpcError as exc:
            self.rec.write(
                {
                    "kind": "op",
                    "client": self.name,
                    "op": op,
                    "req": req,
                    "invoke": invoke,
                    "ret": now(),
                    "ok": False,
                    "error": error_dict(exc),
                    "via": self.via,
                }
            )
            return None
        ret = now()
        rev = int(resp.header.revision)
        self.shared.saw(rev)
        self.ops += 1
        self.rec.write(
            {
                "kind": "op",
                "client": self.name,
                "op": op,
                "req": req,
                "invoke": invoke,
                "ret": ret,
                "ok": True,
                "resp": out(resp),
                "rev": rev,
                "via": self.via,
            }
        )
        return resp


class KVClient(Client):
    """Weighted Range (linearizable and serializable), Put, Txn, DeleteRange and Compact."""

    def __init__(self, *args: Any, weights: dict[str, float], rate: float = 10.0, churn_every: int = 0) -> None:
        super().__init__(*args)
        self.weights = weights
        self.rate = rate
        self.churn_every = churn_every  # reconnect every N ops: connection churn

    def run(self) -> None:
        names, weights = zip(*self.weights.items(), strict=True)
        ch = channel(self.endpoint)
        kv = rpc_pb2_grpc.KVStub(ch)
        n = 0
        try:
            while not self.shared.stop.is_set():
                getattr(self, "do_" + self.rng.choices(names, weights)[0])(kv)
                n += 1
                if self.churn_every and n % self.churn_every == 0:
                    ch.close()
                    ch = channel(self.endpoint)
                    kv = rpc_pb2_grpc.KVStub(ch)
                self.shared.stop.wait(self.rng.expovariate(self.rate))
        finally:
            ch.close()

    def _range(self, kv: rpc_pb2_grpc.KVStub, serializable: bool) -> None:
        key, end = random_range(self.rng)
        limit = self.rng.choice([0, 0, 0, 2])
        keys_only = self.rng.random() < 0.1
        req = {"key": key, "range_end": end, "serializable": serializable, "limit": limit, "keys_only": keys_only}
        msg = rpc_pb2.RangeRequest(
            key=_b(key), range_end=_b(end), serializable=serializable, limit=limit, keys_only=keys_only
        )
        self.call("range", req, lambda: kv.Range(msg, timeout=CALL_TIMEOUT), _range_out)

    def do_range(self, kv: rpc_pb2_grpc.KVStub) -> None:
        self._range(kv, False)

    def do_range_serializable(self, kv: rpc_pb2_grpc.KVStub) -> None:
        self._range(kv, True)

    def do_range_old(self, kv: rpc_pb2_grpc.KVStub) -> None:
        """A read at an old revision: answered, or etcd's 'compacted' error."""
        rev = max(1, self.shared.revision - self.rng.randint(0, 40))
        key, end = random_range(self.rng)
        req = {"key": key, "range_end": end, "revision": rev}
        msg = rpc_pb2.RangeRequest(key=_b(key), range_end=_b(end), revision=rev)
        self.call("range", req, lambda: kv.Range(msg, timeout=CALL_TIMEOUT), _range_out)

    def do_put(self, kv: rpc_pb2_grpc.KVStub) -> None:
        key, value = self.rng.choice(KEYS), f"{self.name}-{self.ops}"
        prev = self.rng.random() < 0.3
        req = {"key": key, "value": value, "prev_kv": prev}
        msg = rpc_pb2.PutRequest(key=_b(key), value=_b(value), prev_kv=prev)
        self.call("put", req, lambda: kv.Put(msg, timeout=CALL_TIMEOUT), _put_out)

    def do_delete(self, kv: rpc_pb2_grpc.KVStub) -> None:
        key, end = random_range(self.rng) if self.rng.random() < 0.3 else (self.rng.choice(KEYS), "")
        if end == ALL_END or end == prefix_end("/k/"):
            key, end = self.rng.choice(KEYS), ""  # never wipe the whole keyspace
        req = {"key": key, "range_end": end}
        msg = rpc_pb2.DeleteRangeRequest(key=_b(key), range_end=_b(end))
        self.call("delete", req, lambda: kv.DeleteRange(msg, timeout=CALL_TIMEOUT), lambda r: {"deleted": r.deleted})

    def do_txn(self, kv: rpc_pb2_grpc.KVStub) -> None:
        key = self.rng.choice(KEYS)
        target = self.rng.choice(["version", "mod", "value"])
        result = self.rng.choice(["EQUAL", "GREATER", "LESS", "NOT_EQUAL"])
        cmp = rpc_pb2.Compare(
            key=_b(key), result=getattr(rpc_pb2.Compare, result), target=getattr(rpc_pb2.Compare, target.upper())
        )
        operand: Any
        if target == "version":
            operand = self.rng.randint(0, 3)
            cmp.version = operand
        elif target == "mod":
            operand = max(0, self.shared.revision - self.rng.randint(0, 10))
            cmp.mod_revision = operand
        else:
            operand = self.rng.choice(["", f"{self.name}-{self.ops}", "x"])
            cmp.value = _b(operand)
        branches: dict[str, list[dict[str, Any]]] = {"success": [], "failure": []}
        msgs: dict[str, list[rpc_pb2.RequestOp]] = {"success": [], "failure": []}
        for branch in branches:
            for k in self.rng.sample(KEYS, self.rng.randint(0, 2)):  # distinct: etcd refuses duplicate keys
                kind = self.rng.choice(["put", "put", "delete", "range"])
                if kind == "put":
                    value = f"{self.name}-{self.ops}-{branch}"
                    branches[branch].append({"put": {"key": k, "value": value}})
                    msgs[branch].append(rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=_b(k), value=_b(value))))
                elif kind == "delete":
                    branches[branch].append({"delete": {"key": k, "range_end": ""}})
                    msgs[branch].append(rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(key=_b(k))))
                else:
                    branches[branch].append({"range": {"key": k, "range_end": ""}})
                    msgs[branch].append(rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=_b(k))))
        req = {"compare": [{"key": key, "target": target, "result": result, "operand": operand}], **branches}
        msg = rpc_pb2.TxnRequest(compare=[cmp], success=msgs["success"], failure=msgs["failure"])
        self.call("txn", req, lambda: kv.Txn(msg, timeout=CALL_TIMEOUT), _txn_out)

    def do_compact(self, kv: rpc_pb2_grpc.KVStub) -> None:
        # never beyond what the ground truth has seen: it must not be cancelled as compacted
        top = min(self.shared.revision, self.shared.truth_reached) - self.rng.randint(5, 30)
        if top <= self.shared.compacted:
            return
        req = {"revision": top}
        msg = rpc_pb2.CompactionRequest(revision=top)
        if self.call("compact", req, lambda: kv.Compact(msg, timeout=CALL_TIMEOUT), lambda r: {}) is not None:
            self.shared.compacted = max(self.shared.compacted, top)


def _range_out(r: rpc_pb2.RangeResponse) -> dict[str, Any]:
    return {"kvs": [kv_dict(kv) for kv in r.kvs], "count": r.count, "more": r.more}


def _put_out(r: rpc_pb2.PutResponse) -> dict[str, Any]:
    return {"prev_kv": kv_dict(r.prev_kv) if r.HasField("prev_kv") else None}


def _txn_out(r: rpc_pb2.TxnResponse) -> dict[str, Any]:
    deleted = sum(x.response_delete_range.deleted for x in r.responses if x.HasField("response_delete_range"))
    return {"succeeded": r.succeeded, "deleted": deleted}


# --------------------------------------------------------------------------- watch


class WatchClient(Client):
    """One Watch stream at a time (a new one if it breaks) carrying 1-6 watchers created and
    cancelled at random (random ranges, filters, prev_kv, start revisions, client watch ids),
    progress requests, pauses in reading (a client that stops reading) and, if asked, a
    half-close of the stream."""

    def __init__(
        self, *args: Any, rate: float = 2.0, pause_s: float = 0.0, half_close: bool = False, old_starts: bool = True
    ) -> None:
        super().__init__(*args)
        self.rate = rate
        self.pause_s = pause_s
        self.half_close = half_close
        self.old_starts = old_starts
        self.streams = 0
        self.stream = ""
        self.lock = threading.Lock()
        self.live: dict[str, dict[str, Any]] = {}  # stream -> state

    def run(self) -> None:
        while not self.shared.stop.is_set():
            state = self._open()
            self._drive(state)
            if not state["ended"].is_set():
                return  # stopped: left open for the drain
            self.shared.stop.wait(0.2)

    def _open(self) -> dict[str, Any]:
        self.streams += 1
        name = f"{self.name}.{self.streams}"
        ch = channel(self.endpoint)
        requests: queue.Queue[rpc_pb2.WatchRequest | None] = queue.Queue()
        call = rpc_pb2_grpc.WatchStub(ch).Watch(iter(requests.get, None))
        state: dict[str, Any] = {
            "name": name,
            "channel": ch,
            "requests": requests,
            "call": call,
            "pending": deque(),
            "active": set(),
            "ended": threading.Event(),
            "closing": False,
            "half_closed": False,
            "progress": 0,
            "paused": threading.Event(),
            "next_id": 100,
        }
        state["paused"].set()  # set = reading
        with self.lock:
            self.live[name] = state
        threading.Thread(target=self._read, args=(state,), daemon=True, name=f"{name}-reader").start()
        return state

    def _send(self, state: dict[str, Any], req: dict[str, Any], msg: rpc_pb2.WatchRequest | None) -> None:
        self.rec.write({"kind": "wreq", "client": self.name, "stream": state["name"], "t": now(), "req": req})
        state["requests"].put(msg)

    def _read(self, state: dict[str, Any]) -> None:
        error = None
        try:
            it = iter(state["call"])
            while True:
                state["paused"].wait()
                resp = next(it, None)
                if resp is None:
                    break
                t = now()
                d = watch_response_dict(resp)
                with self.lock:
                    if resp.created and state["pending"]:
                        state["pending"].popleft()
                        if not resp.canceled:
                            state["active"].add(resp.watch_id)
                    elif resp.canceled:
                        state["active"].discard(resp.watch_id)
                    if d.get("progress"):
                        state["progress"] = max(state["progress"], resp.header.revision)
                    if resp.events:
                        state["progress"] = max(state["progress"], resp.events[-1].kv.mod_revision)
                self.shared.saw(resp.header.revision)
                self.rec.write({"kind": "wresp", "client": self.name, "stream": state["name"], "t": t, "resp": d})
        except grpc.RpcError as exc:
            error = exc
        by = "client" if state["closing"] else "server"
        err = None if error is None else error_dict(error)
        if by == "client" and err and err["code"] == "CANCELLED":
            err = None
        self.rec.write(
            {"kind": "wend", "client": self.name, "stream": state["name"], "t": now(), "by": by, "error": err}
        )
        state["ended"].set()

    def _create(self, state: dict[str, Any]) -> None:
        key, end = random_range(self.rng)
        roll = self.rng.random()
        start = 0
        if roll < 0.4:
            start = max(1, self.shared.revision - self.rng.randint(0, 20))
        elif roll < 0.5 and self.old_starts:
            start = max(1, self.shared.compacted - self.rng.randint(0, 10)) if self.shared.compacted else 1
        filters = self.rng.choice([[], [], [], ["NOPUT"], ["NODELETE"]])
        prev_kv = self.rng.random() < 0.5
        wid = 0
        if self.rng.random() < 0.2:
            wid = state["next_id"]
            state["next_id"] += 1
        req = {
            "key": key,
            "range_end": end,
            "start_revision": start,
            "filters": filters,
            "prev_kv": prev_kv,
            "watch_id": wid,
        }
        msg = rpc_pb2.WatchCreateRequest(
            key=_b(key),
            range_end=_b(end),
            start_revision=start,
            prev_kv=prev_kv,
            watch_id=wid,
            filters=[getattr(rpc_pb2.WatchCreateRequest, f) for f in filters],
        )
        with self.lock:
            state["pending"].append(req)
        self._send(state, {"create": req}, rpc_pb2.WatchRequest(create_request=msg))

    def _drive(self, state: dict[str, Any]) -> None:
        for _ in range(self.rng.randint(1, 3)):
            self._create(state)
        while not self.shared.stop.is_set() and not state["ended"].is_set():
            self.shared.stop.wait(self.rng.expovariate(self.rate))
            if state["half_closed"] or state["ended"].is_set() or self.shared.stop.is_set():
                continue
            roll = self.rng.random()
            with self.lock:
                active = sorted(state["active"])
            if roll < 0.35 and len(active) + len(state["pending"]) < 6:
                self._create(state)
            elif roll < 0.55 and active:
                wid = self.rng.choice(active)
                self._send(
                    state,
                    {"cancel": wid},
                    rpc_pb2.WatchRequest(cancel_request=rpc_pb2.WatchCancelRequest(watch_id=wid)),
                )
            elif roll < 0.8:
                self._send(
                    state, {"progress": True}, rpc_pb2.WatchRequest(progress_request=rpc_pb2.WatchProgressRequest())
                )
            elif roll < 0.9 and self.pause_s:
                state["paused"].clear()  # stop reading for a while
                self.shared.stop.wait(self.pause_s)
                state["paused"].set()
            elif self.half_close and self.ops > 2:
                state["half_closed"] = True
                self._send(state, {"half_close": True}, None)
            self.ops += 1

    def drain(self, final: int, deadline: float) -> list[str]:
        """Ask every open stream for progress until it reports ``final`` (or the deadline);
        return the streams that were open to the end."""
        with self.lock:
            states = [s for s in self.live.values() if not s["ended"].is_set()]
        for s in states:
            s["paused"].set()
            if not s["half_closed"]:
                self._send(s, {"progress": True}, rpc_pb2.WatchRequest(progress_request=rpc_pb2.WatchProgressRequest()))
        while time.monotonic() < deadline and any(s["progress"] < final and not s["ended"].is_set() for s in states):
            time.sleep(0.1)
            for s in states:
                if s["progress"] < final and not s["half_closed"] and not s["ended"].is_set():
                    self._send(
                        s, {"progress": True}, rpc_pb2.WatchRequest(progress_request=rpc_pb2.WatchProgressRequest())
                    )
            time.sleep(0.4)
        return [s["name"] for s in states if not s["ended"].is_set()]

    def close(self) -> None:
        with self.lock:
            states = list(self.live.values())
        for s in states:
            s["closing"] = True
            s["call"].cancel()
            s["requests"].put(None)
        for s in states:
            s["ended"].wait(5)
            s["channel"].close()


# --------------------------------------------------------------------------- leases


class LeaseClient(Client):
    """Grants leases (TTL 2-4 s), attaches one key to each (/l/<client>/<n>), keeps each alive
    on one LeaseKeepAlive stream every TTL/3 for a random while, then revokes it or lets it
    expire."""

    def __init__(self, *args: Any, max_leases: int = 4) -> None:
        super().__init__(*args)
        self.max_leases = max_leases
        self.requests: queue.Queue[rpc_pb2.LeaseKeepAliveRequest | None] = queue.Queue()
        self.sent: dict[int, deque[float]] = {}
        self.stream_lock = threading.Lock()
        self.reader: threading.Thread | None = None
        self.ka_call: Any = None

    def _open_stream(self, lease: rpc_pb2_grpc.LeaseStub) -> None:
        self.requests = queue.Queue()
        with self.stream_lock:
            self.sent = {}
        self.ka_call = lease.LeaseKeepAlive(iter(self.requests.get, None))
        self.reader = threading.Thread(target=self._read, args=(self.ka_call,), daemon=True, name=f"{self.name}-ka")
        self.reader.start()

    def _read(self, call: Any) -> None:
        with contextlib.suppress(grpc.RpcError):
            for resp in call:
                t = now()
                with self.stream_lock:
                    q = self.sent.get(resp.ID)
                    sent = q.popleft() if q else None
                if sent is not None:
                    self.rec.write(
                        {"kind": "ka", "client": self.name, "lease": resp.ID, "sent": sent, "recv": t, "ttl": resp.TTL}
                    )

    def run(self) -> None:
        ch = channel(self.endpoint)
        lease_stub = rpc_pb2_grpc.LeaseStub(ch)
        kv = rpc_pb2_grpc.KVStub(ch)
        self._open_stream(lease_stub)
        held: dict[int, dict[str, Any]] = {}
        n = 0
        try:
            while not self.shared.stop.is_set():
                t = now()
                if len(held) < self.max_leases and self.rng.random() < 0.5:
                    ttl = self.rng.randint(2, 4)
                    resp = self.call_op(
                        "lease_grant",
                        {"ttl": ttl},
                        partial(lease_stub.LeaseGrant, rpc_pb2.LeaseGrantRequest(TTL=ttl), timeout=CALL_TIMEOUT),
                        lambda r: {"id": r.ID, "ttl": r.TTL},
                    )
                    if resp is not None:
                        n += 1
                        key = f"/l/{self.name}/{n}"
                        put = rpc_pb2.PutRequest(key=_b(key), value=b"l", lease=resp.ID)
                        self.call_op(
                            "put",
                            {"key": key, "value": "l", "lease": resp.ID},
                            partial(kv.Put, put, timeout=CALL_TIMEOUT),
                            _put_out,
                        )
                        held[resp.ID] = {"ttl": resp.TTL, "until": t + self.rng.uniform(0, 3 * resp.TTL), "next": t}
                if self.reader is not None and not self.reader.is_alive():
                    self._open_stream(lease_stub)  # like clientv3: a broken keepalive stream is re-opened
                for lid, h in list(held.items()):
                    if t >= h["until"]:
                        del held[lid]
                        if self.rng.random() < 0.4:
                            self.call_op(
                                "lease_revoke",
                                {"id": lid},
                                partial(
                                    lease_stub.LeaseRevoke, rpc_pb2.LeaseRevokeRequest(ID=lid), timeout=CALL_TIMEOUT
                                ),
                                lambda r: {},
                            )
                    elif t >= h["next"]:
                        h["next"] = t + h["ttl"] / 3
                        sent = now()
                        with self.stream_lock:
                            self.sent.setdefault(lid, deque()).append(sent)
                        self.rec.write(
                            {"kind": "ka", "client": self.name, "lease": lid, "sent": sent, "recv": None, "ttl": None}
                        )
                        self.requests.put(rpc_pb2.LeaseKeepAliveRequest(ID=lid))
                self.shared.stop.wait(0.1)
        finally:
            self.requests.put(None)
            if self.ka_call is not None:
                self.ka_call.cancel()
            ch.close()

    def call_op(self, op: str, req: dict[str, Any], fn: Callable[[], Any], out: Callable[[Any], dict[str, Any]]) -> Any:
        return self.call(op, req, fn, out)


# --------------------------------------------------------------------------- ground truth


class Truth(threading.Thread):
    """The direct whole-keyspace watch from revision 1 with prev_kv; resumed from the last
    revision + 1 on the next endpoint whenever its stream breaks."""

    def __init__(self, endpoints: list[str], rec: Recorder, shared: Shared) -> None:
        super().__init__(name="truth", daemon=True)
        self.endpoints = endpoints
        self.rec = rec
        self.shared = shared
        self.done = threading.Event()
        self.call: Any = None
        self.resumes = 0

    def run(self) -> None:
        i = 0
        while not self.done.is_set():
            ch = grpc.insecure_channel(self.endpoints[i % len(self.endpoints)])
            create = rpc_pb2.WatchCreateRequest(
                key=b"\0", range_end=b"\0", start_revision=self.shared.truth_reached + 1, prev_kv=True
            )
            requests: queue.Queue[rpc_pb2.WatchRequest | None] = queue.Queue()
            requests.put(rpc_pb2.WatchRequest(create_request=create))
            self.call = rpc_pb2_grpc.WatchStub(ch).Watch(iter(requests.get, None))
            try:
                for resp in self.call:
                    if resp.canceled:
                        raise RuntimeError(f"ground-truth watch canceled: {resp}")
                    if resp.events:
                        self.rec.write(
                            {
                                "kind": "truth",
                                "t": now(),
                                "events": [event_dict(e) for e in resp.events],
                                "rev": resp.header.revision,
                            }
                        )
                        self.shared.truth_reached = max(self.shared.truth_reached, resp.events[-1].kv.mod_revision)
            except grpc.RpcError:
                pass
            finally:
                requests.put(None)
                ch.close()
            if not self.done.is_set():
                self.resumes += 1
                i += 1
                self.done.wait(0.2)

    def stop(self) -> None:
        self.done.set()
        if self.call is not None:
            self.call.cancel()
        self.join(timeout=5)
