"""TLS both ways (SPEC 13, issue 8): real etcd with https client URLs, real certificates made here.

* upstream: an etcd with ``--client-cert-auth`` behind a plaintext proxy holding an empty-CN client
  certificate (TLS termination), etcdctl through it; a CN'd certificate refused like Go; ``--cacert``
  alone against server-only TLS (Go cannot, SPEC 20.2 V);
* downstream: mutual TLS on the gRPC port; no certificate, another CA's, an expired one and TLS 1.1
  all fail the handshake with nothing reaching etcd; cipher suites; ``--auto-tls``; the https
  ``--metrics-addr`` (SPEC 21 scenario 4).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import select
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from etcdproxy.etcdpb import rpc_pb2
from tests.conftest import ProxyLauncher
from tests.helpers import (
    IMPL_GO,
    LOCALHOST,
    READY_LINE,
    ROOT,
    EtcdServer,
    ProxyProcess,
    Stubs,
    find_binary,
    free_port,
    http_get,
    log_tail,
    proxy_command,
    proxy_impl,
    stop_process,
    wait_until,
)

pytestmark = pytest.mark.timeout(120)

# --------------------------------------------------------------------------- certificates


@dataclass
class Issuer:
    cert: x509.Certificate
    key: rsa.RSAPrivateKey
    path: Path


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _name(cn: str) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "etcdproxy tests")]
    if cn:
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    return x509.Name(attrs)


def make_ca(directory: Path, name: str) -> Issuer:
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    path = directory / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Issuer(cert, key, path)


def issue(ca: Issuer, directory: Path, name: str, *, cn: str = "", expired: bool = False) -> Pair:
    """A leaf for both server and client use, valid for 127.0.0.1 and localhost."""
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    start, end = (
        (now - datetime.timedelta(days=10), now - datetime.timedelta(days=1))
        if expired
        else (
            now - datetime.timedelta(days=1),
            now + datetime.timedelta(days=30),
        )
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(LOCALHOST)), x509.DNSName("localhost")]),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .sign(ca.key, hashes.SHA256())
    )
    pair = Pair(directory / f"{name}.crt", directory / f"{name}.key")
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pair.key.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return pair


@dataclass
class PKI:
    ca: Issuer
    other_ca: Issuer
    etcd_server: Pair  # etcd's serving certificate
    proxy_client: Pair  # empty CN: what the proxy shows etcd
    named_client: Pair  # CN "root": refused as the proxy's client certificate
    proxy_server: Pair  # the proxy's serving certificate
    client: Pair  # a good client of the proxy
    stranger: Pair  # signed by other_ca
    expired: Pair  # signed by ca, expired yesterday


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    d = tmp_path_factory.mktemp("pki")
    ca, other = make_ca(d, "ca"), make_ca(d, "other-ca")
    return PKI(
        ca=ca,
        other_ca=other,
        etcd_server=issue(ca, d, "etcd-server", cn="etcd"),
        proxy_client=issue(ca, d, "proxy-client"),
        named_client=issue(ca, d, "named-client", cn="root"),
        proxy_server=issue(ca, d, "proxy-server", cn="proxy"),
        client=issue(ca, d, "client", cn="client"),
        stranger=issue(other, d, "stranger", cn="client"),
        expired=issue(ca, d, "expired", cn="client", expired=True),
    )


# --------------------------------------------------------------------------- processes


def start_tls_etcd(base: Path, pki: PKI, *, client_cert_auth: bool, name: str = "tls") -> EtcdServer:
    """One etcd with https client URLs (and client-cert auth if asked); metrics/health over http."""
    server = EtcdServer(
        name=name,
        data_dir=base / f"{name}.data",
        client_port=free_port(),
        peer_port=free_port(),
        metrics_port=free_port(),
        log_path=base / f"{name}.log",
    )
    url = f"https://{server.endpoint}"
    args = [
        find_binary("etcd"),
        f"--name={name}",
        f"--data-dir={server.data_dir}",
        f"--listen-client-urls={url}",
        f"--advertise-client-urls={url}",
        f"--listen-peer-urls={server.peer_url}",
        f"--initial-advertise-peer-urls={server.peer_url}",
        f"--initial-cluster={name}={server.peer_url}",
        f"--listen-metrics-urls=http://{LOCALHOST}:{server.metrics_port}",
        f"--cert-file={pki.etcd_server.cert}",
        f"--key-file={pki.etcd_server.key}",
        "--log-level=warn",
    ]
    if client_cert_auth:
        args += ["--client-cert-auth", f"--trusted-ca-file={pki.ca.path}"]
    with server.log_path.open("ab") as log:
        server.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    health = f"http://{LOCALHOST}:{server.metrics_port}/health"
    try:
        wait_until(lambda: server.proc.poll() is not None or http_get(health)[0] == 200, 30, f"etcd {name}")
    except Exception:
        server.stop()
        raise
    assert server.proc.poll() is None, log_tail(server.log_path)
    return server


@pytest.fixture(scope="module")
def mtls_etcd(pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    server = start_tls_etcd(tmp_path_factory.mktemp("mtls-etcd"), pki, client_cert_auth=True)
    yield server
    server.stop()


def upstream_args(pki: PKI) -> tuple[str, ...]:
    return (f"--cacert={pki.ca.path}", f"--cert={pki.proxy_client.cert}", f"--key={pki.proxy_client.key}")


def server_args(pki: PKI, *, mutual: bool = True) -> tuple[str, ...]:
    args = [f"--cert-file={pki.proxy_server.cert}", f"--key-file={pki.proxy_server.key}"]
    if mutual:
        args.append(f"--trusted-ca-file={pki.ca.path}")
    return tuple(args)


def credentials(pki: PKI, pair: Pair | None, root: Path | None = None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=(root or pki.ca.path).read_bytes(),
        private_key=pair.key.read_bytes() if pair else None,
        certificate_chain=pair.cert.read_bytes() if pair else None,
    )


def secure_stubs(endpoint: str, creds: grpc.ChannelCredentials) -> Stubs:
    return Stubs(name="tls", endpoint=endpoint, channel=grpc.secure_channel(endpoint, creds))


def start_tls_proxy(
    launcher: ProxyLauncher,
    endpoints: list[str],
    extra_args: tuple[str, ...],
    ready_creds: grpc.ChannelCredentials | None,
    *,
    self_advertise: bool = False,
    timeout: float = 30,
) -> ProxyProcess:
    """Like helpers.start_proxy, but the readiness probe speaks TLS (an insecure probe never connects).

    Registered with the ``proxy`` fixture's launcher so it is stopped by pid like every other proxy.
    """
    port = free_port()
    extra = (f"--advertise-client-url=https://{LOCALHOST}:{port}",) if self_advertise else ()
    args = proxy_command(
        "etcdproxy", endpoints, port, workers=2, advertise_client_url=None if self_advertise else "", extra_args=()
    )
    args += [*extra, *extra_args]
    log_path = launcher.log_dir / f"proxy-tls-{port}.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    with log_path.open("ab") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=ROOT)
    proxy = ProxyProcess(impl="etcdproxy", port=port, log_path=log_path, args=args, proc=proc)
    launcher.started.append(proxy)
    wait_until(lambda: not proxy.alive() or READY_LINE in log_path.read_text(errors="replace"), timeout, "proxy start")
    assert proxy.alive(), proxy.log_tail()
    if ready_creds is not None:
        with grpc.secure_channel(proxy.endpoint, ready_creds) as ch:
            grpc.channel_ready_future(ch).result(timeout=timeout)
    proxy.note_children()
    return proxy


def run_proxy_expecting_exit(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "etcdproxy", f"--listen-addr={LOCALHOST}:{free_port()}", "--workers=1", *args]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT, check=False)


def etcdctl(endpoint: str, *args: str, tls: tuple[str, ...] = (), timeout: float = 30) -> str:
    cmd = [find_binary("etcdctl"), f"--endpoints={endpoint}", "--command-timeout=10s", *tls, *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    assert result.returncode == 0, f"etcdctl {args} failed: {result.stderr}"
    return result.stdout


def range_count(etcd: EtcdServer) -> float:
    return etcd.metric("grpc_server_handled_total", grpc_method="Range")


# --------------------------------------------------------------------------- upstream TLS


def test_tls_termination_etcdctl(pki: PKI, mtls_etcd: EtcdServer, proxy: ProxyLauncher, etcdctl_bin: str) -> None:
    """A client-cert-auth etcd served as a plain local endpoint: etcdctl put/get/watch without TLS."""
    metrics_port = free_port()
    p = proxy(
        endpoints=[f"https://{mtls_etcd.endpoint}"],
        extra_args=(*upstream_args(pki), f"--metrics-addr=http://{LOCALHOST}:{metrics_port}"),
    )
    assert etcdctl(p.endpoint, "put", "tls/k", "v1").strip() == "OK"
    assert etcdctl(p.endpoint, "get", "tls/k").split() == ["tls/k", "v1"]
    watcher = subprocess.Popen(
        [etcdctl_bin, f"--endpoints={p.endpoint}", "watch", "tls/w"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        seen: list[str] = []
        assert watcher.stdout is not None
        os.set_blocking(watcher.stdout.fileno(), False)
        deadline = time.monotonic() + 20
        while "v2" not in seen and time.monotonic() < deadline:
            # the watch may not be registered yet when the first put lands: put until it is seen
            etcdctl(p.endpoint, "put", "tls/w", "v2")
            ready, _, _ = select.select([watcher.stdout], [], [], 1.0)
            if ready:
                seen += (watcher.stdout.read() or "").split()
        assert seen[:3] == ["PUT", "tls/w", "v2"], seen
    finally:
        stop_process(watcher)
        if watcher.stdout is not None:
            watcher.stdout.close()
    # /health and etcd's /metrics reached over https with the same files
    status, body = http_get(f"http://{LOCALHOST}:{metrics_port}/health", timeout=5)
    assert (status, body) == (200, '{"health":"true","reason":""}')
    status, body = http_get(f"http://{LOCALHOST}:{metrics_port}/metrics", timeout=10)
    assert status == 200 and "etcd_server_has_leader" in body


def test_tls_to_a_list_of_ip_endpoints(pki: PKI, mtls_etcd: EtcdServer, proxy: ProxyLauncher) -> None:
    """An ``ipv4:a,b`` channel: grpc would check the certificates against the whole list as one name."""
    url = f"https://{mtls_etcd.endpoint}"
    p = proxy(endpoints=[url, url], extra_args=upstream_args(pki))
    assert etcdctl(p.endpoint, "put", "tls/list", "ok").strip() == "OK"
    assert etcdctl(p.endpoint, "get", "tls/list", "--print-value-only").strip() == "ok"


def test_client_cert_with_common_name_is_refused(pki: PKI, mtls_etcd: EtcdServer) -> None:
    args = [f"--endpoints=https://{mtls_etcd.endpoint}", f"--cacert={pki.ca.path}"]
    result = run_proxy_expecting_exit([*args, f"--cert={pki.named_client.cert}", f"--key={pki.named_client.key}"])
    assert result.returncode == 1
    assert f"cert has non empty Common Name (root): {pki.named_client.cert}" in result.stderr
    assert READY_LINE not in result.stderr


def test_cacert_alone_against_server_only_tls(pki: PKI, proxy: ProxyLauncher, tmp_path: Path) -> None:
    """The Go proxy cannot start this way (SPEC 20.2 V); etcdproxy verifies etcd and shows no certificate."""
    if proxy_impl() == IMPL_GO:
        pytest.skip("the Go proxy exits at start-up with --cacert alone (SPEC 20.2 V)")
    etcd = start_tls_etcd(tmp_path, pki, client_cert_auth=False, name="server-tls")
    try:
        p = proxy(endpoints=[f"https://{etcd.endpoint}"], extra_args=(f"--cacert={pki.ca.path}",))
        assert etcdctl(p.endpoint, "put", "alone", "yes").strip() == "OK"
        assert etcdctl(p.endpoint, "get", "alone", "--print-value-only").strip() == "yes"
    finally:
        etcd.stop()


def test_unknown_ca_upstream_fails_calls(pki: PKI, mtls_etcd: EtcdServer, proxy: ProxyLauncher) -> None:
    """An https endpoint verified against the system roots: our private CA is not trusted."""
    p = proxy(endpoints=[f"https://{mtls_etcd.endpoint}"])
    with grpc.insecure_channel(p.endpoint) as ch:
        stubs = Stubs(name="p", endpoint=p.endpoint, channel=ch)
        with pytest.raises(grpc.RpcError) as exc:
            stubs.kv.Range(rpc_pb2.RangeRequest(key=b"x"), timeout=5)
    assert exc.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


# --------------------------------------------------------------------------- downstream TLS


def tls12_handshake(port: int, pki: PKI, cipher: str, client: Pair | None = None) -> str:
    """A TLS 1.2 handshake offering only ``cipher``; returns the suite the server chose."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki.ca.path)
    if client is not None:
        ctx.load_cert_chain(client.cert, client.key)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(cipher)
    ctx.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((LOCALHOST, port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname=LOCALHOST) as conn,
    ):
        return str(conn.cipher()[0])


