"""Key fingerprints that can be logged and compared across sites without revealing the key."""

from __future__ import annotations

import hashlib
import hmac

_LABEL = b"qkd-gateway key fingerprint v1"


def fingerprint(key: bytes) -> str:
    """HMAC-SHA-256 keyed by KEY over a fixed label, first 8 bytes in hex.

    Keyed by the key itself (a key check value), so two sites holding the same key print the
    same fingerprint, and the fingerprint is a PRF output that reveals nothing about the key.
    """
    return hmac.new(key, _LABEL, hashlib.sha256).digest()[:8].hex()
