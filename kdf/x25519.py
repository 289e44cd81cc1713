"""X25519 (RFC 7748) for the classical third of the hybrid, through pyca/cryptography."""

from __future__ import annotations

import hmac

from cryptography.hazmat.primitives.asymmetric import x25519

from kdf.errors import InvalidKeyError

PUBLIC_KEY_SIZE = 32
_ZERO = bytes(32)


class X25519PrivateKey:
    """An ephemeral X25519 key; `repr` never shows it."""

    def __init__(self, key: x25519.X25519PrivateKey | None = None) -> None:
        self._key = key or x25519.X25519PrivateKey.generate()

    @classmethod
    def from_private_bytes(cls, data: bytes) -> X25519PrivateKey:
        return cls(x25519.X25519PrivateKey.from_private_bytes(data))

    @property
    def public_key(self) -> bytes:
        return self._key.public_key().public_bytes_raw()

    def exchange(self, peer_public_key: bytes) -> bytes:
        """The shared secret with PEER_PUBLIC_KEY. An all-zero result (a low-order peer key,
        RFC 7748 §6.1) is refused: it would contribute nothing to the hybrid key."""
        if not isinstance(peer_public_key, bytes) or len(peer_public_key) != PUBLIC_KEY_SIZE:
            raise InvalidKeyError(f"X25519 public key must be {PUBLIC_KEY_SIZE} bytes")
        peer = x25519.X25519PublicKey.from_public_bytes(peer_public_key)
        try:
            shared = self._key.exchange(peer)
        except ValueError:
            # OpenSSL itself refuses the all-zero output.
            raise InvalidKeyError("X25519 public key is of low order (all-zero shared secret)"
                                  ) from None
        if hmac.compare_digest(shared, _ZERO):
            raise InvalidKeyError("X25519 public key is of low order (all-zero shared secret)")
        return shared

    def __repr__(self) -> str:
        return "<X25519 private key>"
