"""TLS for both sides of the proxy: file checks, gRPC credentials, ssl contexts, --auto-tls.

* Upstream (proxy -> etcd): ``--cacert/--cert/--key`` and ``https://`` endpoints give a
  ``ssl.SSLContext`` for the hub's own HTTP/2 client. The client certificate must have an empty subject CN (etcd
  would take the CN as the user of every proxied request); the check and its message are Go's.
  Unlike Go, ``--cacert`` alone works (the Go proxy refuses to start).
* Downstream (clients -> proxy): ``--cert-file/--key-file[/--trusted-ca-file]`` or
  ``--auto-tls`` give an ``ssl.SSLContext`` for our own transport (ALPN h2 and http/1.1); a trusted CA makes
  client certificates required; ``--tls-min-version/--tls-max-version`` bound the versions and
  ``--client-crl-file`` refuses revoked client certificates (checked on the leaf, like Go's tlsutil).
* Cipher suites: Go names are mapped to OpenSSL names (TLS 1.2 suites; TLS 1.3 suites are fixed, as in
  Go); unknown ones are refused with Go's message, and weak suites (RC4, 3DES, CBC-SHA256) are refused by name.

Upstream, the hub's own HTTP/2 client (etcdproxy.h2.aio) uses ``upstream_ssl_context``: --cacert (or the
system roots), the client certificate, ALPN h2, and ``--insecure-skip-tls-verify`` (no verification, as Go).

Everything here that reads files runs in the supervisor before any fork, so a bad file is an exit 1
at start-up, not a crash loop of children.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from etcdproxy.config import Config, go_quote

if TYPE_CHECKING:
    from cryptography import x509

AUTO_TLS_SUBDIR = os.path.join("fixtures", "proxy")

# Go cipher-suite names (crypto/tls CipherSuites() + InsecureCipherSuites(), and the short
# CHACHA20 aliases etcd's tlsutil also knows) -> OpenSSL name, or None for weak suites (RC4, 3DES, CBC with
# SHA-256), refused by name rather than silently dropped.
GO_CIPHER_SUITES: dict[str, str | None] = {
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
    "TLS_RSA_WITH_RC4_128_SHA": None,
    "TLS_RSA_WITH_3DES_EDE_CBC_SHA": None,
    "TLS_RSA_WITH_AES_128_CBC_SHA256": None,
    "TLS_ECDHE_ECDSA_WITH_RC4_128_SHA": None,
    "TLS_ECDHE_RSA_WITH_RC4_128_SHA": None,
    "TLS_ECDHE_RSA_WITH_3DES_EDE_CBC_SHA": None,
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256": None,
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256": None,
}
# TLS 1.3 suites: Go accepts the names but never restricts TLS 1.3 with them; neither do we.
GO_TLS13_SUITES = frozenset({"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"})


class TLSConfigError(ValueError):
    """A TLS setting the proxy cannot start with; the message is printed as-is, exit 1."""


def openssl_cipher_list(go_names: tuple[str, ...]) -> str:
    """Go cipher-suite names -> the ``GRPC_SSL_CIPHER_SUITES`` value ("" when none are given)."""
    out: list[str] = []
    for name in go_names:
        if name in GO_TLS13_SUITES:
            continue
        if name not in GO_CIPHER_SUITES:
            raise TLSConfigError(f"unexpected TLS cipher suite {go_quote(name)}")
        mapped = GO_CIPHER_SUITES[name]
        if mapped is None:
            raise TLSConfigError(
                f"TLS cipher suite {name} is not available in etcdproxy's TLS library (OpenSSL, as configured); "
                "choose an AES-GCM, CHACHA20 or AES-CBC-SHA suite"
            )
        if mapped not in out:
            out.append(mapped)
    if go_names and not out:
        raise TLSConfigError(
            "--listen-cipher-suites lists only TLS 1.3 suites, which cannot be restricted; "
            "name at least one TLS 1.2 suite (the listener would otherwise refuse every TLS 1.2 client)"
        )
    return ":".join(out)


# --- which side uses TLS ---------------------------------------------------------------------


def upstream_tls(config: Config) -> bool:
    """Go: any of --cacert/--cert/--key/--insecure-skip-tls-verify, or an https:// endpoint."""
    if config.cacert or config.cert or config.key or config.insecure_skip_tls_verify:
        return True
    return any(e.startswith(("https://", "unixs://")) for e in config.endpoints)


def auto_tls_dir(config: Config) -> str:
    return os.path.join(config.data_dir, AUTO_TLS_SUBDIR)


@dataclass(frozen=True, slots=True)
class ServerFiles:
    """The certificate files the listener actually uses (given, or generated by --auto-tls)."""

    cert_file: str
    key_file: str
    trusted_ca_file: str = ""
    auto: bool = False


