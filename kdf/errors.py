"""Errors of key derivation. Messages name the input and its expected shape, never its bytes."""

from __future__ import annotations


class KdfError(ValueError):
    """An input to key derivation or a key exchange is unusable."""


class InvalidKeyError(KdfError):
    """A public key or ciphertext from a peer has the wrong length or is malformed."""


class BackendUnavailable(RuntimeError):
    """A KEM backend that is not installed was asked for; the message says what is missing."""
