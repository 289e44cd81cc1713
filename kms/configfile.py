"""Loading YAML configuration into pydantic models, with errors that name the field.

Shared by the simulator's and the gateway's configuration (the gateway imports it; this
package imports nothing of the gateway).
"""

from __future__ import annotations

import ipaddress
import os
import stat
from pathlib import Path
from typing import Annotated, Any, NamedTuple, TypeVar

import yaml
from pydantic import BaseModel, BeforeValidator, ValidationError, ValidationInfo

M = TypeVar("M", bound=BaseModel)


class ConfigError(Exception):
    """A configuration file that cannot be used; the message names the file and the field."""


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


def format_validation_error(source: str, error: ValidationError) -> str:
    lines = [f"{source}: {error.error_count()} problem(s)"]
    for e in error.errors(include_url=False):
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"  {where}: {msg}")
    return "\n".join(lines)


def load_yaml_model(path: Path, model: type[M]) -> M:
    """Read PATH as YAML and validate it as MODEL; relative paths inside resolve next to it."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        return model.model_validate(data, context={"base_dir": path.parent.resolve()})
    except ValidationError as e:
        raise ConfigError(format_validation_error(str(path), e)) from None


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
