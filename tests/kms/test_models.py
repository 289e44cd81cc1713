"""ETSI GS QKD 014 v1.1.1 §6 models: the spec's examples, strictness, hostile input."""

from __future__ import annotations

import base64
import contextlib
import json
import uuid
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from kms.models import (
    Error,
    Expect,
    KeyContainer,
    KeyIds,
    KeyRequest,
    QkdKey,
    Status,
)

# The examples of GS QKD 014 V1.1.1 §6.1–§6.4, as printed in the spec.
SPEC_STATUS = {
    "source_KME_ID": "AAAABBBBCCCCDDDD",
    "target_KME_ID": "EEEEFFFFGGGGHHHH",
    "master_SAE_ID": "IIIIJJJJKKKKLLLL",
    "slave_SAE_ID": "MMMMNNNNOOOOPPPP",
    "key_size": 352,
    "stored_key_count": 25000,
    "max_key_count": 100000,
    "max_key_per_request": 128,
    "max_key_size": 1024,
    "min_key_size": 64,
    "max_SAE_ID_count": 0,
}
SPEC_KEY_REQUEST = {
    "number": 3,
    "size": 1024,
    "additional_slave_SAE_IDs": ["ABCDEFGHIJKLMNOP", "QRSTUVWXYZ123456"],
    "extension_mandatory": [{"abc_route_type": "direct"}, {"abc_transfer_method": "qkd"}],
    "extension_optional": [{"abc_max_age": 30000}],
}
SPEC_KEY_CONTAINER = {
    "keys": [
        {"key_ID": "bc490419-7d60-487f-adc1-4ddcc177c139",
         "key": "wHHVxRwDJs3/bXd38GHP3oe4svTuRpZS0yCC7x4Ly+s="},
        {"key_ID": "0a782fb5-3434-48fe-aa4d-14f41d46cf92",
         "key": "OeGMPxh1+2RpJpNCYixWHFLYRubpOKCw94FcCI7VdJA="},
    ]
}
SPEC_KEY_IDS = {
    "key_IDs": [
        {"key_ID": "bc490419-7d60-487f-adc1-4ddcc177c139"},
        {"key_ID": "0a782fb5-3434-48fe-aa4d-14f41d46cf92"},
    ]
}

KEY_B64 = SPEC_KEY_CONTAINER["keys"][0]["key"]


def test_spec_examples_parse_and_round_trip() -> None:
    for model, example in ((Status, SPEC_STATUS), (KeyRequest, SPEC_KEY_REQUEST),
                           (KeyContainer, SPEC_KEY_CONTAINER), (KeyIds, SPEC_KEY_IDS)):
        parsed = model.model_validate_json(json.dumps(example))
        assert parsed.model_dump(mode="json", exclude_none=True) == example
        assert parsed.unknown_fields() == []


def test_spec_container_keys_are_256_bits() -> None:
    c = KeyContainer.model_validate(SPEC_KEY_CONTAINER, context=Expect(size_bits=256, count=2))
    assert [len(k.material) for k in c.keys] == [32, 32]
    with pytest.raises(ValidationError, match="256 bits, 1024 requested"):
        KeyContainer.model_validate(SPEC_KEY_CONTAINER, context=Expect(size_bits=1024))
    with pytest.raises(ValidationError, match="2 keys delivered, 3 requested"):
        KeyContainer.model_validate(SPEC_KEY_CONTAINER, context=Expect(count=3))
    with pytest.raises(ValidationError, match="differ from the requested"):
        KeyContainer.model_validate(SPEC_KEY_CONTAINER,
                                    context=Expect(key_ids=(str(uuid.uuid4()),)))


