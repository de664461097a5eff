"""Certificates for the harness: a self-signed CA and a serving certificate for 127.0.0.1 (webhooks
served off-cluster); certificates and kubeconfigs signed by the control plane's CA (kubelet, kube-proxy)."""

from __future__ import annotations

import datetime
import ipaddress
import warnings
from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class ServingCert:
    ca_pem: bytes
    cert_file: Path
    key_file: Path


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_serving_cert(cert_dir: Path, *, host: str = "127.0.0.1", days: int = 30) -> ServingCert:
    """Write tls.crt/tls.key (what controller-runtime's webhook server reads) signed by a fresh CA."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubemoe-e2e-ca")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]), critical=False
        )
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_dir.mkdir(parents=True, exist_ok=True)
    cert_file, key_file = cert_dir / "tls.crt", cert_dir / "tls.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(_pem_key(key))
    key_file.chmod(0o600)
    return ServingCert(ca_cert.public_bytes(serialization.Encoding.PEM), cert_file, key_file)


def sign_with_ca(
    pki: Path,
    *,
    common_name: str,
    organization: str | None = None,
    client: bool,
    ips: tuple[str, ...] = (),
    dns: tuple[str, ...] = (),
    days: int = 30,
) -> tuple[bytes, bytes]:
    """A certificate (PEM) and its key signed by the CA in `pki` (ca.crt, ca.key: kwokctl's), for
    a client identity (CN = user, O = group) or a server with the given SANs."""
    with warnings.catch_warnings():  # kwokctl's CA has a non-positive serial number
        warnings.simplefilter("ignore")
        ca_cert = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), password=None)
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attrs.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attrs))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if ips or dns:
        sans: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        sans += [x509.DNSName(d) for d in dns]
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = b.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def client_kubeconfig(out: Path, *, server: str, pki: Path, user: str, group: str | None = None) -> Path:
    """A kubeconfig at `out` for `user` (in `group`), its certificate signed by the CA in `pki`;
    the certificate, key and CA files are written beside it."""
    crt, key = sign_with_ca(pki, common_name=user, organization=group, client=True)
    stem = out.with_suffix("")
    files = {
        "crt": stem.with_suffix(".crt"),
        "key": stem.with_suffix(".key"),
        "ca": stem.with_suffix(".ca.crt"),
    }
    files["crt"].write_bytes(crt)
    files["key"].write_bytes(key)
    files["key"].chmod(0o600)
    files["ca"].write_bytes((pki / "ca.crt").read_bytes())
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": server, "certificate-authority": str(files["ca"])}}],
        "users": [
            {"name": "u", "user": {"client-certificate": str(files["crt"]), "client-key": str(files["key"])}}
        ],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "c",
    }
    out.write_text(yaml.safe_dump(config))
    return out
