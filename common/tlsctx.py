"""TLS contexts for ETSI 014 mutual TLS (GS QKD 014 §4: HTTPS, TLS 1.2 or later, both sides
authenticated by certificates)."""

from __future__ import annotations

import ssl
from pathlib import Path

from common.config import ConfigError, check_secret_file


def _load(ctx: ssl.SSLContext, ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    check_secret_file(key)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_verify_locations(cafile=str(ca))
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"{ca}: cannot load CA certificates: {e}") from None
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"{cert} / {key}: cannot load certificate and key: {e}") from None
    return ctx


def client_context(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """Verify the server against CA (name checked), present CERT as the client."""
    return _load(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), ca, cert, key)


def server_context(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """Present CERT; ask clients for a certificate chaining to CA.

    CERT_OPTIONAL, not REQUIRED: a client without a certificate then gets an ETSI 014 401 with
    a reason instead of a bare handshake alert. A certificate that does not chain to CA still
    fails the handshake.
    """
    ctx = _load(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), ca, cert, key)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def peer_common_name(peercert: object) -> str | None:
    """The subject commonName of a verified peer certificate (ssl's getpeercert() dict)."""
    if not isinstance(peercert, dict):
        return None
    for rdn in peercert.get("subject", ()):
        for attr, value in rdn:
            if attr == "commonName":
                return str(value)
    return None
