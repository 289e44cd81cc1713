"""The SKIP codecs (common/skip.py) against draft-cisco-skip-02: its own examples
(tests/vectors/skip/), its status codes, and hostile requests."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from common.skip import (
    DEFAULT_ENTROPY_BITS,
    DEFAULT_KEY_BITS,
    Capabilities,
    EntropyResponse,
    GetCapabilities,
    GetEntropy,
    KeyById,
    KeyResponse,
    NewKey,
    SkipError,
    glob_matches,
    parse_request,
)

VECTORS = Path(__file__).resolve().parent / "vectors" / "skip" / "draft-cisco-skip-02.txt"


def vectors() -> dict[str, str]:
    out = {}
    for line in VECTORS.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.partition(": ")
            out[name] = value
    return out


def request(line: str) -> tuple[str, str, dict[str, str]]:
    method, _, url = line.partition(" ")
    parts = urlsplit(url)
    return method, parts.path, dict(parse_qsl(parts.query, keep_blank_values=True))


def test_the_drafts_example_bodies_read() -> None:
    v = vectors()
    caps = Capabilities.model_validate_json(v["figure 4"])
    assert (caps.entropy, caps.key, caps.algorithm) == (True, True, "PRF")
    assert caps.local_system_id == "Alice"
    assert caps.remote_system_id == ["Bob", "Eve"]
    assert json.loads(json.dumps(caps.body())) == json.loads(v["figure 4"])
    key = KeyResponse.model_validate_json(v["figure 6"])
    assert key.key_id == "1726e9AE76234FB1dd1283d4dca1911e1f93864d70f3069e"
    assert len(key.key_bytes) * 8 == DEFAULT_KEY_BITS
    assert "ad229dfb" not in repr(key)  # a key never in a repr (logs, tracebacks)
    entropy = EntropyResponse.model_validate_json(v["figure 8"])
    assert entropy.minentropy == DEFAULT_ENTROPY_BITS == len(entropy.random_str) * 4


def test_the_drafts_table_2_requests_parse() -> None:
    v = vectors()
    assert parse_request(*request(v["table 2 row 1"])) == GetCapabilities()
    assert parse_request(*request(v["table 2 row 2"])) == NewKey("Bob", DEFAULT_KEY_BITS)
    assert parse_request(*request(v["table 2 row 3"])) == NewKey("Bob", 128)
    key_id = "1726e9AE76234FB1dd1283d4dca1911e1f93864d70f3069e"
    method, path, query = request(v["table 2 row 4"].replace("{keyId}", key_id))
    assert parse_request(method, path, query) == KeyById("Alice", key_id.lower())
    assert parse_request(*request(v["table 2 row 5"])) == GetEntropy(DEFAULT_ENTROPY_BITS)
    assert parse_request(*request(v["table 2 row 6"])) == GetEntropy(128)


@pytest.mark.parametrize(("line", "status", "says"), [
    ("GET /keys?remoteSystemID=Bob", 404, "no such path"),
    ("GET /", 404, "no such path"),
    ("POST /key?remoteSystemID=Bob", 405, "only GET"),
    ("DELETE /key/00112233445566778899aabbccddeeff?remoteSystemID=Bob", 405, "only GET"),
    ("PUT /capabilities", 405, "only GET"),
    ("GET /key", 400, "remoteSystemID is missing"),
    ("GET /key?remoteSystemID=", 400, "remoteSystemID"),
    ("GET /key?remoteSystemID=a/b", 400, "remoteSystemID"),
    ("GET /key?remoteSystemID=Bob&size=100", 400, "multiple of 8"),
    ("GET /key?remoteSystemID=Bob&size=64", 400, "from 128"),
    ("GET /key?remoteSystemID=Bob&size=99999999", 400, "number of bits"),
    ("GET /key?remoteSystemID=Bob&size=-8", 400, "number of bits"),
    ("GET /key?remoteSystemID=Bob&size=0x100", 400, "number of bits"),
    ("GET /key?remoteSystemID=Bob&size=２５６", 400, "number of bits"),
    ("GET /key?remoteSystemID=Bob&count=2", 400, "unknown parameter"),
    ("GET /key/xyz?remoteSystemID=Bob", 400, "malformed keyId"),
    ("GET /key/abc?remoteSystemID=Bob", 400, "malformed keyId"),
    ("GET /key/?remoteSystemID=Bob", 400, "malformed keyId"),
    ("GET /key/" + "ab" * 200 + "?remoteSystemID=Bob", 400, "malformed keyId"),
    ("GET /key/00112233445566778899aabbccddeeff", 400, "remoteSystemID is missing"),
    ("GET /key/00112233445566778899aabbccddeeff?remoteSystemID=Bob&size=256", 400,
     "unknown parameter"),
    ("GET /entropy?minentropy=7", 400, "multiple of 8"),
    ("GET /entropy?minentropy=8192", 400, "from 8 to 4096"),
    ("GET /capabilities?x=1", 400, "unknown parameter"),
])
def test_bad_requests_get_the_drafts_status_and_a_reason(line: str, status: int,
                                                          says: str) -> None:
    with pytest.raises(SkipError) as caught:
        parse_request(*request(line))
    assert caught.value.status == status
    assert says in caught.value.message


@given(st.text(max_size=40), st.text(max_size=200),
       st.dictionaries(st.text(max_size=20), st.text(max_size=40), max_size=4))
def test_any_request_parses_or_is_refused_with_a_status(method: str, path: str,
                                                        query: dict[str, str]) -> None:
    refused: SkipError | None = None
    try:
        parsed = parse_request(method, path, query)
    except SkipError as e:
        refused = e
    if refused is not None:
        assert refused.status in (400, 404, 405)
        assert len(refused.message) < 400
    else:
        assert method == "GET"
        assert isinstance(parsed, GetCapabilities | GetEntropy | NewKey | KeyById)


@pytest.mark.parametrize("body", [
    {"keyId": "1726e9", "key": "ad" * 32},  # a key ID too short to be unguessable
    {"keyId": "zz" * 16, "key": "ad" * 32},
    {"keyId": "ab" * 16, "key": "ad" * 31 + "a"},  # odd digits
    {"keyId": "ab" * 16, "key": "ad" * 8},  # 64 bits: below any PPK
    {"keyId": "ab" * 16},
    {"keyId": 12345678901234567890, "key": "ad" * 32},
])
def test_a_key_response_that_is_not_one_is_refused_without_echoing_it(body: object) -> None:
    with pytest.raises(ValidationError) as caught:
        KeyResponse.model_validate(body)
    assert "ad" * 8 not in str(caught.value)


@pytest.mark.parametrize("body", [
    {"entropy": "true", "key": True, "algorithm": "PRF", "localSystemID": "A",
     "remoteSystemID": ["B"]},
    {"entropy": True, "key": True, "algorithm": "PRF", "localSystemID": "A",
     "remoteSystemID": []},
    {"entropy": True, "key": True, "algorithm": "PRF", "localSystemID": "A",
     "remoteSystemID": "B"},
    {"entropy": True, "key": True, "algorithm": "PRF", "localSystemID": "A b",
     "remoteSystemID": ["B"]},
    {"entropy": True, "key": True, "algorithm": "x" * 65, "localSystemID": "A",
     "remoteSystemID": ["B"]},
])
def test_capabilities_that_are_not_are_refused(body: object) -> None:
    with pytest.raises(ValidationError):
        Capabilities.model_validate(body)


def test_entropy_must_hold_what_it_claims() -> None:
    EntropyResponse.model_validate({"randomStr": "00" * 32, "minentropy": 256})
    with pytest.raises(ValidationError):
        EntropyResponse.model_validate({"randomStr": "00" * 32, "minentropy": 1.5})


@pytest.mark.parametrize(("pattern", "system", "match"), [
    ("KP_*_LOC1", "KP_ALICE_LOC1", True),  # the draft's own example (§4.1.2)
    ("KP_*_LOC1", "KP_BOB_LOC1", True),
    ("KP_*_LOC1", "KP_BOB_LOC2", False),
    ("KP_?", "KP_A", True),
    ("KP_?", "KP_AB", False),
    ("KP_[AB]", "KP_B", True),
    ("KP_[!AB]", "KP_B", False),
    ("KP_[!AB]", "KP_C", True),
    ("bob", "Bob", False),  # case-sensitive
])
def test_remote_system_globs(pattern: str, system: str, match: bool) -> None:
    assert glob_matches(pattern, system) is match
    caps = Capabilities.model_validate({"entropy": False, "key": True, "algorithm": "x",
                                        "localSystemID": "A", "remoteSystemID": [pattern]})
    assert caps.reaches(system) is match
