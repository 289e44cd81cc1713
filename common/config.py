"""Loading YAML configuration into pydantic models, with errors that name the file, the field
and the line.

Shared by the simulator's and the gateway's configuration (the gateway imports it; this
package imports nothing of the gateway). A configuration file is small, plain YAML: the
loader refuses what only an attacker or a slip would write, before anything expands or
recurses on it: files over MAX_CONFIG_BYTES, text that is not UTF-8, nesting deeper than
MAX_DEPTH, more than MAX_VALUES values with aliases expanded (a 2 KB alias bomb stands for
gigabytes), duplicate keys (YAML would keep the last one silently). Models built on
`ConfigModel` refuse unknown fields, NaN and infinities (YAML's `.nan`, `.inf`).
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Annotated, Any, NamedTuple, TypeVar

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
)

M = TypeVar("M", bound=BaseModel)

#: A site's configuration is a few KB; a hub's grows ~150 bytes per link (1.6 MB for the
#: 10,000 links of bench/fleet.py). This leaves room for 20,000 links of ~800 bytes each.
MAX_CONFIG_BYTES = 16 << 20
#: Nesting levels (mappings and lists, the top level counting as one): the deepest real
#: configuration (a strongSwan connection's CHILD SA traffic selectors) has nine.
MAX_DEPTH = 64
#: Values (scalars, lists and mappings) in one file, an alias counting as all it stands for:
#: 20,000 links of 50 values each (a link of bench/fleet.py has 12).
MAX_VALUES = 1_000_000
#: No duration in any configuration is longer than a year.
MAX_SECONDS = 365 * 24 * 3600

Loc = tuple[int | str, ...]


class ConfigError(Exception):
    """A configuration file that cannot be used; the message names the file and the field."""


class ConfigModel(BaseModel):
    """A section of a configuration file: unknown fields are errors, values immutable, and no
    number NaN or infinite (a NaN compares false with everything, an infinite lifetime
    never expires)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


#: A duration in seconds: positive, at most MAX_SECONDS.
Seconds = Annotated[float, Field(gt=0, le=MAX_SECONDS)]


class _Refused(yaml.MarkedYAMLError):
    """Valid YAML that a configuration file must not contain."""


#: libyaml's C parser when PyYAML has it (five times faster on a hub's 10,000 links), its
#: pure-Python one otherwise; either composes the node graph, which is checked before a
#: value is built from it.
_Base: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_ANCHOR = re.compile(r"&([^\s,\[\]{}]+)")


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


class _Loader(_Base):  # type: ignore[valid-type,misc]
    """PyYAML's safe loader, refusing deep nesting, too many values and duplicate keys, and
    keeping the line of every mapping key and list item (for validation errors)."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text
        #: id() of each mapping or list built -> its keys or indexes -> their lines
        self.lines: dict[int, dict[Any, int]] = {}

    def get_single_data(self) -> Any:
        try:
            node = self.get_single_node()
        except yaml.MarkedYAMLError as e:
            if e.problem and "maximum nesting depth" in e.problem:  # libyaml's own, 1000
                raise _Refused(None, None, f"nested deeper than {MAX_DEPTH} levels",
                               e.problem_mark) from None
            raise
        if node is None:
            return None
        self._check(node)
        return self.construct_document(node)

    def _anchor(self, node: yaml.Node) -> str:
        """The anchor NODE was written with (its mark points at it), for messages."""
        m = _ANCHOR.match(self.text, node.start_mark.index)
        return f"*{m.group(1)}" if m else "an alias"

    def _check(self, root: yaml.Node) -> None:
        """Refuse a graph that nests deeper than MAX_DEPTH or stands for more than MAX_VALUES
        values, counted with every alias expanded as whatever reads the configuration would
        expand it, or that contains itself. Linear in the nodes: what an alias stands for
        is counted once (`extent`), however often it is used."""
        extent: dict[int, tuple[int, int]] = {}  # id(node) -> (values, levels)
        on_path: set[int] = set()
        stack: list[tuple[yaml.Node, bool]] = [(root, False)]
        while stack:  # post-order, without recursion
            node, done = stack.pop()
            if done:
                on_path.discard(id(node))
                kids = _children(node)
                extent[id(node)] = (1 + sum(extent[id(c)][0] for c in kids),
                                    1 + max((extent[id(c)][1] for c in kids), default=0))
                continue
            if id(node) in extent:
                continue
            on_path.add(id(node))
            stack.append((node, True))
            for child in _children(node):
                if id(child) in on_path:
                    raise _Refused(None, None, f"alias {self._anchor(child)} stands for a"
                                   " value that contains it", child.start_mark)
                if id(child) not in extent:
                    stack.append((child, False))
        # In document order: the first place where the count or the depth goes over.
        values = 0
        seen: set[int] = set()
        walk: list[tuple[yaml.Node, int, yaml.Node]] = [(root, 1, root)]
        while walk:
            node, depth, where = walk.pop()
            if id(node) in seen:  # an alias: all it stands for, here
                count, levels = extent[id(node)]
                if depth - 1 + levels > MAX_DEPTH:
                    raise _Refused(None, None, f"alias {self._anchor(node)} nests deeper than"
                                   f" {MAX_DEPTH} levels", where.start_mark)
                values += count
            else:
                where = node
                seen.add(id(node))
                if depth > MAX_DEPTH:
                    raise _Refused(None, None, f"nested deeper than {MAX_DEPTH} levels",
                                   node.start_mark)
                values += 1
                previous = node
                pending = []
                for child in _children(node):
                    pending.append((child, depth + 1, previous))
                    previous = child  # (an alias is placed by what comes before it)
                walk.extend(reversed(pending))
            if values > MAX_VALUES:
                raise _Refused(None, None, f"more than {MAX_VALUES} values (each alias"
                               " counted as the values it stands for)", where.start_mark)

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            data = super().construct_object(node, deep)
        except (ValueError, OverflowError) as e:  # e.g. an integer of 5000 digits
            raise _Refused(None, None, str(e), node.start_mark) from None
        if isinstance(node, yaml.MappingNode) and isinstance(data, dict):
            self.lines[id(data)] = {k.value: k.start_mark.line + 1 for k, _ in node.value
                                    if isinstance(k, yaml.ScalarNode)}
        elif isinstance(node, yaml.SequenceNode) and isinstance(data, list):
            self.lines[id(data)] = {i: n.start_mark.line + 1 for i, n in enumerate(node.value)}
        return data

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False
                          ) -> dict[Hashable, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, Hashable):
                    continue  # the base class says so
                if key in seen:
                    raise _Refused(None, None, f"duplicate key {key!r} (first on line"
                                   f" {seen[key]})", key_node.start_mark)
                seen[key] = key_node.start_mark.line + 1
        mapping: dict[Hashable, Any] = super().construct_mapping(node, deep)
        return mapping

    def line_of(self, data: Any, loc: Loc) -> int | None:
        """The line of the last part of LOC found in DATA (parts not in the file, such as a
        union member's name, are skipped)."""
        line = None
        for part in loc:
            lines = self.lines.get(id(data), {})
            if part in lines:
                try:
                    data = data[part]
                except (LookupError, TypeError):  # a key written as 1, looked up as "1"
                    break
                line = lines[part]
        return line


def _yaml_problem(e: yaml.YAMLError) -> str:
    if not isinstance(e, yaml.MarkedYAMLError) or e.problem_mark is None:
        return str(e)
    mark = e.problem_mark
    context = f" ({e.context})" if e.context else ""
    what = "" if isinstance(e, _Refused) else "not valid YAML: "
    return f"{what}line {mark.line + 1}, column {mark.column + 1}: {e.problem}{context}"


def read_config_bytes(path: Path) -> bytes:
    """PATH's bytes (at most MAX_CONFIG_BYTES + 1: what is longer is refused anyway)."""
    try:
        with path.open("rb") as f:
            return f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None


def _read_yaml(path: Path, raw: bytes | None = None) -> tuple[Any, Callable[[Loc], int | None]]:
    """PATH's content (RAW if given: the bytes already read from it), and where in it each
    location is: its line, if known.

    Raises ConfigError naming the file (and the line or byte) for everything refused."""
    if raw is None:
        raw = read_config_bytes(path)
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes: not a configuration"
                          " file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{path}: not UTF-8 text: line {line}, byte offset {e.start}:"
                          f" {e.reason}") from None
    loader = _Loader(text)
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: {_yaml_problem(e)}") from None
    finally:
        loader.dispose()
    return data, lambda loc: loader.line_of(data, loc)


