#!/usr/bin/env python3
"""Throwaway certificates for trying mutual TLS locally (docker-compose.mtls.yml, or the Kubernetes
`mtls` overlay on a test cluster): a fresh CA and, signed by it,

    gateway.crt / gateway.key                  the gateway's server certificate (TLS at the API)
    extractor.crt / extractor.key              the extractor's server certificate (mutual TLS)
    index.crt / index.key                      the index's server certificate (mutual TLS)
    index-read.crt / index-read.key            the index followers' server certificate, also shown
                                               to the primary they follow (mutual TLS)
    gateway-client.crt / gateway-client.key    the gateway's client certificate for its backends
    ca.crt                                     the CA certificate everyone verifies against

written to a folder (default build/certs). Server certificates name the compose service
(`gateway`, `extractor`, `index`, `index-read`), the Kubernetes names (`convsearch-gateway`,
`convsearch-extractor`, `convsearch-index-0.convsearch-index`, `convsearch-index`,
`convsearch-index-read`), `localhost` and
127.0.0.1, and may also be used as client certificates: each container's health check presents
its own certificate to its own port. The CA's private key is never written: run the script again
for new certificates (it replaces the folder's files).

Development only. Keys are unencrypted and readable by everyone (mode 0644), so that the
containers' user (uid 10001) can read them through a bind mount. In production use your own CA,
e.g. cert-manager Certificates (deploy/kubernetes/README.md) or your organisation's PKI.

    python scripts/dev_certs.py [--out build/certs] [--days 30]
"""

import argparse
import datetime
import ipaddress
import os
import pathlib
import sys

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ROOT = pathlib.Path(__file__).resolve().parents[1]
LOCAL_NAMES = ("localhost",)
LOCAL_IPS = ("127.0.0.1",)
# Per server certificate: the compose service name first, then the Kubernetes names.
SERVER_NAMES = {
    "gateway": ("gateway", "convsearch-gateway"),
    "extractor": ("extractor", "convsearch-extractor"),
    "index": ("index", "convsearch-index-0.convsearch-index", "convsearch-index"),
    "index-read": ("index-read", "convsearch-index-read"),
}
CLIENT = "gateway-client"


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ConvNet Search (development)"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_usage(ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, key_cert_sign=ca, crl_sign=ca, content_commitment=False,
                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                         encipher_only=False, decipher_only=False)


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem_cert(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def make_ca(days: int):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(_name("convsearch development CA"))
        .issuer_name(_name("convsearch development CA")).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256()))
    return key, certificate


def issue(ca_key, ca_cert: x509.Certificate, common_name: str, dns: tuple[str, ...], ips: tuple[str, ...],
          server: bool, days: int):
    """A leaf certificate: server and client auth for a server (its health check presents it), client
    auth only for the gateway's client certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH] if server else \
        [ExtendedKeyUsageOID.CLIENT_AUTH]
    builder = (
        x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
    names = [x509.DNSName(name) for name in dns] + [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def _write(path: pathlib.Path, data: bytes) -> None:
    # Written aside and renamed into place: a running service watching the file never reads half of it.
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(data)
    os.chmod(temporary, 0o644)  # the containers' user (uid 10001) reads them through a bind mount
    os.replace(temporary, path)


def make_certificates(out: pathlib.Path, days: int = 30) -> dict[str, pathlib.Path]:
    """Writes the CA certificate and every service's certificate and key into `out`; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o755)
    ca_key, ca_cert = make_ca(days)
    written = {"ca.crt": out / "ca.crt"}
    _write(written["ca.crt"], _pem_cert(ca_cert))
    leaves = {service: (names + LOCAL_NAMES, LOCAL_IPS, True) for service, names in SERVER_NAMES.items()}
    leaves[CLIENT] = ((), (), False)
    for stem, (dns, ips, server) in leaves.items():
        common_name = dns[0] if dns else stem
        key, certificate = issue(ca_key, ca_cert, common_name, dns, ips, server, days)
        for suffix, data in ((".crt", _pem_cert(certificate)), (".key", _pem_key(key))):
            written[stem + suffix] = out / (stem + suffix)
            _write(written[stem + suffix], data)
    return written


def kubectl_commands(out: pathlib.Path) -> list[str]:
    """Commands that load the certificates as the Secrets the Kubernetes mtls overlay mounts
    (cert-manager's layout: tls.crt, tls.key, ca.crt)."""
    commands = []
    for stem in (*SERVER_NAMES, CLIENT):
        commands.append(f"kubectl -n convsearch create secret generic convsearch-{stem}-tls "
                        f"--from-file=tls.crt={out / (stem + '.crt')} --from-file=tls.key={out / (stem + '.key')} "
                        f"--from-file=ca.crt={out / 'ca.crt'}")
    return commands


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "build" / "certs"), help="folder to write to (default %(default)s)")
    parser.add_argument("--days", type=int, default=30, help="validity of every certificate (default %(default)s)")
    args = parser.parse_args(argv)
    if args.days < 1:
        parser.error("--days must be at least 1")
    out = pathlib.Path(args.out)
    written = make_certificates(out, args.days)
    print(f"wrote {', '.join(sorted(written))} to {out} (development only; valid {args.days} days)")
    print("docker-compose: docker-compose -f docker-compose.yml -f docker-compose.mtls.yml up -d")
    print("Kubernetes (a test cluster; production: cert-manager or your own CA):")
    for command in kubectl_commands(out):
        print("  " + command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