def _tls11_refused(endpoint: str, pki: PKI) -> ssl.SSLError | None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki.ca.path)
    ctx.load_cert_chain(pki.client.cert, pki.client.key)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.0/1.1 are deprecated: that is the point
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # else OpenSSL 3 will not even offer TLS 1.1
    host, port = endpoint.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname=host):
                return None
        except ssl.SSLError as exc:
            return exc


def test_mutual_tls_on_the_grpc_port(pki: PKI, fresh_etcd: EtcdServer, proxy: ProxyLauncher, etcdctl_bin: str) -> None:
    good = credentials(pki, pki.client)
    p = start_tls_proxy(proxy, [fresh_etcd.endpoint], server_args(pki), good)
    before = range_count(fresh_etcd)
    for label, creds in (
        ("no client certificate", credentials(pki, None)),
        ("another CA's certificate", credentials(pki, pki.stranger)),
        ("an expired certificate", credentials(pki, pki.expired)),
    ):
        stubs = secure_stubs(p.endpoint, creds)
        try:
            with pytest.raises(grpc.RpcError) as exc:
                stubs.kv.Range(rpc_pb2.RangeRequest(key=b"k"), timeout=5)
            assert exc.value.code() == grpc.StatusCode.UNAVAILABLE, (label, exc.value)
        finally:
            stubs.close()
    with grpc.insecure_channel(p.endpoint) as ch, pytest.raises(grpc.RpcError):  # plaintext on a TLS port
        Stubs(name="plain", endpoint=p.endpoint, channel=ch).kv.Range(rpc_pb2.RangeRequest(key=b"k"), timeout=5)
    error = _tls11_refused(p.endpoint, pki)
    assert error is not None, "a TLS 1.1 handshake succeeded"
    assert range_count(fresh_etcd) == before, "a refused client reached etcd"
    # grpc's default TLS 1.2 list (compare test_cipher_suites_and_versions)
    assert tls12_handshake(p.port, pki, "ECDHE-RSA-AES256-GCM-SHA384", pki.client) == "ECDHE-RSA-AES256-GCM-SHA384"

    stubs = secure_stubs(p.endpoint, good)
    try:
        stubs.kv.Put(rpc_pb2.PutRequest(key=b"mtls", value=b"ok"), timeout=10)
        response = stubs.kv.Range(rpc_pb2.RangeRequest(key=b"mtls"), timeout=10)
        assert [kv.value for kv in response.kvs] == [b"ok"]
    finally:
        stubs.close()
    assert range_count(fresh_etcd) > before  # the counter does move for a client that gets in
    tls = (f"--cacert={pki.ca.path}", f"--cert={pki.client.cert}", f"--key={pki.client.key}")
    url = f"https://{p.endpoint}"
    assert etcdctl(url, "get", "mtls", "--print-value-only", tls=tls).strip() == "ok"


