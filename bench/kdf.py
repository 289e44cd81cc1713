"""KDF benchmark: CatKDF derivations/s and KEM operations/s per backend.

    python bench/kdf.py [--seconds 1.0]

Baselines measured in the same run: a bare HKDF-SHA-384 derivation for CatKDF (the combiner's
overhead on top of the primitive it is built on) and an X25519 key generation + exchange for
the KEMs (the classical exchange the hybrid adds ML-KEM to). Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from kdf import (
    BackendUnavailable,
    KdfError,
    Party,
    Purpose,
    Transcript,
    X25519PrivateKey,
    catkdf,
    derive_epoch,
    kem_by_name,
)


def rate(fn: Callable[[], object], seconds: float) -> float:
    """Calls per second of FN, over at least SECONDS."""
    fn()
    n, start = 0, time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(50):
            fn()
        n += 50
        now = time.perf_counter()
        if now >= deadline:
            return n / (now - start)


def row(name: str, per_s: float, baseline: float | None = None) -> None:
    ratio = f"{baseline / per_s:7.2f}x" if baseline else ""
    print(f"  {name:<50} {per_s:>10,.0f}/s {1e6 / per_s:>9.1f} µs {ratio}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=1.0, help="per measurement")
    s = parser.parse_args().seconds

    qkd, k1, k2 = b"\x01" * 32, b"\x02" * 32, b"\x03" * 32
    kem = kem_by_name("ML-KEM-768")
    dk = kem.generate()
    sent = kem.encapsulate(dk.encapsulation_key)
    xi, xr = X25519PrivateKey(), X25519PrivateKey()
    party = Party("gw", b"\0" * 32, "sae", "kme")
    transcript = Transcript("qkd+ML-KEM-768+X25519/CatKDF-SHA-384", "ab", 1, party, party,
                            ("bc490419-7d60-487f-adc1-4ddcc177c139",), b"n" * 32, b"m" * 32,
                            1, 2, dk.encapsulation_key, xi.public_key, sent.ciphertext,
                            xr.public_key)
    context, ma, mb = transcript.context(), transcript.ma(), transcript.mb()

    print("CatKDF (TS 103 744 §8.2), one epoch's real inputs"
          f" (context {len(context)} B, MA {len(ma)} B, MB {len(mb)} B); ratio = time / baseline")
    hkdf = rate(lambda: HKDF(hashes.SHA384(), 48, b"label", b"info").derive(qkd + k1 + k2), s)
    row("baseline: HKDF-SHA-384, 48 bytes", hkdf)
    for h in ("sha256", "sha384", "sha512", "sha3_384"):
        row(f"CatKDF-{h}, 48 bytes", rate(lambda h=h: catkdf(  # type: ignore[misc]
            psk=qkd, secrets=[k1, k2], context=context, ma=ma, mb=mb, label=b"label",
            length=48, hash=h), s), hkdf)
    def schedule() -> list[bytes]:
        keys = derive_epoch(qkd_keys=[qkd], mlkem_secret=k1, x25519_secret=k2,
                            transcript=transcript)
        return [keys.key(p) for p in Purpose]

    row("whole schedule: encode transcript, derive, 6 keys", rate(schedule, s), hkdf)

    print("\nKEM operations; ratio = time / baseline")

    def x25519() -> None:
        X25519PrivateKey().exchange(xr.public_key)

    base = rate(x25519, s)
    row("baseline: X25519 keygen + exchange", base)
    for backend in ("cryptography", "oqs"):
        for name in ("ML-KEM-768", "ML-KEM-1024"):
            try:
                k = kem_by_name(name, backend)
            except (BackendUnavailable, KdfError) as e:
                print(f"  {name} ({backend}): not measured: {e}")
                break
            private = k.generate()
            c = k.encapsulate(private.encapsulation_key).ciphertext
            row(f"{name} ({backend}) keygen", rate(k.generate, s), base)
            row(f"{name} ({backend}) encaps", rate(
                lambda k=k, p=private: k.encapsulate(p.encapsulation_key), s), base)  # type: ignore[misc]
            row(f"{name} ({backend}) decaps", rate(lambda p=private, c=c: p.decapsulate(c), s),  # type: ignore[misc]
                base)


if __name__ == "__main__":
    main()
