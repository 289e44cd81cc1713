"""What a hostile KME answers, drawn by hypothesis: `plans` draws one answer (`Plan`), which
becomes concrete bytes for the request it answers (`Plan.answer`): status codes, headers,
lengths that lie, valid documents with members replaced by raw JSON (extreme numbers, NaN,
wrong types, control characters), reshaped key lists, garbage, cuts, delays and trickles.

Used against the client (tests/kms/test_client_fuzz.py) and against a whole gateway
(tests/gateway/test_hostile_kme.py).
"""

from __future__ import annotations

import base64
import json
import os
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

from hypothesis import strategies as st

from tests.kms.hostile import TRUE_LENGTH, Answer, Request

RAW_VALUES = st.sampled_from([
    "NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1e-999", "1" + "0" * 400,
    "9" * 5000, str(2**53), str(2**53 - 1), str(2**32), str(2**32 - 1), str(2**64), "-1",
    "0", "1", "0.5", "1.5", "-0.0", "256", "true", "false", "null", '""',
    '"\\u0000\\n\\u001b[2J"', '"\\ud800"', "[]", "{}", "[" * 300 + "]" * 300,
    '{"a":' * 40 + "1" + "}" * 40,
]) | st.integers().map(str) | st.floats(allow_nan=False, allow_infinity=False).map(json.dumps) \
    | st.text(max_size=30).map(json.dumps)

STATUS_TARGETS = [
    "source_KME_ID", "target_KME_ID", "master_SAE_ID", "slave_SAE_ID", "key_size",
    "stored_key_count", "max_key_count", "max_key_per_request", "max_key_size",
    "min_key_size", "max_SAE_ID_count", "status_extension", "status_extension.qber",
    "status_extension.key_rate", "status_extension.link_up", "status_extension.vendor",
]
KEYS_TARGETS = ["keys", "keys.0", "keys.0.key_ID", "keys.0.key", "keys.0.key_extension",
                "keys.0.key_ID_extension", "key_container_extension"]
ERROR_TARGETS = ["message", "details"]
KNOWN_TARGETS = STATUS_TARGETS + KEYS_TARGETS + ERROR_TARGETS
#: A member to replace, or an unknown member to add, its name drawn (control characters too).
TARGETS = st.sampled_from(KNOWN_TARGETS) | st.text(max_size=12)

RESHAPES = ["drop-last", "duplicate-first", "extra-key", "short-key", "long-key",
            "reverse", "upper-ids", "new-ids"]


@dataclass(frozen=True)
class Plan:
    """One answer, as drawn; `answer` makes it concrete for the request it answers."""

    status: int
    body: str  # valid | error | bytes
    mutations: tuple[tuple[str, str], ...]
    reshapes: tuple[str, ...]
    raw: bytes
    cut: int | None
    headers: tuple[tuple[str, str], ...]
    length: int | None
    truncate: int | None
    close: bool
    delay: float
    trickle: float

    def answer(self, request: Request) -> Answer:
        if self.body == "bytes":
            body = self.raw
        else:
            doc = _valid(request) if self.body == "valid" else {"message": "refused"}
            for name in self.reshapes:
                _reshape(doc, name)
            body = _dump(doc, self.mutations)
        if self.cut is not None:
            body = body[: self.cut]
        return Answer(self.status, body, headers=self.headers, content_length=self.length,
                      truncate=self.truncate, close=self.close, delay=self.delay,
                      trickle=self.trickle)


def _request_keys(request: Request) -> tuple[int, int, list[str]]:
    """(number, size, key IDs) the request asks for, as well as this server can tell."""
    query = parse_qs(urlsplit(request.target).query)
    try:
        body = json.loads(request.body) if request.body else {}
    except ValueError:
        body = {}
    number = int(query.get("number", [body.get("number", 1)])[0])
    size = int(query.get("size", [body.get("size", 256)])[0])
    ids = query.get("key_ID") or [k["key_ID"] for k in body.get("key_IDs", [])]
    return number, size, ids


