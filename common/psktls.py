"""TLS authenticated by external pre-shared keys, as SKIP (draft-cisco-skip-02 §3) asks:
TLS 1.2 with TLS_DHE_PSK_WITH_AES_256_CBC_SHA384 (or ..._SHA) and TLS 1.3 with
TLS_AES_256_GCM_SHA384, both sides proving the PSK; no certificates.

Why pyOpenSSL and cryptography's OpenSSL bindings, not `ssl`: Python 3.11's `ssl` has no PSK
at all, and 3.13's ties a TLS 1.3 PSK to SHA-256, so it cannot serve the draft's TLS 1.3
suite. OpenSSL's session-based PSK callbacks (SSL_CTX_set_psk_find_session_callback and
..._use_session_callback) can, and cryptography's bindings carry them on every Python the
project supports; pyOpenSSL drives the connection over memory BIOs, so it runs on asyncio
streams (`PskStream`). Measured with `openssl s_client -psk` (TLS 1.2), the project's client
and tlslite-ng (TLS 1.3): tests/test_psktls.py.

Fail closed: no certificate is ever loaded, so a TLS 1.3 client without the PSK cannot fall
back to certificate authentication: it has nothing to authenticate with, and is refused. No
session tickets nor session cache either: every connection proves the PSK itself.

The PSK file, one `IDENTITY:HEXKEY` per line (stunnel's PSKsecrets layout, the key in hex as
IOS XE's `psk id IDENTITY key hex HEXKEY` takes it), `#` comments; 0600 like every secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.bindings.openssl.binding import Binding
from OpenSSL import SSL

from common.config import ConfigError, check_secret_file

_ffi: Any = Binding.ffi
_lib: Any = Binding.lib

#: The draft's suites. TLS 1.2: DHE for forward secrecy, SHA-384 first (§3).
TLS12_CIPHERS = b"DHE-PSK-AES256-CBC-SHA384:DHE-PSK-AES256-CBC-SHA"
TLS13_SUITE = b"TLS_AES_256_GCM_SHA384"
_TLS13_SUITE_ID = b"\x13\x02"  # TLS_AES_256_GCM_SHA384's code point (RFC 8446 B.4)
#: PSK sizes accepted: at least 128 bits (a PSK is the whole of the authentication), at most
#: what OpenSSL's PSK callbacks take (PSK_MAX_PSK_LEN, 512 bytes; 64 are plenty).
MIN_PSK_BYTES = 16
MAX_PSK_BYTES = 64
MAX_IDENTITY = 128
MAX_CLIENTS = 4096
_IDENTITY = re.compile(rf"[\x21-\x7e]{{1,{MAX_IDENTITY}}}")
#: A handshake's wait for the peer's next flight, and how much it may send before it is done.
HANDSHAKE_TIMEOUT = 10.0
_READ_CHUNK = 16384

Version = Literal["1.2", "1.3"]


class PskError(Exception):
    """A TLS-PSK handshake or record failed (wrong key, no common suite, a broken peer)."""


def _require_bindings() -> None:
    if not (_lib.Cryptography_HAS_PSK and _lib.Cryptography_HAS_PSK_TLSv1_3):
        raise ConfigError("this build of the cryptography package has no TLS-PSK support"
                          " (Cryptography_HAS_PSK_TLSv1_3): SKIP cannot be served")


@dataclass(frozen=True)
class PskTable:
    """Identity → key: the encryptors allowed in."""

    keys: Mapping[bytes, bytes] = field(repr=False)

    @classmethod
    def parse(cls, text: str, where: str) -> PskTable:
        keys: dict[bytes, bytes] = {}
        for n, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            identity, sep, hexkey = line.rpartition(":")
            if not sep or not _IDENTITY.fullmatch(identity):
                raise ConfigError(f"{where}:{n}: expected IDENTITY:HEXKEY, the identity 1 to"
                                  f" {MAX_IDENTITY} printable characters without spaces")
            try:
                key = bytes.fromhex(hexkey)
            except ValueError:
                raise ConfigError(f"{where}:{n}: the key of {identity!r} is not hex") from None
            if not MIN_PSK_BYTES <= len(key) <= MAX_PSK_BYTES:
                raise ConfigError(f"{where}:{n}: the key of {identity!r} has {len(key)} bytes;"
                                  f" {MIN_PSK_BYTES} to {MAX_PSK_BYTES} are accepted")
            if identity.encode() in keys:
                raise ConfigError(f"{where}:{n}: identity {identity!r} given twice")
            if len(keys) == MAX_CLIENTS:
                raise ConfigError(f"{where}: more than {MAX_CLIENTS} identities")
            keys[identity.encode()] = key
        if not keys:
            raise ConfigError(f"{where}: no IDENTITY:HEXKEY line: nobody could connect")
        return cls(keys)

    @classmethod
    def load(cls, path: Path) -> PskTable:
        check_secret_file(path)
        try:
            text = path.read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: cannot read the PSK file: {e}") from None
        return cls.parse(text, str(path))


class ServerContext:
    """A server's TLS-PSK context; `identity(conn)` names who connected on CONN."""

    def __init__(self, table: PskTable) -> None:
        _require_bindings()
        self.table = table
        self._who: dict[int, bytes] = {}  # SSL* → the identity its handshake proved
        ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        ctx.set_cipher_list(TLS12_CIPHERS)
        ctx.set_tls13_ciphersuites(TLS13_SUITE)
        ctx.set_options(SSL.OP_NO_TICKET | SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION
                        | SSL.OP_CIPHER_SERVER_PREFERENCE)
        ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        with resources.as_file(resources.files("common") / "ffdhe3072.pem") as dh:
            ctx.load_tmp_dh(str(dh).encode())
        # (kept on self: the callbacks must outlive the context)
        self._tls12 = _ffi.callback(
            "unsigned int(SSL *, const char *, unsigned char *, unsigned int)", self._psk12)
        self._tls13 = _ffi.callback(
            "int(SSL *, const unsigned char *, size_t, SSL_SESSION **)", self._psk13)
        _lib.SSL_CTX_set_psk_server_callback(ctx._context, self._tls12)
        _lib.SSL_CTX_set_psk_find_session_callback(ctx._context, self._tls13)
        self.context = ctx

    def identity(self, conn: SSL.Connection) -> str:
        return self._who.get(_address(conn._ssl), b"").decode()

    def forget(self, conn: SSL.Connection) -> None:
        self._who.pop(_address(conn._ssl), None)

    def _psk12(self, ssl: Any, identity: Any, out: Any, room: int) -> int:
        if identity == _ffi.NULL:
            return 0
        name = _ffi.string(identity)
        key = self.table.keys.get(name)
        if key is None or len(key) > room:
            return 0  # (the handshake fails: the client's Finished does not verify)
        _ffi.memmove(out, key, len(key))
        self._who[_address(ssl)] = name
        return len(key)

    def _psk13(self, ssl: Any, identity: Any, size: int, out: Any) -> int:
        out[0] = _ffi.NULL
        if size > MAX_IDENTITY:
            return 1  # unknown: no PSK, and no certificate to fall back on
        name = bytes(_ffi.buffer(identity, size))
        key = self.table.keys.get(name)
        if key is None:
            return 1
        session = _session(ssl, key)
        if session is None:
            return 0
        out[0] = session
        self._who[_address(ssl)] = name
        return 1