def server_files(config: Config) -> ServerFiles | None:
    if config.cert_file or config.key_file or config.trusted_ca_file:
        return ServerFiles(config.cert_file, config.key_file, config.trusted_ca_file)
    if config.auto_tls:
        directory = auto_tls_dir(config)
        return ServerFiles(os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem"), auto=True)
    return None


# --- start-up checks (supervisor / CLI, before any fork) ---------------------------------------


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise TLSConfigError(f"open {path}: {exc.strerror.lower() if exc.strerror else exc}") from exc


def _require_cryptography(why: str) -> None:
    """cryptography is needed only for the CN check and --auto-tls; say so at start-up if missing."""
    try:
        import cryptography  # noqa: F401
    except ImportError as exc:
        raise TLSConfigError(f"{why} needs the Python package cryptography (pip install cryptography)") from exc


def _load_cert(path: str) -> x509.Certificate:
    from cryptography import x509

    data = _read(path)
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise TLSConfigError(f"{path}: not a PEM certificate: {exc}") from exc


def common_name(cert: x509.Certificate) -> str:
    from cryptography.x509.oid import NameOID

    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


def check_client_cert_cn(path: str) -> None:
    """Go's rule (client/pkg/transport/listener.go): the proxy's client certificate has no CN."""
    cn = common_name(_load_cert(path))
    if cn:
        raise TLSConfigError(f"cert has non empty Common Name ({cn}): {path}")


def _check_pair(cert_flag: str, cert: str, key_flag: str, key: str) -> None:
    if bool(cert) != bool(key):
        given, missing = (cert_flag, key_flag) if cert else (key_flag, cert_flag)
        raise TLSConfigError(f"{given} needs {missing}")
    if cert:
        try:
            # a password callback, else OpenSSL would prompt on the terminal for an encrypted key
            ssl.create_default_context().load_cert_chain(cert, key, password=lambda: b"")
        except (OSError, ssl.SSLError) as exc:
            raise TLSConfigError(f"cannot load {cert_flag} {cert} with {key_flag} {key}: {exc}") from exc


def _check_ca(flag: str, path: str) -> None:
    _read(path)  # Go's "open <file>: ..." for a missing file
    try:
        ssl.create_default_context().load_verify_locations(cafile=path)
    except ssl.SSLError as exc:
        raise TLSConfigError(f"cannot load {flag} {path}: no PEM certificate in it ({exc})") from exc


def startup_errors(config: Config) -> list[str]:
    """Everything about TLS that would fail later in a child; [] when fine. Reads the files."""
    try:
        _check_upstream(config)
        _check_server(config)
    except TLSConfigError as exc:
        return [str(exc)]
    return []


def _check_upstream(config: Config) -> None:
    if not upstream_tls(config):
        return
    # Failover moves between endpoints with the same credentials: TLS for all of them or for none.
    schemes = {e.partition("://")[0] for e in config.endpoints if "://" in e}
    if {"http", "https"} <= schemes:
        raise TLSConfigError("--endpoints mixes http:// and https:// endpoints; use one scheme for all")
    if config.cacert:
        _check_ca("--cacert", config.cacert)
    if config.cert:
        _require_cryptography("--cert (its Common Name is checked)")
        # Go reads --cert for the CN check whenever TLS is on, so --cacert alone fails there;
        # here the check applies only to a certificate that is actually given.
        check_client_cert_cn(config.cert)
    _check_pair("--cert", config.cert, "--key", config.key)


def _check_server(config: Config) -> None:
    files = server_files(config)
    if files is None:
        return
    if files.auto:
        _require_cryptography("--auto-tls")
    else:
        if not (files.cert_file and files.key_file):
            raise TLSConfigError("a TLS listener needs both --cert-file and --key-file")
        _check_pair("--cert-file", files.cert_file, "--key-file", files.key_file)
        if files.trusted_ca_file:
            _check_ca("--trusted-ca-file", files.trusted_ca_file)
    if config.client_crl_file:
        if files.trusted_ca_file == "" and not files.auto:
            raise TLSConfigError("--client-crl-file needs --trusted-ca-file (client certificates are checked with it)")
        try:
            ssl.create_default_context().load_verify_locations(config.client_crl_file)
        except (OSError, ssl.SSLError) as exc:
            raise TLSConfigError(f"cannot load --client-crl-file {config.client_crl_file}: {exc}") from None
    openssl_cipher_list(config.listen_cipher_suites)


def unused_flag_warnings(config: Config) -> list[str]:
    """Listener TLS settings given without a TLS listener: Go ignores them too; we at least say so."""
    if server_files(config) is not None:
        return []
    unused = [
        flag
        for flag, given in (
            ("--listen-cipher-suites", bool(config.listen_cipher_suites)),
            ("--tls-min-version", config.tls_min_version != "TLS1.2"),
            ("--tls-max-version", config.tls_max_version != ""),
        )
        if given
    ]
    if not unused:
        return []
    return [f"{', '.join(unused)} set but the listener is not TLS (no --cert-file/--key-file/--auto-tls): no effect"]


# --- --auto-tls ------------------------------------------------------------------------------


def ensure_self_signed(config: Config) -> ServerFiles | None:
    """Create the --auto-tls certificate once (reused if both files exist, like Go's SelfCert).

    Called by the supervisor before forking, so every worker serves the same certificate.
    """
    files = server_files(config)
    if files is None or not files.auto:
        return files
    if os.path.exists(files.cert_file) and os.path.exists(files.key_file):
        return files
    os.makedirs(os.path.dirname(files.cert_file), mode=0o700, exist_ok=True)
    cert_pem, key_pem = self_signed_pem(_listen_host(config.listen_addr), config.self_signed_cert_validity)
    fd = os.open(files.key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem)
    with open(files.cert_file, "wb") as f:
        f.write(cert_pem)
    return files


def _listen_host(listen_addr: str) -> str:
    return urlsplit("https://" + listen_addr).hostname or ""


def self_signed_pem(host: str, validity_years: int) -> tuple[bytes, bytes]:
    """An ECDSA P-256 server certificate for ``host`` (IP or DNS SAN), Organization "etcd" like Go."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "etcd")])
    sans: list[x509.GeneralName] = []
    try:
        sans.append(x509.IPAddress(ipaddress.ip_address(host)))
    except ValueError:
        if host:
            sans.append(x509.DNSName(host))
    # 0.0.0.0 / :: listen on every address: also cover loopback clients.
    if host in ("", "0.0.0.0", "::"):
        sans += [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    # Year arithmetic on days keeps huge validities from overflowing datetime.
    days = min(validity_years * 365, (datetime.datetime(9999, 1, 1, tzinfo=datetime.UTC) - now).days)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_encipherment=True,
                content_commitment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


# --- credentials and contexts (children, after fork) -------------------------------------------


def upstream_ssl_context(config: Config) -> ssl.SSLContext:
    """The hub's TLS to etcd: --cacert as roots (the system's without it), the client certificate of
    --cert/--key, and --insecure-skip-tls-verify (no verification at all, as Go's InsecureSkipVerify)."""
    ctx = ssl.create_default_context(cafile=config.cacert or None)
    if config.cert and config.key:
        ctx.load_cert_chain(config.cert, config.key)
    if config.insecure_skip_tls_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def self_client_ssl_context(files: ServerFiles) -> ssl.SSLContext:
    """/proxy/health's own client over TLS (Go: server cert as client cert, trusted CA as roots; auto-TLS:
    the self-signed certificate pinned as the only root)."""
    if files.auto:
        return ssl.create_default_context(cafile=files.cert_file)
    ctx = ssl.create_default_context(cafile=files.trusted_ca_file or None)
    ctx.load_cert_chain(files.cert_file, files.key_file)
    return ctx


def server_ssl_context(config: Config, files: ServerFiles) -> ssl.SSLContext:
    """The --metrics-addr https listener: same files, versions and cipher suites as the gRPC one."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if config.tls_min_version == "TLS1.3" else ssl.TLSVersion.TLSv1_2
    if config.tls_max_version == "TLS1.2":
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(files.cert_file, files.key_file)
    if files.trusted_ca_file:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(files.trusted_ca_file)
    ciphers = openssl_cipher_list(config.listen_cipher_suites)
    if ciphers:
        ctx.set_ciphers(ciphers)
    return ctx


def grpc_server_ssl_context(config: Config, files: ServerFiles) -> ssl.SSLContext:
    """The client-facing gRPC listener (our own transport): ALPN h2 (and http/1.1 for /health and /metrics),
    TLS version bounds, cipher suites, client certificates and --client-crl-file, all from the standard ssl module."""
    ctx = server_ssl_context(config, files)
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    if config.client_crl_file:
        ctx.load_verify_locations(config.client_crl_file)
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return ctx


def upstream_http_context(config: Config) -> ssl.SSLContext:
    """The hub's fetch of etcd's /metrics over https: --cacert as roots (Go ignores it unless all three
    files are given, then fails against a private CA), client certificate when --cert/--key are set."""
    ctx = ssl.create_default_context(cafile=config.cacert or None)
    if config.cert and config.key:
        ctx.load_cert_chain(config.cert, config.key)
    return ctx
