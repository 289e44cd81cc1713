"""SKIP (Secure Key Integration Protocol, IETF draft-cisco-skip-02) as pure codecs: the
bodies a Key Provider (KP) answers, the requests an encryptor makes, and the status codes of
the draft's tables. No I/O: the Key Provider server and the SKIP client are built on these.

    GET /capabilities                          -> Capabilities        (§4.1)
    GET /key?remoteSystemID=X[&size=BITS]      -> KeyResponse         (§4.2, a new key)
    GET /key/{keyId}?remoteSystemID=X          -> KeyResponse         (§4.2, that key)
    GET /entropy[?minentropy=BITS]             -> EntropyResponse     (§4.3)

Anything else is a `SkipError` carrying the draft's status code: 404 for another path, 405
for another method (Table 3), 400 for a malformed or unknown key ID and bad parameters
(Table 7), 503 when there is no entropy (Table 9). Every number from outside is bounded;
nothing a client sent is echoed unescaped.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt

from common.text import quote_remote

#: §4.2.2: a key is 256 bits unless the encryptor asks for another size.
DEFAULT_KEY_BITS = 256
#: §4.2.1: a key ID is 128 bits unless the KP says otherwise.
DEFAULT_KEY_ID_BITS = 128
#: §4.3: an entropy sample is 256 bits unless asked.
DEFAULT_ENTROPY_BITS = 256
#: Sizes this codec takes (bits): the draft sets none. 128 is its own example's smallest;
#: 4096 is far above any PPK (IKEv2 uses 256) and bounds what one request can draw.
MIN_KEY_BITS, MAX_KEY_BITS = 128, 4096
MIN_ENTROPY_BITS, MAX_ENTROPY_BITS = 8, 4096
#: Key IDs: at least 64 bits (unguessable), at most 1024 (the draft's example has 192).
MIN_KEY_ID_HEX, MAX_KEY_ID_HEX = 16, 256
#: §4.1: implementations MUST support 16 bytes of `algorithm` and 32 of the system IDs; this
#: one takes up to these (longer is refused, not cut).
MAX_ALGORITHM, MAX_SYSTEM_ID = 64, 128
#: remoteSystemID entries a capabilities answer may list.
MAX_REMOTE_SYSTEMS = 1024

_HEX = re.compile(r"[0-9A-Fa-f]*")
#: System IDs: printable ASCII without space, '/', '?', '&', '#', '%' (they travel in a URL
#: query unescaped by some clients); glob characters are allowed in remoteSystemID entries.
_SYSTEM_ID = re.compile(rf"[A-Za-z0-9._:@+=~-]{{1,{MAX_SYSTEM_ID}}}")
_SYSTEM_GLOB = re.compile(rf"[A-Za-z0-9._:@+=~*?\[\]!-]{{1,{MAX_SYSTEM_ID}}}")


class SkipError(Exception):
    """A request the KP refuses, with the draft's status code and a reason to show."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _hex(value: str, what: str, lo: int, hi: int) -> str:
    if not lo <= len(value) <= hi or len(value) % 2 or not _HEX.fullmatch(value):
        raise ValueError(f"{what} must be {lo} to {hi} hexadecimal digits, an even number")
    return value


def _system_id(value: str) -> str:
    if not _SYSTEM_ID.fullmatch(value):
        raise ValueError(f"a system ID is 1 to {MAX_SYSTEM_ID} characters of A-Z a-z 0-9"
                         " . _ : @ + = ~ -")
    return value


def _system_glob(value: str) -> str:
    if not _SYSTEM_GLOB.fullmatch(value):
        raise ValueError(f"a remoteSystemID entry is 1 to {MAX_SYSTEM_ID} characters of"
                         " A-Z a-z 0-9 . _ : @ + = ~ - and the glob characters * ? [ ] !")
    return value


SystemId = Annotated[str, AfterValidator(_system_id)]
SystemGlob = Annotated[str, AfterValidator(_system_glob)]
HexKeyId = Annotated[str, AfterValidator(
    lambda v: _hex(v, "keyId", MIN_KEY_ID_HEX, MAX_KEY_ID_HEX))]