class ClientContext:
    """A client's TLS-PSK context: IDENTITY and KEY, over VERSION (or either)."""

    def __init__(self, identity: str, key: bytes, version: Version | None = None) -> None:
        _require_bindings()
        if not _IDENTITY.fullmatch(identity):
            raise ConfigError(f"PSK identity {identity!r}: 1 to {MAX_IDENTITY} printable"
                              " characters without spaces")
        if not MIN_PSK_BYTES <= len(key) <= MAX_PSK_BYTES:
            raise ConfigError(f"PSK of {len(key)} bytes; {MIN_PSK_BYTES} to {MAX_PSK_BYTES}"
                              " are accepted")
        self._identity = _ffi.new("unsigned char[]", identity.encode())
        self._size = len(identity.encode())
        self._key = key
        ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
        low, high = {"1.2": (SSL.TLS1_2_VERSION, SSL.TLS1_2_VERSION),
                     "1.3": (SSL.TLS1_3_VERSION, SSL.TLS1_3_VERSION),
                     None: (SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION)}[version]
        ctx.set_min_proto_version(low)
        ctx.set_max_proto_version(high)
        ctx.set_cipher_list(TLS12_CIPHERS)
        ctx.set_tls13_ciphersuites(TLS13_SUITE)
        ctx.set_options(SSL.OP_NO_TICKET | SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION)
        ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        self._tls12 = _ffi.callback(
            "unsigned int(SSL *, const char *, char *, unsigned int, unsigned char *,"
            " unsigned int)", self._psk12)
        self._tls13 = _ffi.callback(
            "int(SSL *, const EVP_MD *, const unsigned char **, size_t *, SSL_SESSION **)",
            self._psk13)
        _lib.SSL_CTX_set_psk_client_callback(ctx._context, self._tls12)
        _lib.SSL_CTX_set_psk_use_session_callback(ctx._context, self._tls13)
        self.context = ctx

    def _psk12(self, ssl: Any, hint: Any, identity: Any, id_room: int, out: Any,
               room: int) -> int:
        if self._size + 1 > id_room or len(self._key) > room:
            return 0
        _ffi.memmove(identity, self._identity, self._size + 1)
        _ffi.memmove(out, self._key, len(self._key))
        return len(self._key)

    def _psk13(self, ssl: Any, md: Any, identity: Any, size: Any, out: Any) -> int:
        session = _session(ssl, self._key)
        if session is None:
            return 0
        identity[0], size[0], out[0] = self._identity, self._size, session
        return 1