def test_extensions_are_kept() -> None:
    data = {**SPEC_STATUS, "status_extension": {"qber": 0.02, "vendor": {"x": [1, 2]}}}
    assert Status.model_validate(data).status_extension == {"qber": 0.02, "vendor": {"x": [1, 2]}}
    key = {"key_ID": str(uuid.uuid4()), "key": KEY_B64, "key_ID_extension": {"a": 1},
           "key_extension": {"b": 2}}
    c = KeyContainer.model_validate({"keys": [key], "key_container_extension": {"c": 3}})
    q = QkdKey.from_wire(c.keys[0])
    assert (q.key_id_extension, q.key_extension, c.key_container_extension) == \
        ({"a": 1}, {"b": 2}, {"c": 3})


def test_unknown_members_are_named() -> None:
    assert KeyRequest.model_validate({"number": 1, "key_length": 256}).unknown_fields() == \
        ["key_length"]


@pytest.mark.parametrize("bad", [
    "wHHVxRwDJs3/bXd38GHP3oe4svTuRpZS0yCC7x4Ly+s",      # padding missing
    "wHHVxRwDJs3_bXd38GHP3oe4svTuRpZS0yCC7x4Ly-s=",     # URL-safe alphabet
    "wHHVxRwDJs3/bXd38GHP3oe4svTuRpZS0yCC7x4Ly+s=\n",   # trailing newline
    "wHHVxRwDJs3/bXd38GHP 3oe4svTuRpZS0yCC7x4Ly+s=",    # whitespace inside
    "wHHVxRwDJs3/bXd38GHP3oe4svTuRpZS0yCC7x4Ly+t=",     # non-canonical final bits
    "",                                                  # empty key
])
def test_key_must_be_canonical_standard_base64(bad: str) -> None:
    with pytest.raises(ValidationError):
        KeyContainer.model_validate({"keys": [{"key_ID": str(uuid.uuid4()), "key": bad}]})


@pytest.mark.parametrize("bad", ["", "bc490419", "bc490419-7d60-487f-adc1-4ddcc177c13",
                                 "bc490419-7d60-487f-adc1-4ddcc177c139x", "{" + "0" * 36 + "}",
                                 "bc490419_7d60_487f_adc1_4ddcc177c139",
                                 "gc490419-7d60-487f-adc1-4ddcc177c139"])
def test_key_id_must_be_uuid(bad: str) -> None:
    with pytest.raises(ValidationError, match="UUID"):
        KeyIds.model_validate({"key_IDs": [{"key_ID": bad}]})


@pytest.mark.parametrize(("field", "value"), [
    ("key_size", "352"), ("key_size", 352.0), ("key_size", True), ("key_size", 0),
    ("stored_key_count", -1), ("max_key_per_request", None), ("slave_SAE_ID", 7),
    ("min_key_size", 512),  # above key_size
])
def test_status_types_are_strict(field: str, value: Any) -> None:
    with pytest.raises(ValidationError):
        Status.model_validate({**SPEC_STATUS, field: value})


@pytest.mark.parametrize("body", [{"size": 0}, {"size": 12}, {"number": 0}, {"number": "2"},
                                  {"additional_slave_SAE_IDs": "sae-b"}])
def test_key_request_rejects_bad_parameters(body: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        KeyRequest.model_validate(body)


def test_duplicates_rejected() -> None:
    k = SPEC_KEY_CONTAINER["keys"][0]
    with pytest.raises(ValidationError, match="repeats a key_ID"):
        KeyContainer.model_validate({"keys": [k, k]})
    with pytest.raises(ValidationError, match="repeats a key_ID"):
        KeyIds.model_validate({"key_IDs": [SPEC_KEY_IDS["key_IDs"][0]] * 2})


def test_error_requires_message() -> None:
    assert Error.model_validate({"message": "x", "details": [{"a": 1}]}).details == [{"a": 1}]
    with pytest.raises(ValidationError):
        Error.model_validate({"details": []})


def test_secrets_stay_out_of_reprs_and_errors() -> None:
    secret = base64.b64encode(b"\xa5" * 32).decode()
    c = KeyContainer.model_validate({"keys": [{"key_ID": str(uuid.uuid4()), "key": secret}]})
    q = QkdKey.from_wire(c.keys[0])
    for text in (repr(c), str(c), repr(c.keys[0]), repr(q), str(q)):
        assert secret not in text
        assert "a5a5" not in text
    # a rejected container's error shows neither the key nor any input
    for bad in ({"keys": [{"key_ID": "nope", "key": secret}]},
                {"keys": [{"key_ID": str(uuid.uuid4()), "key": secret + "="}]},
                {"keys": [{"key_ID": str(uuid.uuid4()), "key": secret}]}):
        with pytest.raises(ValidationError) as e:
            KeyContainer.model_validate(bad, context=Expect(size_bits=128))
        assert secret[:16] not in str(e.value)
        assert secret[:16] not in repr(e.value)


# -- hostile input: anything parses or is a ValidationError, and what parses is right ------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)


def _plausible_key() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {"key_ID": st.uuids().map(str) | st.text(max_size=40),
         "key": st.binary(min_size=0, max_size=40).map(lambda b: base64.b64encode(b).decode())
         | st.text(max_size=60)},
        optional={"key_ID_extension": json_values, "key_extension": json_values})