def test_cipher_suites_and_versions(pki: PKI, fresh_etcd: EtcdServer, proxy: ProxyLauncher) -> None:
    suite = "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"
    p = start_tls_proxy(
        proxy, [fresh_etcd.endpoint], (*server_args(pki, mutual=False), f"--listen-cipher-suites={suite}"), None
    )

    assert tls12_handshake(p.port, pki, "ECDHE-RSA-AES128-GCM-SHA256") == "ECDHE-RSA-AES128-GCM-SHA256"
    with pytest.raises(ssl.SSLError):
        tls12_handshake(p.port, pki, "ECDHE-RSA-AES256-GCM-SHA384")  # in grpc's default list, not in ours

    for args, message in (
        (["--listen-cipher-suites=BOGUS"], 'unexpected TLS cipher suite "BOGUS"'),
        (["--listen-cipher-suites=TLS_RSA_WITH_RC4_128_SHA"], "not available in etcdproxy's TLS library"),
        (["--client-crl-file=/nonexistent.crl"], "cannot load --client-crl-file"),
    ):
        result = run_proxy_expecting_exit([f"--endpoints={fresh_etcd.endpoint}", *server_args(pki), *args])
        assert result.returncode == 1, result.stderr
        assert message in result.stderr


def test_auto_tls(fresh_etcd: EtcdServer, proxy: ProxyLauncher, tmp_path: Path) -> None:
    data_dir = tmp_path / "proxy-data"
    args = ("--auto-tls", f"--data-dir={data_dir}", "--self-signed-cert-validity=2")
    # the certificate exists before any worker forks: the readiness probe can already trust it
    p = start_tls_proxy(proxy, [fresh_etcd.endpoint], args, None)
    cert_path = data_dir / "fixtures" / "proxy" / "cert.pem"
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert datetime.timedelta(days=2 * 365 - 1) < lifetime < datetime.timedelta(days=2 * 365 + 2)
    stubs = secure_stubs(p.endpoint, grpc.ssl_channel_credentials(root_certificates=cert_path.read_bytes()))
    try:
        stubs.kv.Put(rpc_pb2.PutRequest(key=b"auto", value=b"tls"), timeout=10)
        assert stubs.kv.Range(rpc_pb2.RangeRequest(key=b"auto"), timeout=10).kvs[0].value == b"tls"
    finally:
        stubs.close()


