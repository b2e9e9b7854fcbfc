"""Helpers for the interop tests (issue 11): real clients (grpcio, etcdctl, the Go grpc-proxy, h2load, nghttp,
curl, etcd3aio) against a real proxy, in plaintext (h2c) and over TLS.

* ``Pki``: a CA, the proxy's serving certificate and an empty-CN client certificate (the Go proxy refuses a
  client certificate with a Common Name as its upstream identity), made here with ``cryptography``.
* ``Endpoint``: where a client goes (``host:port``, TLS or not) and how each tool is told so.
* ``start_interop_proxy``: ``tests.helpers.start_proxy`` for either implementation, with the TLS listener flags
  and a readiness probe that speaks TLS; registered with a ``ProxyLauncher`` so it is stopped by pid.
* gRPC framing for the tools that send raw HTTP/2 bodies (the 5-byte length prefix of PROTOCOL-HTTP2).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import queue
import struct
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from google.protobuf.message import Message

from tests.conftest import ProxyLauncher
from tests.helpers import (
    LOCALHOST,
    READY_LINE,
    ROOT,
    ProxyProcess,
    find_binary,
    free_port,
    proxy_command,
    proxy_impl,
    wait_until,
)

# --------------------------------------------------------------------------- certificates


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    ca: Path
    server: Pair  # the proxy's (and the Go proxy's) serving certificate: 127.0.0.1 and localhost
    client: Pair  # empty CN: usable as a proxy's upstream client identity


def _name(cn: str) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "etcdproxy interop tests")]
    if cn:
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    return x509.Name(attrs)


def make_pki(directory: Path) -> Pki:
    """A CA and two leaves (P-256 keys: quick to make, and every client here speaks ECDSA)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("interop-ca"))
        .issuer_name(_name("interop-ca"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    ca_path = directory / "interop-ca.pem"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))

    def leaf(name: str, cn: str) -> Pair:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.IPAddress(ipaddress.ip_address(LOCALHOST)), x509.DNSName("localhost")]
                ),
                critical=False,
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        pair = Pair(directory / f"{name}.crt", directory / f"{name}.key")
        pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        pair.key.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return pair

    return Pki(ca=ca_path, server=leaf("server", "proxy"), client=leaf("client", ""))


# --------------------------------------------------------------------------- endpoints


@dataclass(frozen=True)
class Endpoint:
    """A gRPC endpoint as each client is told about it; ``pki`` set means TLS (server-auth only)."""

    address: str  # host:port
    pki: Pki | None = None

    @property
    def tls(self) -> bool:
        return self.pki is not None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.address}"

    def credentials(self) -> grpc.ChannelCredentials:
        assert self.pki is not None
        # the client certificate too: ignored by a listener without --trusted-ca-file, required by one with it
        return grpc.ssl_channel_credentials(
            root_certificates=self.pki.ca.read_bytes(),
            private_key=self.pki.client.key.read_bytes(),
            certificate_chain=self.pki.client.cert.read_bytes(),
        )

    def channel(self, options: Sequence[tuple[str, int | str]] = ()) -> grpc.Channel:
        if self.pki is None:
            return grpc.insecure_channel(self.address, options=options)
        return grpc.secure_channel(self.address, self.credentials(), options=options)

    def aio_channel(self, options: Sequence[tuple[str, int | str]] = ()) -> grpc.aio.Channel:
        if self.pki is None:
            return grpc.aio.insecure_channel(self.address, options=options)
        return grpc.aio.secure_channel(self.address, self.credentials(), options=options)

    def etcdctl_flags(self) -> list[str]:
        flags = [f"--endpoints={self.url}", "--dial-timeout=5s", "--command-timeout=15s"]
        if self.pki is not None:
            flags.append(f"--cacert={self.pki.ca}")
        return flags

    def curl_flags(self) -> list[str]:
        """HTTP/2 without upgrade: prior knowledge in plaintext, ALPN h2 over TLS (curl verifies the CA)."""
        if self.pki is None:
            return ["--http2-prior-knowledge"]
        return ["--http2", "--cacert", str(self.pki.ca)]


def server_tls_args(pki: Pki) -> tuple[str, ...]:
    """The listener's flags, the same for etcdproxy and the Go proxy."""
    return (f"--cert-file={pki.server.cert}", f"--key-file={pki.server.key}")


def upstream_tls_args(pki: Pki) -> tuple[str, ...]:
    """A proxy's flags to reach a TLS upstream (the Go proxy cannot start with --cacert alone)."""
    return (f"--cacert={pki.ca}", f"--cert={pki.client.cert}", f"--key={pki.client.key}")