def _address(ssl: Any) -> int:
    return int(_ffi.cast("uintptr_t", ssl))


def _session(ssl: Any, key: bytes) -> Any:
    """A TLS 1.3 external-PSK session: KEY, for TLS_AES_256_GCM_SHA384 (its hash, SHA-384,
    is the PSK's: RFC 8446 §4.2.11). None when OpenSSL cannot make one."""
    cipher = _lib.SSL_CIPHER_find(ssl, _TLS13_SUITE_ID)
    session = _lib.Cryptography_SSL_SESSION_new()
    if session == _ffi.NULL:
        return None
    if cipher == _ffi.NULL or _lib.SSL_SESSION_set1_master_key(session, key, len(key)) != 1 \
            or _lib.SSL_SESSION_set_cipher(session, cipher) != 1 \
            or _lib.SSL_SESSION_set_protocol_version(session, _lib.TLS1_3_VERSION) != 1:
        _lib.SSL_SESSION_free(session)
        return None
    return session


class PskStream:
    """TLS over an asyncio stream, through memory BIOs: `handshake`, then `read`/`write`."""

    def __init__(self, context: SSL.Context, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, *, server: bool) -> None:
        self.conn = SSL.Connection(context, None)
        if server:
            self.conn.set_accept_state()
        else:
            self.conn.set_connect_state()
        self.reader, self.writer = reader, writer

    @property
    def version(self) -> str:
        return self.conn.get_protocol_version_name()

    @property
    def cipher(self) -> str:
        return self.conn.get_cipher_name() or ""

    async def handshake(self, timeout: float = HANDSHAKE_TIMEOUT) -> None:
        """PskError when the peer does not prove the PSK (or talks no TLS), TimeoutError
        when it stalls."""
        async with asyncio.timeout(timeout):
            while True:
                try:
                    self.conn.do_handshake()
                    await self._flush()
                    return
                except SSL.WantReadError:
                    await self._flush()
                    await self._fill()
                except SSL.Error as e:
                    await self._flush()  # (the alert, so the peer knows why)
                    raise PskError(_describe(e)) from None

    async def read(self) -> bytes:
        """Application data; b"" at the end of the stream."""
        while True:
            try:
                return self.conn.recv(_READ_CHUNK)
            except SSL.WantReadError:
                await self._flush()
                if not await self._fill(eof_ok=True):
                    return b""
            except SSL.ZeroReturnError:
                return b""
            except SSL.Error as e:
                raise PskError(_describe(e)) from None

    async def write(self, data: bytes) -> None:
        try:
            self.conn.sendall(data)
        except SSL.Error as e:
            raise PskError(_describe(e)) from None
        await self._flush()

    async def close(self) -> None:
        with contextlib.suppress(SSL.Error, OSError):  # (a peer gone hears nothing more)
            self.conn.shutdown()
            await self._flush()
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()

    async def _fill(self, *, eof_ok: bool = False) -> bool:
        data = await self.reader.read(_READ_CHUNK)
        if not data:
            if eof_ok:
                return False
            raise PskError("the peer closed the connection during the handshake")
        self.conn.bio_write(data)
        return True

    async def _flush(self) -> None:
        while True:
            try:
                data = self.conn.bio_read(_READ_CHUNK)
            except SSL.WantReadError:
                break
            if not data:
                break
            self.writer.write(data)
        await self.writer.drain()


def _describe(e: SSL.Error) -> str:
    """OpenSSL's reasons, without its codes: 'binder does not verify', 'no shared cipher'."""
    reasons = [r[2] for r in (e.args[0] if e.args and isinstance(e.args[0], list) else [])
               if isinstance(r, tuple) and len(r) == 3 and r[2]]
    return "; ".join(reasons) or "TLS failure"