containers = st.fixed_dictionaries(
    {"keys": st.lists(_plausible_key(), max_size=4) | json_values},
    optional={"key_container_extension": json_values})


@settings(max_examples=300)
@given(body=containers | json_values, size=st.sampled_from([None, 64, 256]),
       count=st.sampled_from([None, 1, 2]))
def test_hostile_containers_never_yield_a_wrong_key(body: Any, size: int | None,
                                                    count: int | None) -> None:
    raw = json.dumps(body)
    try:
        c = KeyContainer.model_validate_json(raw, context=Expect(size_bits=size, count=count))
    except ValidationError:
        return
    assert c.keys
    assert len({k.key_ID for k in c.keys}) == len(c.keys)
    if count is not None:
        assert len(c.keys) == count
    for k in c.keys:
        uuid.UUID(k.key_ID)
        assert base64.b64encode(k.material).decode() == k.key
        if size is not None:
            assert len(k.material) * 8 == size


@settings(max_examples=300)
@given(body=st.fixed_dictionaries({}, optional={k: json_values | st.integers()
                                               for k in SPEC_STATUS}) | json_values)
def test_hostile_status_parses_or_is_validation_error(body: Any) -> None:
    try:
        s = Status.model_validate_json(json.dumps(body))
    except ValidationError:
        return
    assert s.min_key_size <= s.key_size <= s.max_key_size


@given(st.binary(max_size=200))
def test_arbitrary_bytes_are_validation_errors(raw: bytes) -> None:
    for model in (Status, KeyContainer, KeyIds, KeyRequest, Error):
        with contextlib.suppress(ValidationError):
            model.model_validate_json(raw)


@settings(max_examples=300)
@given(field=st.sampled_from(sorted(SPEC_STATUS)), value=json_values)
def test_status_with_one_field_replaced(field: str, value: Any) -> None:
    try:
        s = Status.model_validate_json(json.dumps({**SPEC_STATUS, field: value}))
    except ValidationError:
        return
    for name, v in s.model_dump().items():
        if name.endswith(("_size", "_count", "_per_request")):
            assert type(v) is int
            assert v >= 0
        elif name.endswith("_ID"):
            assert type(v) is str
            assert v


# -- bounds: every number a KME sends is one the gateway can hold ---------------------------


@pytest.mark.parametrize(("field", "limit"), [
    ("stored_key_count", 2**32 - 1), ("max_key_count", 2**32 - 1),
    ("max_key_per_request", 2**32 - 1), ("max_SAE_ID_count", 2**32 - 1),
    ("max_key_size", 2**20), ("key_size", 2**20),
])
def test_status_counts_and_sizes_are_bounded(field: str, limit: int) -> None:
    big = {**SPEC_STATUS, "max_key_size": 2**20}
    Status.model_validate({**big, field: limit})
    for value in (limit + 1, 10**400):
        with pytest.raises(ValidationError, match=field):
            Status.model_validate_json(json.dumps({**big, field: value}))


