"""TLS 1.3 external PSKs for Python applications (Python 3.13+, standard library only).

    from tls.pyssl import PskStore, client_context, server_context

    store = PskStore("/run/qkdgw/ab.psk")        # written by a `tls_psk` sink
    server = server_context(store)                # accepts every live epoch's identity
    client = client_context(store)                # always offers the current epoch's

Both contexts read the file again whenever it changed (one stat per handshake), so a
rotation needs no restart and established connections are not touched. They are PSK only:
the server has no certificate and the client requires one it cannot verify, so a wrong or
retired PSK fails the handshake loudly instead of falling back to certificates.

Python 3.13 added the PSK callbacks (`SSLContext.set_psk_server_callback`); on older Pythons
the context functions raise RuntimeError saying so.
"""

from __future__ import annotations

import os
import ssl
import sys
import threading
from pathlib import Path

from tls import pskfile  # standard library only, like this module: no gateway install needed


class PskStore:
    """The PSK secrets file, re-read when it changes (inode, size or mtime)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._entries: list[tuple[str, bytes]] = []

    def entries(self) -> list[tuple[str, bytes]]:
        with self._lock:
            try:
                st = self.path.stat()
            except FileNotFoundError:
                self._stamp, self._entries = None, []
                return []
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
            if stamp != self._stamp:
                self._entries = pskfile.loads(self.path.read_bytes())
                self._stamp = stamp
            return self._entries

    def current(self) -> tuple[str, bytes] | None:
        """The identity and key a client uses now: the first in the file."""
        entries = self.entries()
        return entries[0] if entries else None

    def key(self, identity: str | None) -> bytes | None:
        """The key a server accepts for IDENTITY, if it is live."""
        for ident, key in self.entries():
            if ident == identity:
                return key
        return None


def _require_psk_callbacks() -> None:
    if not hasattr(ssl.SSLContext, "set_psk_server_callback"):
        raise RuntimeError(
            "TLS external PSKs need Python 3.13 or later (ssl.SSLContext.set_psk_server_callback"
            f" and set_psk_client_callback); this is Python {sys.version.split()[0]}")


def server_context(store: PskStore) -> ssl.SSLContext:
    _require_psk_callbacks()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3

    def callback(identity: str | None) -> bytes:
        # An empty key fails the handshake (OpenSSL then has no certificate to fall back on).
        return store.key(identity) or b""

    context.set_psk_server_callback(callback)  # type: ignore[attr-defined]  # 3.13+
    return context


def client_context(store: PskStore) -> ssl.SSLContext:
    _require_psk_callbacks()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    # PSK only: a server answering with a certificate instead is not trusted (no CAs loaded).
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED

    def callback(hint: str | None) -> tuple[str | None, bytes]:
        current = store.current()
        if current is None:
            return None, b""  # no live epoch: the handshake fails, nothing is sent in clear
        return current

    context.set_psk_client_callback(callback)  # type: ignore[attr-defined]  # 3.13+
    return context
