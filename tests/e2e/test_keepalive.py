"""Server-side keepalive flags on the client port (SPEC 16), with real grpc clients.

* ``--grpc-keepalive-min-time``: a client pinging more often than that on an idle stream is sent
  GOAWAY (too_many_pings) and its stream ends; with a lower min-time the same client is served.
* ``--grpc-keepalive-interval`` / ``--grpc-keepalive-timeout``: a client that stops answering
  (a silent partition, made with tests/faults.py) is disconnected by the proxy instead of holding
  its streams and watchers forever.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
import pytest

from tests.faults import BLACKHOLE, Relay
from tests.helpers import HeldWatch, ProxyProcess, wait_until

pytestmark = [pytest.mark.timeout(90)]


IDLE_KEY = b"keepalive-test/never-written"  # the watched stream stays idle

# A client that pings every second while its stream is idle.
EAGER_PINGS = [
    ("grpc.keepalive_time_ms", 1000),
    ("grpc.keepalive_timeout_ms", 5000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 0),
]


@pytest.mark.parametrize(("min_time", "ends"), [("5s", True), ("500ms", False)])
def test_keepalive_min_time_is_enforced(proxy: Callable[..., ProxyProcess], min_time: str, ends: bool) -> None:
    p = proxy(extra_args=(f"--grpc-keepalive-min-time={min_time}",))
    watch = HeldWatch(p.endpoint, IDLE_KEY, EAGER_PINGS)
    try:
        assert watch.created.wait(10)
        ended = watch.ended.wait(8)  # grpc servers tolerate two early pings, then GOAWAY
        assert ended is ends, watch.error
        if ends:
            assert isinstance(watch.error, grpc.RpcError)
            assert watch.error.code() is grpc.StatusCode.UNAVAILABLE, watch.error
    finally:
        watch.close()


def test_silent_client_is_disconnected(proxy: Callable[..., ProxyProcess]) -> None:
    p = proxy(extra_args=("--grpc-keepalive-interval=1s", "--grpc-keepalive-timeout=1s"))
    relay = Relay(p.port)
    watch = HeldWatch(relay.endpoint, IDLE_KEY)
    try:
        assert watch.created.wait(10)
        assert relay.open_connections() == 1
        relay.set_mode(BLACKHOLE)  # the client is gone without a FIN: only pings can tell
        started = time.monotonic()
        wait_until(lambda: relay.open_connections() == 0, 20, "the proxy to close the silent connection")
        took = time.monotonic() - started
        # interval (1 s) + timeout (1 s), plus scheduling; far from the 2 h default
        assert took < 10, took
    finally:
        watch.close()
        relay.close()
