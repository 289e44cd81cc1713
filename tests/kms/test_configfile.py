"""The YAML loader every configuration goes through: what it refuses before pydantic sees a
value, and that each refusal names the file and the line."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict

from common.config import (
    MAX_CONFIG_BYTES,
    MAX_DEPTH,
    MAX_VALUES,
    ConfigError,
    load_yaml_model,
)


class Anything(BaseModel):
    model_config = ConfigDict(extra="allow")


def load(tmp_path: Path, text: str | bytes) -> Anything:
    path = tmp_path / "c.yaml"
    if isinstance(text, str):
        path.write_text(text)
    else:
        path.write_bytes(text)
    return load_yaml_model(path, Anything)


def refused(tmp_path: Path, text: str | bytes) -> str:
    with pytest.raises(ConfigError) as e:
        load(tmp_path, text)
    assert str(tmp_path / "c.yaml") in str(e.value)
    return str(e.value)


def test_nesting_up_to_the_limit_loads(tmp_path: Path) -> None:
    depth = MAX_DEPTH - 1  # the top-level mapping is one level
    loaded = load(tmp_path, "a: " + "[" * depth + "]" * depth + "\n")
    assert loaded.model_extra is not None  # extra="allow": the undeclared key lands here
    assert loaded.model_extra["a"] is not None


@pytest.mark.parametrize("depth", [MAX_DEPTH, 5_000, 200_000])
def test_deeper_nesting_is_refused_naming_the_line(tmp_path: Path, depth: int) -> None:
    text = "a: 1\nb:\n  c: " + "[" * depth + "]" * depth + "\n"
    message = refused(tmp_path, text)
    assert f"nested deeper than {MAX_DEPTH} levels" in message
    assert "line 3" in message


def test_aliases_and_merge_keys_load(tmp_path: Path) -> None:
    c = load(tmp_path, "a: &x [1, 2]\nb: *x\nbase: &b {x: 1}\nderived:\n  <<: *b\n  y: 2\n")
    assert (c.b, c.derived) == ([1, 2], {"x": 1, "y": 2})  # type: ignore[attr-defined]


def bomb(levels: int, width: int = 9) -> str:
    lines = ["l0: &l0 {" + ", ".join(f"k{j}: lol" for j in range(width)) + "}"]
    lines += [f"l{i}: &l{i} {{" + ", ".join(f"k{j}: *l{i - 1}" for j in range(width)) + "}"
              for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_is_refused_at_once(tmp_path: Path) -> None:
    start = time.monotonic()
    message = refused(tmp_path, bomb(40))
    assert time.monotonic() - start < 1
    assert f"more than {MAX_VALUES} values (each alias counted as" in message
    assert "line 6" in message  # l5: 9 keys and 9 values of 132 859 each
    assert load(tmp_path, bomb(5))  # 9**5: fine


def test_a_recursive_alias_is_refused(tmp_path: Path) -> None:
    assert "alias *x stands for a value that contains it" in refused(tmp_path, "a: &x [*x]\n")


def test_an_alias_cannot_nest_deeper_than_the_limit(tmp_path: Path) -> None:
    half = MAX_DEPTH // 2
    deep = "a: &x " + "[" * half + "]" * half + "\n"
    assert load(tmp_path, deep + "b: *x\n")
    message = refused(tmp_path, deep + "b: " + "[" * half + "*x" + "]" * half + "\n")
    assert f"alias *x nests deeper than {MAX_DEPTH} levels" in message
    assert "line 2" in message


@pytest.mark.parametrize(("text", "key", "line"), [
    ("site: a\nsite: b\n", "site", 2),
    ("policy:\n  interval: 5\n  grace: 1\n  interval: 6\n", "interval", 4),
    ("links:\n  - {name: a, name: b}\n", "name", 2),
])
def test_duplicate_keys_are_refused_naming_key_and_line(tmp_path: Path, text: str, key: str,
                                                       line: int) -> None:
    message = refused(tmp_path, text)
    assert f"duplicate key {key!r}" in message
    assert f"line {line}" in message


def test_not_utf8_names_the_file_line_and_byte(tmp_path: Path) -> None:
    message = refused(tmp_path, b"site: a\nname: caf\xe9\n")
    assert "not UTF-8" in message
    assert "line 2" in message
    assert "byte offset 17" in message


def test_a_hubs_file_of_several_mib_loads(tmp_path: Path) -> None:
    """A hub of 20,000 links is well over a MiB (the old limit) and far under the values'."""
    links = "".join(f"- {{name: l{i}, peer: {{address: 127.0.0.1:4000, name: gw-{i % 7},"
                    f" sae_id: sae-{i % 7}}}, sinks: [{{type: file, path: k/l{i}.psk}}]}}\n"
                    for i in range(20_000))
    text = "site: hub\nlinks:\n" + links
    assert len(text) > 2 << 20
    start = time.monotonic()
    loaded = load(tmp_path, text)
    took = time.monotonic() - start
    assert loaded.model_extra is not None
    assert len(loaded.model_extra["links"]) == 20_000
    assert loaded.model_extra["links"][-1]["peer"]["sae_id"] == "sae-0"  # 19,999 mod 7
    print(f"20,000 links, {len(text) >> 10} KiB: loaded in {took:.2f} s")


def test_a_file_too_large_is_refused_before_parsing(tmp_path: Path) -> None:
    message = refused(tmp_path, "a: 1\n" + "#" * MAX_CONFIG_BYTES + "\n")
    assert f"larger than {MAX_CONFIG_BYTES} bytes" in message


def test_an_integer_too_long_to_parse_is_a_config_error(tmp_path: Path) -> None:
    message = refused(tmp_path, "a: 1\nb: " + "9" * 5000 + "\n")
    assert "line 2" in message


def test_yaml_errors_name_the_file_and_line(tmp_path: Path) -> None:
    message = refused(tmp_path, "a: 1\nb: [\n")
    assert "not valid YAML" in message
    assert "line 3" in message


def test_validation_errors_name_the_line(tmp_path: Path) -> None:
    class Model(BaseModel):
        model_config = ConfigDict(extra="forbid")
        a: int
        items: list[dict[str, int]]

    path = tmp_path / "c.yaml"
    path.write_text("a: 1\nitems:\n  - {x: 1}\n  - {x: one}\n")
    with pytest.raises(ConfigError) as e:
        load_yaml_model(path, Model)
    assert "line 4: items.1.x: Input should be a valid integer" in str(e.value)
