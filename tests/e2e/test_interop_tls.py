"""etcdctl (grpc-go) through a TLS proxy (``--cert-file/--key-file``, ``--workers 2``), the commands of
test_etcdctl.py that matter over TLS; and the ALPN protocols the TLS listener agrees to.

Plaintext etcdctl is test_etcdctl.py; the other clients over TLS are the ``[tls]`` cases of test_interop.py.
"""

from __future__ import annotations

import json
import socket
import ssl
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ProxyLauncher
from tests.helpers import LOCALHOST, EtcdServer, stop_process
from tests.interop_helpers import (
    Endpoint,
    Lines,
    Pki,
    etcdctl,
    etcdctl_run,
    etcdctl_start,
    make_pki,
    start_interop_proxy,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("interop-tls-pki"))


@pytest.fixture(scope="module")
def tls_ep(etcd_server: EtcdServer, pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Endpoint]:
    """One TLS proxy for the module (the commands below share it; each uses its own keys)."""
    launcher = ProxyLauncher(tmp_path_factory.mktemp("interop-tls-proxy"), lambda: etcd_server)
    _, ep = start_interop_proxy(launcher, [etcd_server.endpoint], tls=pki)
    yield ep
    problems = launcher.close(failed=False)
    assert not problems, problems


def unique(tag: str) -> str:
    return f"tls-{tag}-{uuid.uuid4().hex[:8]}/"


def test_etcdctl_put_get_del(tls_ep: Endpoint) -> None:
    p = unique("kv")
    for k, v in (("b", "2"), ("a", "3"), ("c", "1")):
        assert etcdctl(tls_ep, "put", f"{p}{k}", v) == "OK\n"
    assert etcdctl(tls_ep, "put", f"{p}a", "30", "--prev-kv") == f"OK\n{p}a\n3\n"
    assert etcdctl(tls_ep, "get", f"{p}a") == f"{p}a\n30\n"
    assert etcdctl(tls_ep, "get", p, "--prefix", "--keys-only") == f"{p}a\n\n{p}b\n\n{p}c\n\n"
    assert etcdctl(tls_ep, "get", p, "--prefix", "--sort-by=VALUE", "--order=DESCEND", "--print-value-only") == (
        "30\n2\n1\n"
    )
    assert etcdctl(tls_ep, "del", f"{p}a") == "1\n"
    assert etcdctl(tls_ep, "del", p, "--prefix", "--prev-kv") == f"2\n{p}b\n2\n{p}c\n1\n"
    assert etcdctl(tls_ep, "get", p, "--prefix") == ""


def test_etcdctl_txn(tls_ep: Endpoint) -> None:
    p = unique("txn")
    etcdctl(tls_ep, "put", f"{p}k", "v")
    script = f'value("{p}k") = "v"\n\nput {p}k v2\nget {p}k\n\nput {p}k failed\n\n'
    assert etcdctl(tls_ep, "txn", stdin=script) == f"SUCCESS\n\nOK\n\n{p}k\nv2\n"
    assert etcdctl(tls_ep, "txn", stdin=script) == "FAILURE\n\nOK\n"
    assert etcdctl(tls_ep, "get", f"{p}k", "--print-value-only") == "failed\n"


def test_etcdctl_watch(tls_ep: Endpoint) -> None:
    key = unique("watch") + "k"
    start = int(json.loads(etcdctl(tls_ep, "get", key, "-w", "json"))["header"]["revision"]) + 1
    watcher = etcdctl_start(tls_ep, "watch", key, f"--rev={start}")
    try:
        lines = Lines(watcher)
        etcdctl(tls_ep, "put", key, "one")
        etcdctl(tls_ep, "put", f"{key}-other", "ignored")
        etcdctl(tls_ep, "put", key, "two")
        etcdctl(tls_ep, "del", key)
        assert lines.take(8) == ["PUT", key, "one", "PUT", key, "two", "DELETE", key]
        assert watcher.poll() is None
    finally:
        stop_process(watcher, grace=5)
        for stream in (watcher.stdout, watcher.stderr):
            if stream is not None:
                stream.close()


