"""TLS contexts for the coordinator and its clients, and the host identity a certificate names.

Adapter: wraps the ``ssl`` module only. Never reads keys into memory it keeps,
never logs certificate contents. TLS 1.2 is the floor on both sides.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from cis490fleet.errors import ConfigError


def _check_file(path: str | Path, what: str, flag: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} file {str(p)!r} does not exist or is not a file; pass an existing PEM file with {flag}")
    return str(p)


def _load_chain(ctx: ssl.SSLContext, cert: str | Path, key: str | Path | None, flags: tuple[str, str]) -> None:
    cert_path = _check_file(cert, "certificate", flags[0])
    key_path = _check_file(key, "private key", flags[1]) if key else None
    try:
        ctx.load_cert_chain(cert_path, key_path)
    except (ssl.SSLError, OSError) as err:
        raise ConfigError(f"cannot load certificate {cert_path!r} with key {key_path or cert_path!r}: {err}; "
                          f"check that {flags[0]} and {flags[1]} are PEM files that belong together") from None


def _load_ca(ctx: ssl.SSLContext, ca: str | Path, what: str, flag: str) -> None:
    ca_path = _check_file(ca, what, flag)
    try:
        ctx.load_verify_locations(cafile=ca_path)
    except (ssl.SSLError, OSError) as err:
        raise ConfigError(f"cannot load {what} {ca_path!r}: {err}; pass a PEM file of CA certificates") from None


def server_context(cert: str | Path, key: str | Path | None = None, client_ca: str | Path | None = None) -> ssl.SSLContext:
    """A server context presenting ``cert``/``key``; with ``client_ca``, every client must show a certificate it signed."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(ctx, cert, key, ("--cert", "--key"))
    if client_ca:
        _load_ca(ctx, client_ca, "client CA", "--client-ca")
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(ca: str | Path | None = None, cert: str | Path | None = None,
                   key: str | Path | None = None) -> ssl.SSLContext:
    """A client context that verifies the server against ``ca`` (else the system store) and may present ``cert``."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca:
        _load_ca(ctx, ca, "CA", "--ca")
    if cert:
        _load_chain(ctx, cert, key, ("--cert", "--key"))
    return ctx


def identity_from_cert(cert: dict | None) -> str | None:
    """The host a decoded peer certificate names: its subject CN, else its first DNS subjectAltName."""
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName" and value:
                return str(value)
    for kind, value in cert.get("subjectAltName", ()):
        if kind == "DNS" and value:
            return str(value)
    return None


def peer_host_id(sock) -> str | None:
    """The host id of the verified client certificate on ``sock``; None for plain sockets or no certificate."""
    getpeercert = getattr(sock, "getpeercert", None)
    if getpeercert is None:
        return None
    try:
        return identity_from_cert(getpeercert())
    except (ValueError, ssl.SSLError):
        return None
