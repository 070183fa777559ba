"""Transport security: server credentials that reload rotated certificate files, and channel
credentials for clients and for the gateway's backend connections.

A server given a certificate and key serves TLS; given a client CA too, it serves mutual TLS
(every client must present a certificate signed by that CA). The files are checked at start (so a
bad file stops the service with a message saying which) and watched afterwards: before each new
connection's handshake gRPC asks `CertificateFiles.fetch`, which re-reads the files when one of
them changed on disk, so a rotated certificate is served without a restart. Connections already
open keep the certificate they were made with.
"""

import dataclasses
import logging
import os
import ssl
import threading
from dataclasses import dataclass

import grpc

from convsearch.config import option

log = logging.getLogger("convsearch.tls")

# Environment variables the Python client and the CLI read when they are not given TLS options.
ENV_CA, ENV_CERT, ENV_KEY = "CONVSEARCH_TLS_CA", "CONVSEARCH_TLS_CERT", "CONVSEARCH_TLS_KEY"


class TLSError(ValueError):
    """A TLS file is missing, unreadable or does not fit with the others."""


def check_server_options(cert: str, key: str, client_ca: str) -> None:
    """Raises ValueError unless the server TLS options make sense together (files are checked later)."""
    if bool(cert) != bool(key):
        raise ValueError("tls_cert and tls_key go together: give both (TLS) or neither (plaintext)")
    if client_ca and not cert:
        raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key too")


@dataclass(frozen=True)
class ServerTLSOptions:
    """The TLS options every service's configuration has (its dataclass inherits them)."""

    tls_cert: str = option("", "PEM certificate (chain) to serve TLS with, on the same port as health and "
                               "reflection; re-read when the file changes (rotation); empty: plaintext")
    tls_key: str = option("", "PEM private key of tls_cert")
    tls_client_ca: str = option("", "PEM CA certificate(s) that clients' certificates must be signed by "
                                    "(mutual TLS: clients without one are refused); empty: none asked for")


def check_client_options(ca: str, cert: str, key: str, what: str = "tls") -> None:
    """Raises ValueError unless the client TLS options make sense together."""
    if bool(cert) != bool(key):
        raise ValueError(f"{what}_cert and {what}_key go together (a client certificate for mutual TLS)")


def peer_tls_options(prefix: str, peer: str, peers: str, address: str) -> type:
    """The TLS options of a service's calls to a peer service (the gateway's to its backends, a
    follower's to its primary) as a dataclass its configuration inherits: {prefix}_tls_ca,
    _cert, _key and _server_name, checked together by `check_{prefix}_tls()`. `peer` names the
    peer ("the primary"), `peers` its possessive ("the primary's"), `address` where its address
    is given."""
    ca, cert, key, name = (f"{prefix}_tls_{part}" for part in ("ca", "cert", "key", "server_name"))

    def check(self) -> None:
        check_client_options(getattr(self, ca), getattr(self, cert), getattr(self, key), f"{prefix}_tls")
        if (getattr(self, cert) or getattr(self, name)) and not getattr(self, ca):
            raise ValueError(f"{cert} and {name} need {ca} ({peers} CA)")

    return dataclasses.make_dataclass(f"{prefix.title()}TLSOptions", [
        (ca, str, option("", f"PEM CA certificate(s) {peers} certificates are verified against; TLS to {peer} "
                             "when set; empty: plaintext")),
        (cert, str, option("", f"PEM client certificate shown to {peer} (for mutual TLS)")),
        (key, str, option("", f"PEM private key of {cert}")),
        (name, str, option("", f"host name {peers} certificates are checked for instead of the one in {address} "
                               "(e.g. for an address by IP)")),
    ], namespace={f"check_{prefix}_tls": check}, frozen=True)


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as exc:
        raise TLSError(f"cannot read the {what} {path!r}: {exc.strerror or exc}") from None
    if b"-----BEGIN" not in data:
        raise TLSError(f"the {what} {path!r} is not PEM (no -----BEGIN line)")
    return data


def _no_password() -> bytes:
    # Instead of OpenSSL prompting on the terminal: gRPC cannot use an encrypted key either.
    raise TLSError("the private key is encrypted; give an unencrypted PEM key (keep it in a secret with tight "
                   "file permissions instead)")


