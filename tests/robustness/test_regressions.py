"""Focused reproductions of what the robustness runs found, small enough to debug with."""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from etcdproxy.etcdpb import rpc_pb2, rpc_pb2_grpc
from tests.faults import PASS, RESET, Relay
from tests.helpers import (
    EtcdServer,
    ProxyProcess,
    WaitTimeout,
    children_with_titles,
    start_etcd,
    start_proxy,
    wait_until,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]


@pytest.fixture
def relayed(tmp_path: Path) -> Iterator[tuple[EtcdServer, Relay, ProxyProcess]]:
    etcd = start_etcd(tmp_path, name="regress", extra_args=("--grpc-keepalive-min-time=500ms",))
    relay = Relay(etcd.client_port)
    proxy: ProxyProcess | None = None
    try:
        proxy = start_proxy(
            [relay.endpoint],
            tmp_path,
            impl="etcdproxy",
            extra_args=("--dial-keepalive-time=1s", "--dial-keepalive-timeout=1s"),
        )
        yield etcd, relay, proxy
    finally:
        if proxy is not None:
            proxy.stop()
        relay.close()
        etcd.stop()


def test_progress_after_the_link_to_etcd_came_back_follows_the_missed_events(
    relayed: tuple[EtcdServer, Relay, ProxyProcess],
) -> None:
    """A watcher in sync; the hub's link to etcd is reset while 20 keys are written; the client
    asks for progress meanwhile. Once the link is back, the progress answer (revision R) must
    come after every event <= R (etcd's 'bookmarkable' guarantee): the robustness runs saw it
    come first (link-proxy-seed15: progress at 77 at 12.81 s, events 66-77 at 12.88 s), and later
    (61d64f1 answered the lowest frontier of the catching-up s-watchers) below an event already
    sent. Now held until the stream's s-watchers settled (core/broadcast.py ProgressGate)."""
    etcd, relay, proxy = relayed
    direct = grpc.insecure_channel(etcd.endpoint)
    kv = rpc_pb2_grpc.KVStub(direct)
    channel = grpc.insecure_channel(proxy.endpoint)
    requests: queue.Queue[rpc_pb2.WatchRequest | None] = queue.Queue()
    call = rpc_pb2_grpc.WatchStub(channel).Watch(iter(requests.get, None))
    seen: list[tuple[str, int]] = []  # ("event", revision) or ("progress", revision), in arrival order
    lock = threading.Lock()

    def read() -> None:
        try:
            for resp in call:
                with lock:
                    if resp.events and resp.watch_id == 0:
                        seen.extend(("event", e.kv.mod_revision) for e in resp.events)
                    elif not resp.created and not resp.canceled and resp.watch_id == -1:  # RequestProgress's answer
                        seen.append(("progress", resp.header.revision))
                    elif not resp.created and not resp.canceled and not resp.events:
                        seen.append((f"empty response for watch {resp.watch_id}", resp.header.revision))
        except grpc.RpcError:
            pass

    try:
        requests.put(rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(key=b"/p/", range_end=b"/p0")))
        for i in range(4):  # more s-watchers on the hub's upstream stream, each to be resumed
            sub = rpc_pb2.WatchCreateRequest(key=b"/p/%d" % i, range_end=b"/p/%d" % (i + 1))
            requests.put(rpc_pb2.WatchRequest(create_request=sub))
        threading.Thread(target=read, daemon=True).start()
        time.sleep(0.3)
        first = kv.Put(rpc_pb2.PutRequest(key=b"/p/first", value=b"v"), timeout=5).header.revision
        wait_until(lambda: ("event", first) in seen, 10, "the first event through the proxy")
        relay.set_mode(RESET)
        last = first
        for i in range(20):
            last = kv.Put(rpc_pb2.PutRequest(key=b"/p/%d%d" % (i % 5, i), value=b"v"), timeout=5).header.revision
        requests.put(rpc_pb2.WatchRequest(progress_request=rpc_pb2.WatchProgressRequest()))
        time.sleep(1.5)
        relay.set_mode(PASS)
        wait_until(lambda: any(kind == "progress" for kind, _ in seen), 20, "the progress answer")
        wait_until(lambda: ("event", last) in seen, 20, f"the event at {last}")
        with lock:
            order = list(seen)
        progress_at = next(i for i, (kind, _) in enumerate(order) if kind == "progress")
        revision = order[progress_at][1]
        before = [r for kind, r in order[:progress_at] if kind == "event"]
        # etcd answers with its current revision (>= 21 writes on): never below an event already sent...
        assert revision >= max(before), f"progress at {revision} after the event at {max(before)}: {order}"
        # ...and only once every event up to it was sent ('bookmarkable')
        due = [r for r in range(first, last + 1) if r <= revision]
        assert before == due, f"progress at {revision} came after events {before[-3:]}, not {due[-3:]}: {order}"
    finally:
        call.cancel()
        requests.put(None)
        channel.close()
        direct.close()