def start_interop_proxy(
    launcher: ProxyLauncher,
    endpoints: Sequence[str],
    *,
    impl: str | None = None,
    tls: Pki | None = None,
    extra_args: Sequence[str] = (),
    timeout: float = 30,
) -> tuple[ProxyProcess, Endpoint]:
    """A proxy (``--workers 2`` for etcdproxy) in front of ``endpoints``, TLS on its listener if ``tls``.

    Like ``tests.helpers.start_proxy`` (ready line, then a gRPC connection that becomes ready), with a probe
    that speaks TLS when the listener does; stopped by pid with the launcher's other proxies.
    """
    impl = impl or proxy_impl()
    port = free_port()
    args = proxy_command(impl, endpoints, port, workers=2, advertise_client_url="", extra_args=extra_args)
    if tls is not None:
        args += list(server_tls_args(tls))
    log_path = launcher.log_dir / f"proxy-{impl}-{'tls' if tls else 'h2c'}-{port}.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    with log_path.open("ab") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=ROOT)
    proxy = ProxyProcess(impl=impl, port=port, log_path=log_path, args=args, proc=proc)
    launcher.started.append(proxy)
    wait_until(lambda: not proxy.alive() or READY_LINE in log_path.read_text(errors="replace"), timeout, "proxy start")
    assert proxy.alive(), f"proxy exited during start-up: {' '.join(args)}\n{proxy.log_tail()}"
    endpoint = Endpoint(proxy.endpoint, tls)
    with endpoint.channel() as ch:
        grpc.channel_ready_future(ch).result(timeout=timeout)
    proxy.note_children()
    return proxy, endpoint


# --------------------------------------------------------------------------- raw gRPC framing


def grpc_frame(message: Message | bytes) -> bytes:
    """One length-prefixed message, uncompressed."""
    body = message if isinstance(message, bytes) else message.SerializeToString()
    return b"\x00" + struct.pack(">I", len(body)) + body


def grpc_unframe(data: bytes) -> list[bytes]:
    """The messages of a response body; fails on a compressed flag or a truncated frame."""
    out = []
    while data:
        assert len(data) >= 5, f"truncated gRPC frame header: {data!r}"
        flag, size = data[0], struct.unpack(">I", data[1:5])[0]
        assert flag == 0, f"compressed message (flag {flag}) though we sent no grpc-accept-encoding"
        assert len(data) >= 5 + size, f"truncated gRPC message: {size} announced, {len(data) - 5} present"
        out.append(data[5 : 5 + size])
        data = data[5 + size :]
    return out


# --------------------------------------------------------------------------- tools


def run_tool(
    argv: Sequence[str], *, timeout: float = 60, cwd: Path | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run a command-line client to completion (bytes out: bodies are binary)."""
    return subprocess.run(
        list(argv), capture_output=True, timeout=timeout, cwd=cwd, stdin=subprocess.DEVNULL, check=False
    )


def etcdctl_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETCDCTL_")}
    env["ETCDCTL_API"] = "3"
    return env


def etcdctl(endpoint: Endpoint, *args: str, stdin: str | None = None, timeout: float = 30) -> str:
    """etcdctl's stdout; fails the test with its stderr when it exits non-zero."""
    result = etcdctl_run(endpoint, *args, stdin=stdin, timeout=timeout)
    assert result.returncode == 0, f"etcdctl {' '.join(args)} via {endpoint.url} failed: {result.stderr}"
    return result.stdout


def etcdctl_run(
    endpoint: Endpoint, *args: str, stdin: str | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [find_binary("etcdctl"), *endpoint.etcdctl_flags(), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=etcdctl_env(),
        stdin=None if stdin is not None else subprocess.DEVNULL,
        check=False,
    )


def etcdctl_start(endpoint: Endpoint, *args: str) -> subprocess.Popen[str]:
    """A long-running etcdctl (watch); the caller stops it with ``stop_process``."""
    return subprocess.Popen(
        [find_binary("etcdctl"), *endpoint.etcdctl_flags(), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=etcdctl_env(),
    )


class Lines:
    """The stdout lines of a running process, collected by a thread (a watch prints as events come)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.queue: queue.Queue[str] = queue.Queue()
        self.eof = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.queue.put(line.rstrip("\n"))
        self.eof.set()

    def take(self, n: int, timeout: float = 20) -> list[str]:
        """The next ``n`` lines; fails at ``timeout``, or at once when the process closed its stdout."""
        deadline = time.monotonic() + timeout
        got: list[str] = []
        while len(got) < n:
            try:
                got.append(self.queue.get(timeout=0.1))
                continue
            except queue.Empty:
                pass
            if (self.eof.is_set() and self.queue.empty()) or time.monotonic() > deadline:
                stderr = ""
                if self.proc.stderr is not None and self.proc.poll() is not None:
                    stderr = self.proc.stderr.read()
                raise AssertionError(f"expected {n} lines, got {got} (exit {self.proc.poll()}) {stderr}")
        return got
