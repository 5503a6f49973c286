"""Certificates and node keys of one federation.

A deployment folder holds everything one federation needs::

    certs/ca.crt  certs/ca.key             the federation's certificate authority (keep ca.key offline)
    certs/superlink.crt  superlink.key     the SuperLink's TLS certificate (SANs: localhost, 127.0.0.1, ::1, hosts)
    keys/site-K  keys/site-K.pub           site K's EC P-384 node key pair (OpenSSH format)
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path
from typing import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOCAL_NAMES = ("localhost",)
LOCAL_IPS = ("127.0.0.1", "::1")
CERT_DAYS = 365


class Credentials:
    """Paths of one deployment's certificates and node keys under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        certs = self.root / "certs"
        self.ca_cert, self.ca_key = certs / "ca.crt", certs / "ca.key"
        self.server_cert, self.server_key = certs / "superlink.crt", certs / "superlink.key"

    def node_key(self, site: str) -> Path:
        return self.root / "keys" / site

    def node_public_key(self, site: str) -> Path:
        return self.root / "keys" / f"{site}.pub"


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(0o600)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _certificate(subject: str, public_key, issuer: x509.Name | None, signing_key, *, ca: bool,
                 hosts: Sequence[str] = ()) -> x509.Certificate:
    """A certificate for ``subject``; self-signed when ``issuer`` is None (the CA)."""
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "privadapt"),
                      x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = dt.datetime.now(dt.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(name).issuer_name(issuer or name).public_key(public_key)
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=CERT_DAYS))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False))
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False), critical=True)
    else:
        sans: list[x509.GeneralName] = []
        for host in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                sans.append(x509.DNSName(host))
        builder = (builder
                   .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                   .add_extension(
                       x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=True, encipher_only=False, decipher_only=False), critical=True))
    return builder.sign(signing_key, hashes.SHA256())


def make_ca(creds: Credentials, name: str = "privadapt federation CA") -> None:
    """Create the federation's CA (skipped when it exists: re-running keeps issued certificates valid)."""
    if creds.ca_cert.exists() and creds.ca_key.exists():
        return
    key = ec.generate_private_key(ec.SECP384R1())
    cert = _certificate(name, key.public_key(), None, key, ca=True)
    _write_private(creds.ca_key, _pem_key(key))
    creds.ca_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def make_server_cert(creds: Credentials, hosts: Sequence[str] = ()) -> list[str]:
    """Issue the SuperLink's TLS certificate for ``hosts`` plus localhost/127.0.0.1/::1; return the SANs."""
    ca_key = serialization.load_pem_private_key(creds.ca_key.read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(creds.ca_cert.read_bytes())
    names = list(dict.fromkeys([*hosts, *LOCAL_NAMES, *LOCAL_IPS]))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = _certificate(names[0], key.public_key(), ca_cert.subject, ca_key, ca=False, hosts=names)
    _write_private(creds.server_key, _pem_key(key))
    creds.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return names


def make_node_key(creds: Credentials, site: str) -> Path:
    """Create site ``site``'s EC P-384 key pair in OpenSSH format (kept when it exists); return the public key."""
    private, public = creds.node_key(site), creds.node_public_key(site)
    if not (private.exists() and public.exists()):
        key = ec.generate_private_key(ec.SECP384R1())
        _write_private(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                  serialization.NoEncryption()))
        public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                         serialization.PublicFormat.OpenSSH) + f" {site}\n".encode())
    return public


def make_credentials(root: Path, sites: Sequence[str], hosts: Sequence[str] = ()) -> Credentials:
    """CA (kept if present), a fresh SuperLink certificate, and a key pair per site (kept if present)."""
    creds = Credentials(Path(root).resolve())
    make_ca(creds)
    make_server_cert(creds, hosts)
    for site in sites:
        make_node_key(creds, site)
    return creds