def test_https_metrics_addr(pki: PKI, fresh_etcd: EtcdServer, proxy: ProxyLauncher) -> None:
    """SPEC 21 scenario 4: TLS1.2..TLS1.3 listener, /proxy/health over https with a client certificate."""
    metrics_port = free_port()
    args = (
        *server_args(pki),
        "--tls-min-version=TLS1.2",
        "--tls-max-version=TLS1.3",
        f"--metrics-addr=https://{LOCALHOST}:{metrics_port}",
    )
    start_tls_proxy(proxy, [fresh_etcd.endpoint], args, credentials(pki, pki.client), self_advertise=True)
    ctx = ssl.create_default_context(cafile=str(pki.ca.path))
    ctx.load_cert_chain(pki.client.cert, pki.client.key)

    def get(path: str) -> tuple[int, str]:
        with urllib.request.urlopen(f"https://{LOCALHOST}:{metrics_port}{path}", timeout=10, context=ctx) as r:
            return r.status, r.read().decode()

    assert get("/health") == (200, '{"health":"true","reason":""}')
    status, body = get("/proxy/health")
    assert status == 200 and '"health":"true"' in body
    no_cert = ssl.create_default_context(cafile=str(pki.ca.path))
    with pytest.raises((ssl.SSLError, ConnectionError, urllib.error.URLError)):
        urllib.request.urlopen(f"https://{LOCALHOST}:{metrics_port}/health", timeout=10, context=no_cert).read()


