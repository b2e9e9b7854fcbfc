"""Fixtures of the HTTP/2 conformance and abuse tests.

* ``transport`` (session): which HTTP/2 server answers on the proxy's client port: ``go`` (the Go
  ``etcd grpc-proxy``, ``ETCDPROXY_TEST_IMPL=go``), ``grpcio`` (recognised by the SETTINGS id 0xfe03
  grpc-core sends) or ``h2`` (etcdproxy's own transport, issue 11). Cases where a reference server
  differs from the contract skip for that server only, with the observed behaviour in the reason.
* ``h2c``: a raw HTTP/2 connection to ``shared_proxy``, preface and SETTINGS exchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.h2.rawclient import H2Client
from tests.helpers import IMPL_GO, LOCALHOST, ProxyProcess, proxy_impl

GRPC_CORE_SETTING = 0xFE03  # GRPC_ALLOW_TRUE_BINARY_METADATA, sent only by grpc-core


def detect_transport(port: int) -> str:
    if proxy_impl() == IMPL_GO:
        return "go"
    with H2Client(LOCALHOST, port) as c:
        c.connect()
        return "grpcio" if GRPC_CORE_SETTING in c.server_settings else "h2"


@pytest.fixture(scope="session")
def transport(_shared_proxy_holder: object) -> str:
    proxy: ProxyProcess = _shared_proxy_holder.get()  # type: ignore[attr-defined]
    return detect_transport(proxy.port)


def deviates(transport: str, **observed: str) -> None:
    """Skip when ``transport`` is one whose documented behaviour differs from the contract here.

    ``deviates(transport, go="...", grpcio="...")``: the reason is what that server was seen doing.
    Never used for ``h2``: our transport must meet the contract.
    """
    assert "h2" not in observed, "our own transport is never excused"
    reason = observed.get(transport)
    if reason is not None:
        pytest.skip(f"{transport} differs from the contract: {reason}")


@pytest.fixture(autouse=True)
def _known_deviations(request: pytest.FixtureRequest) -> None:
    """Skip a case listed in its module's ``DEVIATIONS[transport][test name]`` (the observed behaviour)."""
    table: dict[str, dict[str, str]] = getattr(request.module, "DEVIATIONS", {})
    if not table:
        return
    current: str = request.getfixturevalue("transport")
    deviates(current, **{t: r for t, cases in table.items() if (r := cases.get(request.node.name)) is not None})


@pytest.fixture
def connect(shared_proxy: ProxyProcess) -> Iterator[Callable[..., H2Client]]:
    """Factory of raw connections to the shared proxy, all closed at the end of the test."""
    opened: list[H2Client] = []

    def make(*, handshake: bool = True, **kw: object) -> H2Client:
        c = H2Client(LOCALHOST, shared_proxy.port)
        opened.append(c)
        if handshake:
            c.connect(**kw)  # type: ignore[arg-type]
        return c

    yield make
    for c in opened:
        c.close()


@pytest.fixture
def h2c(connect: Callable[..., H2Client]) -> H2Client:
    return connect()
