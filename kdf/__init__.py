"""Hybrid key derivation: KEM backends, X25519, the ETSI TS 103 744 CatKDF combiner and the key
schedule. No I/O."""

from kdf.fingerprint import fingerprint

__all__ = ["fingerprint"]
