"""ETSI GS QKD 014 v1.1.1 key delivery: wire models, an async client and a QKD link simulator.

This package knows nothing about IPsec or TLS; it hands QKD keys to whoever asks.
"""

from kms.client import KeyBatch, KmeClient, RetryPolicy, Timeouts
from kms.errors import (
    KmsBadRequest,
    KmsConnectionError,
    KmsError,
    KmsHttpError,
    KmsProtocolError,
    KmsTimeout,
    KmsTlsError,
    KmsUnauthorized,
    KmsUnavailable,
)
from kms.models import QkdKey

__all__ = [
    "KeyBatch",
    "KmeClient",
    "KmsBadRequest",
    "KmsConnectionError",
    "KmsError",
    "KmsHttpError",
    "KmsProtocolError",
    "KmsTimeout",
    "KmsTlsError",
    "KmsUnauthorized",
    "KmsUnavailable",
    "QkdKey",
    "RetryPolicy",
    "Timeouts",
]
