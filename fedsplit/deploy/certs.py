"""Certificates and SuperNode keys for a TLS deployment, made with ``cryptography``.

One private CA signs one server certificate. The SuperLink serves its one HTTPS port
with it, and the ServerApp's split channel serves gRPC with the *same* certificate, so
a device needs a single file (``ca.crt``) to verify both. SuperNode authentication
uses a separate key pair per device: an ECDSA P-384 key in OpenSSH format, the format
``flower-supernode --auth-supernode-private-key`` loads and ``flwr supernode register``
expects for the public half.

Layout written by :func:`make_certificates` under a deployment folder::

    certs/ca.crt  certs/ca.key          the CA (keep ca.key off the devices)
    certs/server.pem  certs/server.key  SuperLink + split channel certificate
    keys/<node>  keys/<node>.pub        one SuperNode key pair per node

Every name the server is reached by must be in the certificate's subject alternative
names (``--san``): ``localhost`` and ``127.0.0.1`` are always included, because the
SuperLink's own ServerApp runtime dials it on loopback.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ALWAYS_SANS = ("localhost", "127.0.0.1")
CA_DAYS = 3650
SERVER_DAYS = 825  # the longest server certificate lifetime clients commonly accept


class CertificateError(ValueError):
    """Certificates or keys could not be made or read as asked."""


@dataclass(frozen=True)
class CertPaths:
    """Where the certificates of one deployment live."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def under(cls, folder: str | os.PathLike) -> CertPaths:
        base = Path(folder) / "certs"
        return cls(base / "ca.crt", base / "ca.key", base / "server.pem", base / "server.key")

    def exist(self) -> bool:
        return all(p.is_file() for p in (self.ca_cert, self.ca_key, self.server_cert,
                                         self.server_key))


@dataclass(frozen=True)
class NodeKey:
    """One SuperNode's key pair (OpenSSH format)."""

    name: str
    private: Path
    public: Path


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Private keys are created 0600 from the start (not chmod-ed after being readable).
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san_entries(names: Iterable[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    seen: set[str] = set()
    for name in [*ALWAYS_SANS, *names]:
        name = name.strip()
        if not name or name in seen:
            continue
        seen.add(name)
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            if any(c in name for c in " /:"):
                raise CertificateError(
                    f"subject alternative name {name!r} is neither an IP address nor a DNS "
                    "name; pass the host only (e.g. --san 192.168.1.20 --san link.lan), "
                    "without port or scheme") from None
            out.append(x509.DNSName(name))
    return out


def make_ca(common_name: str = "fedsplit deployment CA",
            days: int = CA_DAYS) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed CA certificate and its key (ECDSA P-256)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        # Back-date a little: a device whose clock lags must still accept it.
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def make_server_cert(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
                     sans: Iterable[str] = (), common_name: str = "fedsplit superlink",
                     days: int = SERVER_DAYS,
                     ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A server certificate signed by the CA, valid for ``localhost``, ``127.0.0.1``
    and every name in ``sans`` (IP addresses or DNS names)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(_san_entries(sans)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        # Python's strict X.509 verification wants the issuer's key identifier.
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def make_certificates(folder: str | os.PathLike, sans: Iterable[str] = (),
                      overwrite: bool = False) -> CertPaths:
    """Write a CA and a server certificate under ``folder/certs`` (see module doc).

    An existing CA is reused (devices already trust it) unless ``overwrite``; the server
    certificate is re-issued so that new ``sans`` take effect.
    """
    paths = CertPaths.under(folder)
    if paths.ca_cert.is_file() and paths.ca_key.is_file() and not overwrite:
        ca_cert = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
        ca_key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), None)
        if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
            raise CertificateError(f"{paths.ca_key} is not an EC private key; delete "
                                   f"{paths.ca_cert.parent} (or pass --overwrite) to make a new CA")
    else:
        ca_cert, ca_key = make_ca()
        _write(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
        _write(paths.ca_key, _pem_key(ca_key), private=True)
    cert, key = make_server_cert(ca_cert, ca_key, sans)
    _write(paths.server_cert, cert.public_bytes(serialization.Encoding.PEM))
    _write(paths.server_key, _pem_key(key), private=True)
    return paths


def make_node_key(path: str | os.PathLike, overwrite: bool = False) -> NodeKey:
    """An ECDSA P-384 SuperNode key pair: ``path`` (private) and ``path.pub`` (public),
    both OpenSSH format (what ``ssh-keygen -t ecdsa -b 384 -N ''`` makes)."""
    private = Path(path)
    public = private.with_name(private.name + ".pub")
    if private.is_file() and public.is_file() and not overwrite:
        return NodeKey(private.name, private, public)
    key = ec.generate_private_key(ec.SECP384R1())
    _write(private, key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.OpenSSH,
                                      serialization.NoEncryption()), private=True)
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                        serialization.PublicFormat.OpenSSH)
    _write(public, pub + f" fedsplit-{private.name}\n".encode())
    return NodeKey(private.name, private, public)


def server_sans(cert_path: str | os.PathLike) -> list[str]:
    """The subject alternative names of a certificate (IPs and DNS names, as text)."""
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(v) for v in san.get_values_for_type(x509.IPAddress)] + \
        san.get_values_for_type(x509.DNSName)