HexKey = Annotated[str, AfterValidator(
    lambda v: _hex(v, "key", MIN_KEY_BITS // 4, MAX_KEY_BITS // 4))]
HexEntropy = Annotated[str, AfterValidator(
    lambda v: _hex(v, "randomStr", MIN_ENTROPY_BITS // 4, MAX_ENTROPY_BITS // 4))]


class _Body(BaseModel):
    """A SKIP response body: strict JSON types, unknown members ignored (a newer KP may add
    some), the input never echoed in errors (it may hold a key)."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True,
                              hide_input_in_errors=True, populate_by_name=True)


class Capabilities(_Body):
    """§4.1, Figure 3."""

    entropy: StrictBool = Field(description="the KP serves GET /entropy")
    key: StrictBool = Field(description="the KP serves GET /key")
    algorithm: str = Field(max_length=MAX_ALGORITHM, description="how the KP makes and"
                           " synchronises keys")
    local_system_id: SystemId = Field(alias="localSystemID")
    remote_system_id: list[SystemGlob] = Field(alias="remoteSystemID", min_length=1,
                                               max_length=MAX_REMOTE_SYSTEMS)

    def reaches(self, system_id: str) -> bool:
        """The KP can synchronise keys with SYSTEM_ID (§4.1.2: entries may be globs)."""
        return any(glob_matches(p, system_id) for p in self.remote_system_id)

    def body(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True)


class KeyResponse(_Body):
    """§4.2, Figure 5: `keyId` and `key`, both hexadecimal."""

    key_id: HexKeyId = Field(alias="keyId")
    key: HexKey = Field(repr=False)

    @property
    def key_bytes(self) -> bytes:
        return bytes.fromhex(self.key)

    def body(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True)


class EntropyResponse(_Body):
    """§4.3, Figure 7: `randomStr` (hexadecimal) holding `minentropy` bits."""

    random_str: HexEntropy = Field(alias="randomStr", repr=False)
    minentropy: StrictInt = Field(ge=MIN_ENTROPY_BITS, le=MAX_ENTROPY_BITS)

    def body(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True)


def glob_matches(pattern: str, system_id: str) -> bool:
    """§4.1.2: `*`, `?`, `[list]`, `[!list]` as POSIX fnmatch, case-sensitive."""
    return fnmatch.fnmatchcase(system_id, pattern)


# -- requests, as the KP reads them ------------------------------------------------------------


@dataclass(frozen=True)
class NewKey:
    """GET /key?remoteSystemID=X[&size=BITS]: a new key shared with X."""

    remote_system_id: str
    bits: int


@dataclass(frozen=True)
class KeyById:
    """GET /key/{keyId}?remoteSystemID=X: the key X's KP made under KEY_ID."""

    remote_system_id: str
    key_id: str  # lower case: the draft's IDs are case-insensitive hex (its example mixes)


@dataclass(frozen=True)
class GetCapabilities:
    """GET /capabilities."""


@dataclass(frozen=True)
class GetEntropy:
    """GET /entropy[?minentropy=BITS]."""

    bits: int


Request = NewKey | KeyById | GetCapabilities | GetEntropy

PATHS = ("/capabilities", "/key", "/key/{keyId}", "/entropy")


def parse_request(method: str, path: str, query: Mapping[str, str]) -> Request:
    """The request METHOD PATH?QUERY means, or SkipError with the draft's status code.
    PATH is the URL's path, still percent-decoded by the caller; QUERY its parameters (the
    first value of each)."""
    if path not in ("/capabilities", "/key", "/entropy") and not path.startswith("/key/"):
        raise SkipError(404, f"no such path {quote_remote(path, limit=80)}: this Key Provider"
                             " serves /capabilities, /key, /key/{keyId} and /entropy")
    if method != "GET":
        raise SkipError(405, f"method {quote_remote(method, limit=16)} not allowed: only GET")
    known: set[str] = {"/capabilities": set(), "/entropy": {"minentropy"},
                       "/key": {"remoteSystemID", "size"}}.get(path, {"remoteSystemID"})
    unknown = sorted(set(query) - known)
    if unknown:
        raise SkipError(400, f"unknown parameter {quote_remote(unknown[0], limit=40)} (this"
                             f" path takes: {', '.join(sorted(known)) or 'none'})")
    if path == "/capabilities":
        return GetCapabilities()
    if path == "/entropy":
        return GetEntropy(_bits(query, "minentropy", DEFAULT_ENTROPY_BITS, MIN_ENTROPY_BITS,
                                MAX_ENTROPY_BITS))
    remote = query.get("remoteSystemID")
    if remote is None:
        raise SkipError(400, "remoteSystemID is missing: the other Key Provider's"
                             " localSystemID")
    try:
        _system_id(remote)
    except ValueError as e:
        raise SkipError(400, f"remoteSystemID {quote_remote(remote, limit=40)}: {e}") \
            from None
    if path == "/key":
        return NewKey(remote, _bits(query, "size", DEFAULT_KEY_BITS, MIN_KEY_BITS,
                                    MAX_KEY_BITS))
    key_id = path[len("/key/"):]
    try:
        _hex(key_id, "keyId", MIN_KEY_ID_HEX, MAX_KEY_ID_HEX)
    except ValueError as e:
        raise SkipError(400, f"malformed keyId {quote_remote(key_id, limit=40)}: {e}") \
            from None
    return KeyById(remote, key_id.lower())


def _bits(query: Mapping[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = query.get(name)
    if raw is None:
        return default
    if not raw.isascii() or not raw.isdigit() or len(raw) > 6:
        raise SkipError(400, f"{name} must be a number of bits, not"
                             f" {quote_remote(raw, limit=20)}")
    bits = int(raw)
    if not lo <= bits <= hi or bits % 8:
        raise SkipError(400, f"{name} must be a multiple of 8 from {lo} to {hi} bits, not"
                             f" {bits}")
    return bits


def error_body(e: SkipError) -> dict[str, Any]:
    """What a refusal carries: the draft defines no body; a reason helps the operator."""
    return {"error": e.message}
