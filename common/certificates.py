"""TLS certificates and SuperNode keys for a deployment, made with ``cryptography``.

``<out>/`` receives

- ``ca.crt`` / ``ca.key``: a certificate authority (EC P-384, self-signed);
  every SuperNode gets ``ca.crt`` (``--root-certificates``) to check the
  SuperLink, and ``flwr`` gets it in the connection entry;
- ``server.pem`` / ``server.key``: the SuperLink's certificate, signed by the CA,
  with one subjectAltName per host (an IP address entry for addresses, a DNS
  entry for names) and the serverAuth usage;
- ``sites/site-<k>`` / ``sites/site-<k>.pub``: one EC P-384 key pair per site in
  the OpenSSH format that Flower's SuperNode authentication reads
  (``--auth-supernode-private-key``, ``flwr supernode register``).

Private keys are created with mode 0600 and never overwritten.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.errors import InputError

CURVE = ec.SECP384R1()


def write_certificates(out: Path, hosts: list[str], sites: int, days: int = 365) -> list[Path]:
    """Write the CA, the server certificate for ``hosts`` and ``sites`` key pairs."""
    if not hosts:
        raise InputError("--hosts: expected at least one host name or IP address")
    if sites < 1:
        raise InputError(f"--sites: expected at least 1, got {sites}")
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(CURVE)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedgraphrec CA")])
    ca = (
        _builder(ca_name, ca_name, ca_key.public_key(), now, days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(CURVE)
    server = (
        _builder(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]),
            ca_name,
            server_key.public_key(),
            now,
            days,
        )
        .add_extension(x509.SubjectAlternativeName([_alt_name(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    written = [
        _write(out / "ca.crt", ca.public_bytes(serialization.Encoding.PEM)),
        _write_private(out / "ca.key", _pem(ca_key)),
        _write(out / "server.pem", server.public_bytes(serialization.Encoding.PEM)),
        _write_private(out / "server.key", _pem(server_key)),
    ]
    for site in range(sites):
        key = ec.generate_private_key(CURVE)
        written.append(
            _write_private(
                out / "sites" / f"site-{site}",
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.OpenSSH,
                    serialization.NoEncryption(),
                ),
            )
        )
        written.append(
            _write(
                out / "sites" / f"site-{site}.pub",
                key.public_key().public_bytes(
                    serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
                ),
            )
        )
    return written


def _builder(subject, issuer, public_key, now, days) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
    )


def _key_usage(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not cert_sign,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _alt_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, content: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def _write_private(path: Path, content: bytes) -> Path:
    """Create ``path`` with mode 0600 (refusing to overwrite) and write ``content``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise InputError(f"{path}: exists already; refusing to overwrite a private key") from None
    with os.fdopen(descriptor, "wb") as f:
        f.write(content)
    return path
