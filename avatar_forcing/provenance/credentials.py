"""Signing credentials for C2PA manifests: the operator's certificate, or a local one we create once.

C2PA wants an end-entity certificate (ES256 here) for digital signatures with a signing EKU, issued by a CA
that is not itself: so the local credentials are a small CA and one leaf signed by it. A local CA is trusted
by nobody else; a manifest signed with it is intact and attributable to this machine's key, and validates
as trusted only where that CA is added as a trust anchor (`provenance check --trust CA.pem`).
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from pathlib import Path

from avatar_forcing.errors import UserError

log = logging.getLogger("avatar_forcing.provenance")
# Extended key usages C2PA validators accept for claim signing: e-mail protection and document signing.
SIGNING_EKUS = ("1.3.6.1.5.5.7.3.4", "1.3.6.1.5.5.7.3.36")


@dataclass(frozen=True)
class Credentials:
    chain_pem: bytes  # leaf certificate, then its issuer(s)
    key_pem: bytes  # the leaf's private key (PKCS#8)
    anchor_pem: bytes | None  # the local CA, when we created it (None for an operator's certificate)
    local: bool


def default_folder() -> Path:
    return Path.home() / ".cache" / "avatar-forcing" / "c2pa"


def load_credentials(cert: Path | None, key: Path | None, folder: Path | None = None) -> Credentials:
    """The operator's certificate chain and key (both or neither), else the local ones (created on first use)."""
    if (cert is None) != (key is None):
        raise UserError("give both --c2pa-cert (PEM chain, leaf first) and --c2pa-key (PEM private key), or neither "
                        "to sign with a local certificate")
    if cert is not None and key is not None:
        for path in (cert, key):
            if not path.is_file():
                raise UserError(f"{path} does not exist: give a PEM file")
        return Credentials(cert.read_bytes(), key.read_bytes(), None, local=False)
    return local_credentials(folder or default_folder())


def local_credentials(folder: Path) -> Credentials:
    files = [folder / name for name in ("chain.pem", "key.pem", "ca.pem")]
    if not all(f.is_file() for f in files):
        folder.mkdir(parents=True, exist_ok=True)
        chain, key, ca = _create_local(dt.datetime.now(dt.UTC))
        for f, data in zip(files, (chain, key, ca), strict=True):
            f.write_bytes(data)
        files[1].chmod(0o600)
        log.warning("created a local C2PA signing certificate in %s: manifests are signed but trusted only "
                    "where %s is added as a trust anchor; give --c2pa-cert/--c2pa-key for an operator's own",
                    folder, files[2])
    chain, key, ca = (f.read_bytes() for f in files)
    return Credentials(chain, key, ca, local=True)


def _create_local(now: dt.datetime) -> tuple[bytes, bytes, bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Avatar Forcing local operator"),
                          x509.NameAttribute(NameOID.COMMON_NAME, common)])

    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    start, end = now - dt.timedelta(minutes=5), now + dt.timedelta(days=3650)
    ca_name = name("Avatar Forcing local CA")
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder().subject_name(name("Avatar Forcing generator")).issuer_name(ca.subject)
            .public_key(leaf_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.ObjectIdentifier(oid) for oid in SIGNING_EKUS]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    chain = leaf.public_bytes(pem) + ca.public_bytes(pem)
    key = leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return chain, key, ca.public_bytes(pem)