def _valid(request: Request) -> dict[str, Any]:
    path = urlsplit(request.target).path
    if path.endswith("/status"):
        return {"source_KME_ID": "kme-a", "target_KME_ID": "kme-b", "master_SAE_ID": "sae-a",
                "slave_SAE_ID": path.split("/")[-2], "key_size": 256,
                "stored_key_count": 1000, "max_key_count": 10000, "max_key_per_request": 128,
                "max_key_size": 8192, "min_key_size": 64, "max_SAE_ID_count": 0,
                "status_extension": {"link": "l", "qber": 0.02, "key_rate": 5e4,
                                     "link_up": True}}
    number, size, ids = _request_keys(request)
    ids = ids or [str(uuid.uuid4()) for _ in range(number)]
    return {"keys": [{"key_ID": i, "key": base64.b64encode(os.urandom(size // 8)).decode()}
                     for i in ids]}


def _reshape(doc: dict[str, Any], name: str) -> None:
    keys = doc.get("keys")
    if not keys:
        return
    first = keys[0]
    material = base64.b64decode(first["key"])
    if name == "drop-last":
        keys.pop()
    elif name == "duplicate-first":
        keys.append(dict(first))
    elif name == "extra-key":
        keys.append({"key_ID": str(uuid.uuid4()), "key": first["key"]})
    elif name == "short-key":
        first["key"] = base64.b64encode(material[:-1]).decode()
    elif name == "long-key":
        first["key"] = base64.b64encode(material + b"\0").decode()
    elif name == "reverse":
        keys.reverse()
    elif name == "upper-ids":
        for k in keys:
            k["key_ID"] = k["key_ID"].upper()
    elif name == "new-ids":
        for k in keys:
            k["key_ID"] = str(uuid.uuid4())


def _child(node: Any, name: str) -> Any:
    if isinstance(node, dict):
        return node.get(name)
    if isinstance(node, list) and name.isdigit() and int(name) < len(node):
        return node[int(name)]
    return None


def _dump(doc: dict[str, Any], mutations: tuple[tuple[str, str], ...]) -> bytes:
    """DOC as JSON with each (target, raw JSON text) written in as is. A target is a dotted
    path into DOC, or else the name of a new member; a path that leads nowhere is skipped."""
    raws = {}
    for n, (target, raw) in enumerate(mutations):
        marker = f"@@RAW{n}@@"
        raws[marker] = raw
        path = target.split(".") if target in KNOWN_TARGETS else [target]
        node: Any = doc
        for name in path[:-1]:
            node = _child(node, name)
        if isinstance(node, dict):
            node[path[-1]] = marker
        elif _child(node, path[-1]) is not None:
            node[int(path[-1])] = marker
    text = json.dumps(doc)
    for marker, raw in raws.items():
        text = text.replace(f'"{marker}"', raw)
    return text.encode("utf-8", "surrogatepass")


HEADER_VALUES = st.text(st.characters(exclude_characters="\r\n"), max_size=40)


def rarely(strategy: st.SearchStrategy[Any], usual: Any) -> st.SearchStrategy[Any]:
    """USUAL nine times in ten, else STRATEGY: slow answers cost the run their timeouts."""
    return st.integers(0, 9).flatmap(lambda n: strategy if n == 0 else st.just(usual))


plans = st.builds(
    Plan,
    status=st.just(200) | st.sampled_from([400, 401, 503, 301, 302, 307, 308, 204, 404, 500])
    | st.integers(100, 999),
    body=st.sampled_from(["valid", "valid", "error", "bytes"]),
    mutations=st.lists(st.tuples(TARGETS, RAW_VALUES), max_size=3).map(tuple),
    reshapes=st.lists(st.sampled_from(RESHAPES), max_size=2).map(tuple),
    raw=st.binary(max_size=64),
    cut=rarely(st.integers(0, 400), None),
    headers=st.lists(st.tuples(
        st.sampled_from(["Content-Type", "Location", "Content-Encoding", "Transfer-Encoding",
                         "Content-Length", "Connection", "X-Vendor"]),
        st.sampled_from(["application/json", "text/html", "gzip", "chunked", "close",
                         "http://127.0.0.1:9/x", "0", "-1", "99999999999999999999"])
        | HEADER_VALUES), max_size=3).map(tuple),
    length=rarely(st.none() | st.integers(0, 2000), TRUE_LENGTH),
    truncate=rarely(st.integers(0, 600), None),
    close=st.booleans(),
    delay=rarely(st.floats(0.0, 0.6), 0.0),
    trickle=rarely(st.floats(0.002, 0.05), 0.0),
)