def test_etcdctl_lease(tls_ep: Endpoint) -> None:
    key = unique("lease") + "k"
    granted = etcdctl(tls_ep, "lease", "grant", "100").split()
    assert granted[0] == "lease" and granted[2:] == ["granted", "with", "TTL(100s)"], granted
    lease = granted[1]
    etcdctl(tls_ep, "put", key, "v", f"--lease={lease}")
    ttl = etcdctl(tls_ep, "lease", "timetolive", lease, "--keys")
    assert ttl.startswith(f"lease {lease} granted with TTL(100s), remaining(") and ttl.endswith(f"keys([{key}])\n")
    assert etcdctl(tls_ep, "lease", "keep-alive", "--once", lease) == f"lease {lease} keepalived with TTL(100)\n"
    assert etcdctl(tls_ep, "lease", "revoke", lease) == f"lease {lease} revoked\n"
    assert etcdctl(tls_ep, "get", key) == ""


def test_etcdctl_member_list_and_endpoint_status(tls_ep: Endpoint, etcd_server: EtcdServer) -> None:
    members = etcdctl(tls_ep, "member", "list")
    assert f", started, {etcd_server.name}, {etcd_server.peer_url}, {etcd_server.client_url}, false" in members
    status = json.loads(etcdctl(tls_ep, "endpoint", "status", "-w", "json"))
    assert status[0]["Endpoint"] == tls_ep.url
    assert status[0]["Status"]["version"] == "3.5.1" and status[0]["Status"]["leader"] > 0
    health = etcdctl(tls_ep, "endpoint", "health")
    assert health.startswith(f"{tls_ep.url} is healthy: successfully committed proposal")


def test_etcdctl_refuses_an_untrusted_proxy(tls_ep: Endpoint, tmp_path: Path) -> None:
    """The check that TLS is really on: etcdctl trusting another CA fails, without TLS it cannot talk at all."""
    other = make_pki(tmp_path)
    wrong_ca = Endpoint(tls_ep.address, other)
    result = etcdctl_run(wrong_ca, "get", "x", "--dial-timeout=2s", "--command-timeout=3s", timeout=20)
    assert result.returncode != 0 and "certificate" in result.stderr, result.stderr
    plain = etcdctl_run(Endpoint(tls_ep.address), "get", "x", "--dial-timeout=2s", "--command-timeout=3s", timeout=20)
    assert plain.returncode != 0


def test_etcdctl_compaction(fresh_etcd: EtcdServer, proxy: ProxyLauncher, pki: Pki) -> None:
    # a private etcd: compacting the shared one would break tests that read old revisions
    _, ep = start_interop_proxy(proxy, [fresh_etcd.endpoint], tls=pki)
    etcdctl(ep, "put", "cmp", "old")
    old = int(json.loads(etcdctl(ep, "get", "cmp", "-w", "json"))["header"]["revision"])
    etcdctl(ep, "put", "cmp", "new")
    now = old + 1
    assert etcdctl(ep, "get", "cmp", f"--rev={old}") == "cmp\nold\n"
    assert etcdctl(ep, "compaction", str(now), "--physical") == f"compacted revision {now}\n"
    res = etcdctl_run(ep, "get", "cmp", f"--rev={old}")
    assert res.returncode != 0 and "etcdserver: mvcc: required revision has been compacted" in res.stderr
    assert etcdctl(ep, "get", "cmp") == "cmp\nnew\n"


def alpn(port: int, pki: Pki, offered: list[str]) -> str | None:
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    ctx.set_alpn_protocols(offered)
    with (
        socket.create_connection((LOCALHOST, port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname=LOCALHOST) as conn,
    ):
        return conn.selected_alpn_protocol()


def test_alpn(tls_ep: Endpoint, pki: Pki) -> None:
    port = int(tls_ep.address.rsplit(":", 1)[1])
    assert alpn(port, pki, ["h2", "http/1.1"]) == "h2"
    assert alpn(port, pki, ["http/1.1"]) == "http/1.1"  # the HTTP/1.1 endpoints on the same port
