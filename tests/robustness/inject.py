"""Faults injected while traffic runs (loopback only), one at a time, each recorded as a
``fault`` window: its name, type and [start, end] (end = once recovery was seen).

Types the validators know: ``conn`` breaks client connections to the proxy (a killed worker),
``member`` disrupts etcd members (etcd itself extends leases then), ``hub`` and ``link`` are
invisible to clients except for pauses.
"""

from __future__ import annotations

import os
import random
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass

from tests.faults import BLACKHOLE, PASS, RESET, Relay
from tests.helpers import ProxyProcess, children_with_titles, wait_until
from tests.robustness.cluster import Cluster
from tests.robustness.history import Recorder, now

PROXY_FAULTS = ("kill-worker", "stop-worker", "kill-hub", "stop-hub")
LINK_FAULTS = ("blackhole", "delay", "reset")
MEMBER_FAULTS = ("kill-leader", "kill-follower", "quorum-loss")
FAULTS = (*PROXY_FAULTS, *LINK_FAULTS, *MEMBER_FAULTS)
TYPES = {
    "kill-worker": "conn",
    "stop-worker": "conn",
    "kill-hub": "hub",
    "stop-hub": "hub",
    "blackhole": "link",
    "delay": "link",
    "reset": "link",
    "kill-leader": "member",
    "kill-follower": "member",
    "quorum-loss": "member",
}


@dataclass
class Targets:
    proxy: ProxyProcess | None
    relays: list[Relay]
    cluster: Cluster | None
    truth_member: int = 0


def _child(proxy: ProxyProcess, prefix: str, rng: random.Random) -> tuple[int, str]:
    found = sorted((pid, t) for pid, t in children_with_titles(proxy.proc.pid).items() if t.startswith(prefix))
    assert found, f"no {prefix!r} child of {proxy.proc.pid}: {children_with_titles(proxy.proc.pid)}"
    return rng.choice(found)


def _respawned(proxy: ProxyProcess, title: str, old: int) -> bool:
    return any(t == title and pid != old for pid, t in children_with_titles(proxy.proc.pid).items())


class Injector(threading.Thread):
    """Applies ``faults`` in turn (in a seeded random order, repeated) until ``stop``."""

    def __init__(
        self,
        faults: list[str],
        targets: Targets,
        rec: Recorder,
        rng: random.Random,
        stop: threading.Event,
        hold_s: float = 2.0,
        gap_s: float = 2.0,
        warmup_s: float = 1.5,
    ) -> None:
        super().__init__(name="faults", daemon=True)
        self.faults = faults
        self.t = targets
        self.rec = rec
        self.rng = rng
        self.stop_flag = stop
        self.hold_s = hold_s
        self.gap_s = gap_s
        self.warmup_s = warmup_s
        self.applied: list[str] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            if self.stop_flag.wait(self.warmup_s):
                return
            order = list(self.faults)
            while not self.stop_flag.is_set() and order:
                for name in order:
                    if self.stop_flag.is_set():
                        return
                    start = now()
                    getattr(self, "do_" + name.replace("-", "_"))()
                    self.rec.write({"kind": "fault", "name": name, "type": TYPES[name], "start": start, "end": now()})
                    self.applied.append(name)
                    self.stop_flag.wait(self.gap_s)
                self.rng.shuffle(order)
        except BaseException as exc:  # reported by the harness: a fault that could not be applied or undone
            self.error = exc

    def _hold(self) -> None:
        self.stop_flag.wait(self.hold_s)  # a stop cuts the hold short; the fault is still undone

    # ------------------------------------------------------------------ proxy processes

    def _kill(self, prefix: str) -> None:
        assert self.t.proxy is not None
        pid, title = _child(self.t.proxy, prefix, self.rng)
        self.t.proxy.note_children()
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: _respawned(self.t.proxy, title, pid), 20, f"{title} respawned")  # type: ignore[arg-type]
        self.t.proxy.note_children()

    def _pause(self, prefix: str) -> None:
        assert self.t.proxy is not None
        pid, _ = _child(self.t.proxy, prefix, self.rng)
        os.kill(pid, signal.SIGSTOP)
        try:
            self._hold()
        finally:
            os.kill(pid, signal.SIGCONT)

    def do_kill_worker(self) -> None:
        self._kill("etcdproxy: worker")

    def do_stop_worker(self) -> None:
        self._pause("etcdproxy: worker")

    def do_kill_hub(self) -> None:
        self._kill("etcdproxy: hub")

    def do_stop_hub(self) -> None:
        self._pause("etcdproxy: hub")

    # ------------------------------------------------------------------ the hub's link to etcd

    def _link(self, apply: Callable[[Relay], None], heal_with_reset: bool = False) -> None:
        for r in self.t.relays:
            apply(r)
        try:
            self._hold()
        finally:
            for r in self.t.relays:
                r.delay_s = 0.0
                if heal_with_reset:
                    r.set_mode(RESET)
                r.set_mode(PASS)

    def do_blackhole(self) -> None:
        # The relay drops the bytes a blackhole swallows; TCP never does (it retransmits, or the
        # connection dies), so a connection that lived through it must not carry on with a hole
        # in the middle of its HTTP/2 stream: it is reset when the link heals.
        self._link(lambda r: r.set_mode(BLACKHOLE), heal_with_reset=True)

    def do_reset(self) -> None:
        self._link(lambda r: r.set_mode(RESET))

    def do_delay(self) -> None:
        def slow(r: Relay) -> None:
            r.delay_s = 0.2

        self._link(slow)

    # ------------------------------------------------------------------ etcd members

    def _members_down(self, victims: list[int]) -> None:
        c = self.t.cluster
        assert c is not None
        for i in victims:
            c.kill(i)
        try:
            self._hold()
        finally:
            for i in victims:
                c.run(i)
            for i in victims:
                c.wait_healthy(i)

    def do_kill_leader(self) -> None:
        c = self.t.cluster
        assert c is not None
        found = wait_until(lambda: [i for i in [c.leader()] if i is not None], 15, "a leader")
        self._members_down(found)

    def do_kill_follower(self) -> None:
        c = self.t.cluster
        assert c is not None
        leader = c.leader()
        followers = [i for i in range(len(c.members)) if i != leader and i != self.t.truth_member]
        self._members_down([self.rng.choice(followers)])

    def do_quorum_loss(self) -> None:
        c = self.t.cluster
        assert c is not None
        self._members_down([i for i in range(len(c.members)) if i != self.t.truth_member])