@pytest.fixture
def plain(tmp_path: Path) -> Iterator[tuple[EtcdServer, ProxyProcess]]:
    etcd = start_etcd(tmp_path, name="regress-hub")
    proxy: ProxyProcess | None = None
    try:
        proxy = start_proxy([etcd.endpoint], tmp_path, impl="etcdproxy")
        yield etcd, proxy
    finally:
        if proxy is not None:
            proxy.stop()
        etcd.stop()


@pytest.mark.parametrize("role", ["hub", "worker"])
def test_watch_requests_sent_while_a_process_is_stopped_are_all_answered(
    plain: tuple[EtcdServer, ProxyProcess], role: str
) -> None:
    """Creates, cancels and progress requests a client sends while the hub (or the workers) are
    SIGSTOPped are each answered once they run again (soak seed 21: after a 2 s stop-hub a create
    and three cancels were never answered for the 12 s left of the run; worker seed 13: a create
    sent during a stop-worker was never answered). The worker dropped what it sent while the hub
    looked silent, and a hub that came back with the same epoch got no re-send."""
    _etcd, proxy = plain
    stopped = [
        pid for pid, title in children_with_titles(proxy.proc.pid).items() if title.startswith(f"etcdproxy: {role}")
    ]
    assert stopped, children_with_titles(proxy.proc.pid)
    channel = grpc.insecure_channel(proxy.endpoint)
    requests: queue.Queue[rpc_pb2.WatchRequest | None] = queue.Queue()
    call = rpc_pb2_grpc.WatchStub(channel).Watch(iter(requests.get, None))
    created: list[int] = []
    canceled: list[int] = []
    progress: list[int] = []
    ended: list[str] = []

    def read() -> None:
        try:
            for resp in call:
                if resp.created:
                    created.append(resp.watch_id)
                elif resp.canceled:
                    canceled.append(resp.watch_id)
                elif not resp.events and resp.watch_id == -1:
                    progress.append(resp.header.revision)
            ended.append("OK")
        except grpc.RpcError as exc:
            ended.append(f"{exc.code().name}: {exc.details()}")

    def create(key: bytes) -> None:
        requests.put(rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(key=key)))

    try:
        threading.Thread(target=read, daemon=True).start()
        for i in range(3):
            create(b"/h/%d" % i)
        wait_until(lambda: len(created) == 3, 10, "three watchers created")
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        try:
            for i in range(3, 6):
                create(b"/h/%d" % i)
            for wid in created[:3]:
                requests.put(rpc_pb2.WatchRequest(cancel_request=rpc_pb2.WatchCancelRequest(watch_id=wid)))
            requests.put(rpc_pb2.WatchRequest(progress_request=rpc_pb2.WatchProgressRequest()))
            time.sleep(2.0)
        finally:
            for pid in stopped:
                os.kill(pid, signal.SIGCONT)
        with contextlib.suppress(WaitTimeout):
            wait_until(lambda: len(created) == 6 and len(canceled) == 3 and progress, 8, "every answer")
        answers = {"created": created, "canceled": canceled, "progress": progress, "stream ended": ended}
        assert len(created) == 6 and len(canceled) == 3 and progress, (
            f"sent 6 creates, 3 cancels, 1 progress: {answers}"
        )
    finally:
        call.cancel()
        requests.put(None)
        channel.close()
