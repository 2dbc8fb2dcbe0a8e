"""Certificates and SuperNode keys: a chain that verifies, the right names, usable keys."""

from __future__ import annotations

import socket
import ssl
import stat
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.supercore.primitives.asymmetric import uses_nist_ec_curve

from fedsplit.deploy.certs import (
    CertificateError,
    CertPaths,
    make_certificates,
    make_node_key,
    server_sans,
)


def _handshake(paths: CertPaths, server_hostname: str) -> None:
    """A TLS handshake over a socket pair: server cert vs. a client trusting the CA."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(paths.server_cert, paths.server_key)
    client_ctx = ssl.create_default_context(cafile=str(paths.ca_cert))
    a, b = socket.socketpair()
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(a, server_side=True) as s:
                s.recv(1)
        except (ssl.SSLError, OSError) as exc:
            errors.append(exc)

    t = threading.Thread(target=serve)
    t.start()
    try:
        with client_ctx.wrap_socket(b, server_hostname=server_hostname) as c:
            c.sendall(b"x")
    finally:
        t.join(5)


def test_chain_names_and_permissions(tmp_path):
    paths = make_certificates(tmp_path, ["192.168.1.20", "link.lan"])
    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    assert set(server_sans(paths.server_cert)) == {"127.0.0.1", "192.168.1.20", "localhost",
                                                   "link.lan"}
    for key in (paths.ca_key, paths.server_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    for name in ("127.0.0.1", "localhost", "link.lan"):
        _handshake(paths, name)
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(paths, "other.lan")  # not in the certificate


def test_ca_is_kept_and_server_cert_reissued(tmp_path):
    first = make_certificates(tmp_path)
    ca_before = first.ca_cert.read_bytes()
    second = make_certificates(tmp_path, ["10.77.0.1"])
    assert second.ca_cert.read_bytes() == ca_before  # devices keep trusting it
    assert "10.77.0.1" in server_sans(second.server_cert)
    _handshake(second, "10.77.0.1")


def test_bad_name_is_rejected(tmp_path):
    with pytest.raises(CertificateError, match="without port"):
        make_certificates(tmp_path, ["10.0.0.1:8000"])


def test_node_key_is_what_flower_loads(tmp_path):
    key = make_node_key(tmp_path / "keys" / "pi1")
    private = serialization.load_ssh_private_key(key.private.read_bytes(), None)
    public = serialization.load_ssh_public_key(key.public.read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert isinstance(public, ec.EllipticCurvePublicKey) and uses_nist_ec_curve(public)
    assert private.public_key().public_numbers() == public.public_numbers()
    assert stat.S_IMODE(key.private.stat().st_mode) == 0o600
    again = make_node_key(tmp_path / "keys" / "pi1")  # existing keys are kept
    assert again.private.read_bytes() == key.private.read_bytes()