class HostPort(NamedTuple):
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def _parse_host_port(value: Any) -> HostPort:
    if isinstance(value, HostPort):
        return value
    if not isinstance(value, str):
        raise ValueError("must be a string 'HOST:PORT' (IPv6 as '[ADDR]:PORT')")
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
    else:
        host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r} is not 'HOST:PORT' with a port from 1 to 65535")
    return HostPort(host, int(port))


Address = Annotated[HostPort, BeforeValidator(_parse_host_port)]


#: (field, tag) pairs of tagged unions whose tag an error's location leaves out: the field
#: is one thing to the operator, whichever model checks it (`kms.url`, not `kms.etsi014.url`).
#: Sinks keep theirs: `sinks.0.file.path` names the sink's type.
UNTAGGED: set[tuple[str, str]] = set()


def _untagged(loc: Loc) -> Loc:
    return tuple(p for i, p in enumerate(loc)
                 if not (i and (str(loc[i - 1]), str(p)) in UNTAGGED))


def format_validation_error(source: str, error: ValidationError,
                            line_of: Callable[[Loc], int | None] = lambda loc: None) -> str:
    lines = [f"{source}: {error.error_count()} problem(s)"]
    for e in error.errors(include_url=False):
        loc = _untagged(e["loc"])
        where = ".".join(str(p) for p in loc) or "(top level)"
        line = line_of(loc)
        if line is not None:
            where = f"line {line}: {where}"
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"  {where}: {msg}")
    return "\n".join(lines)


def load_yaml_model(path: Path, model: type[M], raw: bytes | None = None) -> M:
    """Read PATH as YAML and validate it as MODEL; relative paths inside resolve next to it.
    RAW: PATH's bytes, read by the caller (who hashes what was validated, not a later copy)."""
    data, line_of = _read_yaml(path, raw)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        return model.model_validate(data, context={"base_dir": path.parent.resolve()})
    except ValidationError as e:
        raise ConfigError(format_validation_error(str(path), e, line_of)) from None


def resolve_path(value: Any, context: Any) -> Any:
    """Resolve a relative path against the directory of the file being loaded."""
    if isinstance(value, str) and isinstance(context, dict) and "base_dir" in context:
        p = Path(value)
        return str(p if p.is_absolute() else context["base_dir"] / p)
    return value


def check_secret_file(path: Path) -> None:
    """Refuse a private key file that others can read: secrets are 0600."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"{path}: private key is accessible to group or others (mode {mode & 0o777:o});"
            f" run: chmod 600 {path}"
        )


def _resolve(value: Any, info: ValidationInfo) -> Any:
    return resolve_path(value, info.context)


#: A path in a config file; relative paths are relative to that file.
FilePath = Annotated[Path, BeforeValidator(_resolve)]