def _check_pair(cert: str, key: str, what: str) -> None:
    """Raises TLSError unless `key` is the private key of the certificate in `cert`."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key, password=_no_password)
    except TLSError as exc:
        raise TLSError(f"{what} key {key!r}: {exc}") from None
    except ssl.SSLError as exc:
        reason = "the key does not match the certificate" if "mismatch" in str(exc).lower() else str(exc)
        raise TLSError(f"{what} certificate {cert!r} and key {key!r} cannot be used: {reason}") from None


def _check_ca(path: str, what: str) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=path)
    except ssl.SSLError as exc:
        raise TLSError(f"the {what} {path!r} holds no usable CA certificate: {exc}") from None


@dataclass(frozen=True)
class _Loaded:
    key: bytes
    chain: bytes
    client_ca: bytes | None


class CertificateFiles:
    """A server's certificate, key and (for mutual TLS) client CA files, re-read when they change.

    `fetch` is gRPC's certificate-configuration fetcher: it returns a new configuration when a
    file's modification time, size or inode changed since the last load, else None (keep the
    current one). A half-finished rotation (say, a new certificate next to the old key) is logged
    once and skipped; the files are tried again once they change again, not on every connection
    (any client that opens connections would otherwise have them re-read and the log flooded).
    Files that change while they are read are read again at the next connection.
    """

    def __init__(self, cert: str, key: str, client_ca: str = ""):
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self._lock = threading.Lock()
        self._stamp = self._stamps()
        self._loaded = self._load()  # raises TLSError: the service does not start
        self._skipped: tuple | None = None  # the stamps of files found unusable: not tried again
        self.reloads = 0

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(path for path in (self.cert, self.key, self.client_ca) if path)

    def _stamps(self) -> tuple:
        stamps = []
        for path in self.paths:
            try:
                status = os.stat(path)
                stamps.append((status.st_mtime_ns, status.st_size, status.st_ino))
            except OSError:
                stamps.append(None)
        return tuple(stamps)

    def _load(self) -> _Loaded:
        chain = _read(self.cert, "TLS certificate")
        key = _read(self.key, "TLS private key")
        _check_pair(self.cert, self.key, "TLS")
        client_ca = None
        if self.client_ca:
            client_ca = _read(self.client_ca, "TLS client CA")
            _check_ca(self.client_ca, "TLS client CA")
        return _Loaded(key, chain, client_ca)

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        """The gRPC configuration of the files as last loaded."""
        loaded = self._loaded
        return grpc.ssl_server_certificate_configuration([(loaded.key, loaded.chain)], loaded.client_ca)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's fetcher, called before every new connection's handshake."""
        try:
            with self._lock:
                stamp = self._stamps()
                if stamp in (self._stamp, self._skipped):
                    return None
                try:
                    loaded = self._load()
                except TLSError as exc:
                    self._skipped = stamp
                    log.warning("TLS files changed but cannot be used yet (kept the current ones until the files "
                                "change again): %s", exc)
                    return None
                if self._stamps() != stamp:  # changed while read: what was read may mix two pairs
                    return None  # read again at the next connection
                self._stamp, self._loaded = stamp, loaded
                self.reloads += 1
            log.info("TLS certificate files reloaded: %s", ", ".join(self.paths))
            return self.configuration()
        except Exception:  # noqa: BLE001 - an exception here would fail the handshake; keep serving
            log.exception("reloading the TLS certificate files failed; kept the current ones")
            return None

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials that use these files and follow their changes."""
        return grpc.dynamic_ssl_server_credentials(self.configuration(), self.fetch,
                                                   require_client_authentication=bool(self.client_ca))


def server_credentials(cert: str, key: str, client_ca: str = "") -> grpc.ServerCredentials | None:
    """TLS (mutual TLS with `client_ca`) server credentials that reload rotated files, or None for
    plaintext when no certificate is given. Raises TLSError naming a bad file."""
    check_server_options(cert, key, client_ca)
    if not cert:
        return None
    return CertificateFiles(cert, key, client_ca).credentials()


def channel_credentials(ca: str = "", cert: str = "", key: str = "") -> grpc.ChannelCredentials | None:
    """TLS channel credentials, or None (plaintext) when no file is given.

    The server's certificate is verified against `ca` (the system's roots when empty); `cert` and
    `key` are this side's certificate for mutual TLS. Raises TLSError naming a bad file.
    """
    check_client_options(ca, cert, key)
    if not (ca or cert):
        return None
    roots = None
    if ca:
        roots = _read(ca, "TLS CA")
        _check_ca(ca, "TLS CA")
    chain = private_key = None
    if cert:
        chain, private_key = _read(cert, "TLS client certificate"), _read(key, "TLS client key")
        _check_pair(cert, key, "TLS client")
    return grpc.ssl_channel_credentials(root_certificates=roots, private_key=private_key, certificate_chain=chain)


def client_credentials(ca: str | None = None, cert: str | None = None,
                       key: str | None = None) -> grpc.ChannelCredentials | None:
    """`channel_credentials` for the client and CLI: an option left None is read from its
    environment variable (CONVSEARCH_TLS_CA, CONVSEARCH_TLS_CERT, CONVSEARCH_TLS_KEY)."""
    def pick(value, env):
        return os.environ.get(env, "") if value is None else value

    return channel_credentials(pick(ca, ENV_CA), pick(cert, ENV_CERT), pick(key, ENV_KEY))
