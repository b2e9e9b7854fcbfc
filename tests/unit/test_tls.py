"""Pure TLS helpers (etcdproxy/tls.py): cipher-name mapping, the empty-CN rule, start-up checks, --auto-tls."""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import ssl
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from etcdproxy import tls
from etcdproxy.config import Config, ConfigError, check

# --- cipher suites -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("go_names", "expected"),
    [
        ((), ""),
        (("TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",), "ECDHE-RSA-AES128-GCM-SHA256"),
        (
            ("TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384", "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256"),
            "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-CHACHA20-POLY1305",
        ),
        # the short Go alias maps to the same suite, listed once
        (
            ("TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305", "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256"),
            "ECDHE-RSA-CHACHA20-POLY1305",
        ),
        # TLS 1.3 names are accepted and dropped: neither Go nor grpc restricts TLS 1.3 suites
        (("TLS_AES_128_GCM_SHA256", "TLS_RSA_WITH_AES_128_CBC_SHA"), "AES128-SHA"),
    ],
)
def test_openssl_cipher_list(go_names: tuple[str, ...], expected: str) -> None:
    assert tls.openssl_cipher_list(go_names) == expected


def test_every_mapped_name_is_known_to_openssl() -> None:
    """Python's OpenSSL knows every name we hand to grpc's BoringSSL (both use OpenSSL spellings)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    for go_name, openssl_name in tls.GO_CIPHER_SUITES.items():
        if openssl_name is not None:
            ctx.set_ciphers(openssl_name + ":@SECLEVEL=0")  # raises SSLError for an unknown name
            assert openssl_name in {c["name"] for c in ctx.get_ciphers()}, go_name


@pytest.mark.parametrize(
    ("go_names", "message"),
    [
        (("BOGUS",), 'unexpected TLS cipher suite "BOGUS"'),
        (("tls_ecdhe_rsa_with_aes_128_gcm_sha256",), "unexpected TLS cipher suite"),  # Go is case-sensitive
        (("TLS_ECDHE_RSA_WITH_RC4_128_SHA",), "not available in etcdproxy's TLS library"),
        (("TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256",), "not available in etcdproxy's TLS library"),
        (("TLS_AES_128_GCM_SHA256",), "only TLS 1.3 suites"),
    ],
)
def test_openssl_cipher_list_refusals(go_names: tuple[str, ...], message: str) -> None:
    with pytest.raises(tls.TLSConfigError, match=message):
        tls.openssl_cipher_list(go_names)


# --- certificates made here ----------------------------------------------------------------------


def _write_cert(directory: Path, name: str, cn: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "t")]
    if cn:
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    subject = x509.Name(attrs)
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def test_empty_cn_rule(tmp_path: Path) -> None:
    empty, _ = _write_cert(tmp_path, "empty", "")
    named, _ = _write_cert(tmp_path, "named", "etcd-user")
    tls.check_client_cert_cn(str(empty))
    with pytest.raises(tls.TLSConfigError) as exc:
        tls.check_client_cert_cn(str(named))
    assert str(exc.value) == f"cert has non empty Common Name (etcd-user): {named}"


def test_startup_errors(tmp_path: Path) -> None:
    cert, key = _write_cert(tmp_path, "c", "")
    other_cert, _ = _write_cert(tmp_path, "o", "")
    ok = Config(endpoints=("https://127.0.0.1:2379",), cacert=str(cert), cert=str(cert), key=str(key))
    assert tls.startup_errors(ok) == []
    assert tls.startup_errors(Config(cacert=str(cert))) == []  # --cacert alone: fine here (not in Go)
    cases = {
        "--cert needs --key": dataclasses.replace(ok, key=""),
        "--key needs --cert": dataclasses.replace(ok, cert=""),
        "cannot load --cert": dataclasses.replace(ok, key=str(other_cert)),
        "open /nonexistent/ca.pem: no such file or directory": dataclasses.replace(ok, cacert="/nonexistent/ca.pem"),
        "cannot load --cacert": dataclasses.replace(ok, cacert=str(key)),
        "mixes http:// and https://": dataclasses.replace(ok, endpoints=("http://a:1", "https://b:2")),
        "needs both --cert-file and --key-file": Config(trusted_ca_file=str(cert)),
        "cannot load --client-crl-file": Config(
            cert_file=str(cert), key_file=str(key), trusted_ca_file=str(cert), client_crl_file="/nonexistent.crl"
        ),
        "unexpected TLS cipher suite": Config(auto_tls=True, listen_cipher_suites=("X",)),
    }
    for fragment, config in cases.items():
        errors = tls.startup_errors(config)
        assert len(errors) == 1 and fragment in errors[0], (fragment, errors)
    # an encrypted key is refused (Go cannot use one either), without a password prompt
    encrypted = tmp_path / "enc.key"
    private = serialization.load_pem_private_key(key.read_bytes(), None)
    encrypted.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    (error,) = tls.startup_errors(dataclasses.replace(ok, key=str(encrypted)))
    assert error.startswith("cannot load --cert")
    # version bounds only matter to a TLS listener (Go ignores them without one too); with one they are applied
    assert tls.startup_errors(Config(tls_min_version="TLS1.3")) == []
    assert tls.startup_errors(Config(cert_file=str(cert), key_file=str(key), tls_max_version="TLS1.2")) == []


def test_check_runs_the_tls_checks_last(tmp_path: Path) -> None:
    named, key = _write_cert(tmp_path, "named", "root")
    with pytest.raises(ConfigError) as exc:
        check(Config(cacert=str(named), cert=str(named), key=str(key)), tls.startup_errors)
    assert exc.value.messages == [f"cert has non empty Common Name (root): {named}"]
    with pytest.raises(ConfigError) as exc:  # Go's own validation wins
        check(Config(cert=str(named), key=str(key), resolver_ttl_s=3), tls.startup_errors)
    assert exc.value.messages == ['invalid resolver-prefix ""']


def test_unused_listener_flags_are_reported() -> None:
    assert tls.unused_flag_warnings(Config()) == []
    (warning,) = tls.unused_flag_warnings(Config(tls_min_version="TLS1.3", listen_cipher_suites=("X",)))
    assert warning.startswith("--listen-cipher-suites, --tls-min-version set but the listener is not TLS")
    assert tls.unused_flag_warnings(Config(auto_tls=True, tls_max_version="TLS1.3")) == []


def test_cryptography_is_needed_only_for_the_cn_check_and_auto_tls(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    ca, _ = _write_cert(tmp_path, "ca", "ca")
    monkeypatch.setitem(sys.modules, "cryptography", None)  # import fails as if not installed
    assert tls.startup_errors(Config()) == []
    assert tls.startup_errors(Config(cacert=str(ca))) == []
    (error,) = tls.startup_errors(Config(auto_tls=True))
    assert error == "--auto-tls needs the Python package cryptography (pip install cryptography)"
    (error,) = tls.startup_errors(Config(cert="c.pem", key="k.pem"))
    assert "needs the Python package cryptography" in error


def test_which_side_uses_tls() -> None:
    assert not tls.upstream_tls(Config())
    assert tls.upstream_tls(Config(endpoints=("https://e:2379",)))
    assert tls.upstream_tls(Config(cacert="x"))
    assert tls.server_files(Config()) is None
    files = tls.server_files(Config(auto_tls=True, data_dir="/d"))
    assert files == tls.ServerFiles("/d/fixtures/proxy/cert.pem", "/d/fixtures/proxy/key.pem", auto=True)
    # files given win over --auto-tls, as in Go
    assert tls.server_files(Config(auto_tls=True, cert_file="c", key_file="k")) == tls.ServerFiles("c", "k")


# --- --auto-tls ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("listen_addr", "ips", "dns"),
    [
        ("127.0.0.1:23790", ["127.0.0.1"], []),
        ("proxy.example:23790", [], ["proxy.example"]),
        ("0.0.0.0:23790", ["0.0.0.0", "127.0.0.1"], ["localhost"]),
    ],
)
def test_ensure_self_signed(tmp_path: Path, listen_addr: str, ips: list[str], dns: list[str]) -> None:
    config = Config(auto_tls=True, data_dir=str(tmp_path), listen_addr=listen_addr, self_signed_cert_validity=3)
    files = tls.ensure_self_signed(config)
    assert files is not None and files.auto
    cert = x509.load_pem_x509_certificate(Path(files.cert_file).read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address(ip) for ip in ips]
    assert san.get_values_for_type(x509.DNSName) == dns
    assert tls.common_name(cert) == ""
    days = (cert.not_valid_after_utc - cert.not_valid_before_utc).days
    assert 3 * 365 <= days <= 3 * 365 + 1
    assert Path(files.key_file).stat().st_mode & 0o077 == 0
    ssl.create_default_context().load_cert_chain(files.cert_file, files.key_file)  # a matching pair
    # made once: a second start (or a respawn) reuses it
    before = Path(files.cert_file).read_bytes()
    assert tls.ensure_self_signed(config) == files
    assert Path(files.cert_file).read_bytes() == before


def test_huge_validity_does_not_overflow() -> None:
    cert_pem, _ = tls.self_signed_pem("127.0.0.1", 2**64 - 1)
    cert = x509.load_pem_x509_certificate(cert_pem)
    assert cert.not_valid_after_utc.year == 9998 or cert.not_valid_after_utc.year == 9999