# --------------------------------------------------------------------------- our transport: versions and CRL


def _handshake(port: int, pki: PKI, client: Pair, version: ssl.TLSVersion | None = None) -> str:
    """A TLS handshake with a client certificate; returns the negotiated version (raises on refusal)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki.ca.path)
    ctx.load_cert_chain(client.cert, client.key)
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    ctx.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((LOCALHOST, port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname=LOCALHOST) as conn,
    ):
        conn.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        # the server's SETTINGS: a TLS 1.3 refusal of the client certificate shows up here (alert or EOF)
        if len(conn.recv(9)) != 9:
            raise ConnectionError("closed by the server after the handshake")
        assert conn.selected_alpn_protocol() == "h2"
        return str(conn.version())


def test_tls_version_bounds_on_the_listener(pki: PKI, fresh_etcd: EtcdServer, proxy: ProxyLauncher) -> None:
    only13 = start_tls_proxy(
        proxy, [fresh_etcd.endpoint], (*server_args(pki), "--tls-min-version=TLS1.3"), credentials(pki, pki.client)
    )
    assert _handshake(only13.port, pki, pki.client) == "TLSv1.3"
    with pytest.raises(ssl.SSLError):
        _handshake(only13.port, pki, pki.client, ssl.TLSVersion.TLSv1_2)
    only12 = start_tls_proxy(
        proxy, [fresh_etcd.endpoint], (*server_args(pki), "--tls-max-version=TLS1.2"), credentials(pki, pki.client)
    )
    assert _handshake(only12.port, pki, pki.client) == "TLSv1.2"
    stubs = secure_stubs(only12.endpoint, credentials(pki, pki.client))
    try:
        stubs.kv.Put(rpc_pb2.PutRequest(key=b"tls12", value=b"ok"), timeout=10)
        assert stubs.kv.Range(rpc_pb2.RangeRequest(key=b"tls12"), timeout=10).kvs[0].value == b"ok"
    finally:
        stubs.close()


def test_client_crl_file_refuses_revoked_certificates(
    pki: PKI, fresh_etcd: EtcdServer, proxy: ProxyLauncher, tmp_path: Path
) -> None:
    revoked = x509.load_pem_x509_certificate(pki.client.cert.read_bytes())
    now = datetime.datetime.now(datetime.UTC)
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(pki.ca.cert.subject)
        .last_update(now - datetime.timedelta(minutes=5))
        .next_update(now + datetime.timedelta(days=1))
        .add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(revoked.serial_number).revocation_date(now).build()
        )
        .sign(pki.ca.key, hashes.SHA256())
    )
    crl_path = tmp_path / "revoked.crl"
    crl_path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    p = start_tls_proxy(
        proxy,
        [fresh_etcd.endpoint],
        (*server_args(pki), f"--client-crl-file={crl_path}"),
        credentials(pki, pki.proxy_client),
    )
    assert _handshake(p.port, pki, pki.proxy_client) == "TLSv1.3"  # not revoked
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _handshake(p.port, pki, pki.client)
    revoked_stubs = secure_stubs(p.endpoint, credentials(pki, pki.client))
    try:
        with pytest.raises(grpc.RpcError) as exc:
            revoked_stubs.kv.Range(rpc_pb2.RangeRequest(key=b"x"), timeout=5)
        assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        revoked_stubs.close()