@pytest.mark.parametrize("raw", ["NaN", "Infinity", "-Infinity", "1e400", "-1e400",
                                 str(2**53), str(-(2**53)), "1" + "0" * 400])
@pytest.mark.parametrize(("model", "template"), [
    (Status, {**SPEC_STATUS, "status_extension": {"x": ["@"]}}),
    (Status, {**SPEC_STATUS, "vendor": {"x": "@"}}),
    (KeyContainer, {**SPEC_KEY_CONTAINER, "key_container_extension": {"x": "@"}}),
    (KeyContainer, {"keys": [{**SPEC_KEY_CONTAINER["keys"][0], "key_extension": {"x": "@"}}]}),
    (KeyRequest, {"number": 1, "extension_optional": [{"x": "@"}]}),
    (Error, {"message": "m", "details": [{"x": "@"}]}),
])
def test_no_json_number_the_gateway_cannot_hold_anywhere(raw: str, model: type[Any],
                                                         template: dict[str, Any]) -> None:
    """Python's json and pydantic's parser both accept NaN and Infinity, and 1e400 parses as
    infinity: refused wherever it hides, as are integers past ±(2**53 − 1) (RFC 7493)."""
    text = json.dumps(template).replace('"@"', raw)
    with pytest.raises(ValidationError, match=r"finite|2\*\*53"):
        model.model_validate_json(text)
    model.model_validate_json(text.replace(raw, str(2**53 - 1)))


def test_extensions_nested_too_deep_are_refused() -> None:
    deep: Any = 1
    for _ in range(40):
        deep = {"x": deep}
    with pytest.raises(ValidationError, match="deeper than 32"):
        Status.model_validate({**SPEC_STATUS, "status_extension": deep})


def test_status_link_readings() -> None:
    st_ = Status.model_validate({**SPEC_STATUS, "status_extension": {
        "qber": 0.02, "key_rate": 50000, "link_up": False, "link": "qkd-ab"}})
    assert (st_.qber, st_.key_rate, st_.link_up) == (0.02, 50000.0, False)
    assert type(st_.key_rate) is float
    bare = Status.model_validate(SPEC_STATUS)
    assert (bare.qber, bare.key_rate, bare.link_up) == (None, None, None)
    edge = Status.model_validate({**SPEC_STATUS, "status_extension": {
        "qber": 1, "key_rate": 1e12, "link_up": True}})
    assert (edge.qber, edge.key_rate) == (1.0, 1e12)


@pytest.mark.parametrize(("member", "value"), [
    ("qber", -0.01), ("qber", 1.01), ("qber", "0.02"), ("qber", True), ("qber", None),
    ("qber", [0.02]), ("key_rate", -1), ("key_rate", 1.1e12), ("key_rate", False),
    ("key_rate", "fast"), ("link_up", 1), ("link_up", "true"), ("link_up", None),
])
def test_unreadable_link_readings_make_the_status_invalid(member: str, value: Any) -> None:
    """Fail closed: a QBER the gateway cannot read must never pass its QBER gate."""
    with pytest.raises(ValidationError, match=f"(?s)status_extension.*{member}"):
        Status.model_validate({**SPEC_STATUS, "status_extension": {member: value}})


@settings(max_examples=300)
@given(ext=st.dictionaries(st.sampled_from(["qber", "key_rate", "link_up", "other"]),
                           json_values | st.floats() | st.integers(), max_size=4))
def test_link_readings_are_typed_finite_and_in_range(ext: dict[str, Any]) -> None:
    try:
        s = Status.model_validate({**SPEC_STATUS, "status_extension": ext})
    except ValidationError:
        return
    assert s.qber is None or (type(s.qber) is float and 0.0 <= s.qber <= 1.0)
    assert s.key_rate is None or (type(s.key_rate) is float and 0.0 <= s.key_rate <= 1e12)
    assert s.link_up is None or type(s.link_up) is bool
