"""Adapter configs: the frozen dataclass base, unions, and resolving what users pass as
``config=`` (an object, a dict, a preset string such as ``"lora[r=16, alpha=32]"``, a union
``"a|b"`` or a JSON file) through the presets that installed plugins register.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from .errors import ConfigError, MethodNotInstalledError
from .registry.catalog import catalog

T = TypeVar("T", bound="AdapterConfig")


@dataclass(frozen=True)
class AdapterConfig:
    """Base of every method's config. Subclasses are frozen dataclasses that set ``method``.

    Example::

        @dataclass(frozen=True)
        class MyConfig(AdapterConfig):
            method: ClassVar[str] = "my_method"
            size: int = 4
    """

    method: ClassVar[str] = ""

    def replace(self: T, **changes: Any) -> T:
        """A copy with ``changes`` applied (unknown fields raise `ConfigError`)."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ConfigError(
                f"{type(self).__name__} has no option(s) {unknown}; options: {sorted(known)}"
            )
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict of every field plus ``"method"``."""
        data = {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return {"method": self.method, "config_class": type(self).__name__, **data}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AdapterConfig:
        """Build a config from ``to_dict`` output. Called on the base class, the ``"method"``
        key picks the installed plugin's config class."""
        data = dict(data)
        method = data.pop("method", None) or data.pop("architecture", None)
        class_name = data.pop("config_class", None)
        target: type[AdapterConfig] = cls
        if cls is AdapterConfig or (method and method != cls.method):
            if not method:
                raise ConfigError(f"config dict has no 'method' key: {data!r}")
            registry = catalog()
            target = registry.config_class_for_method(method)
            # Keep the saved class (IA3Config, not its base LoRAConfig) when it is installed.
            named = registry.config_class_named(class_name) if class_name else None
            if named is not None and named.method == method:
                target = named
        if target is ConfigUnion:
            parts = data.get("configs", [])
            if not isinstance(parts, list | tuple) or not all(
                isinstance(p, Mapping) for p in parts
            ):
                raise ConfigError(
                    f"a union config's 'configs' must be a list of config dicts; got {parts!r}"
                )
            return ConfigUnion(*[AdapterConfig.from_dict(c) for c in parts])
        return target._from_fields(data)

    @classmethod
    def _from_fields(cls: type[T], data: Mapping[str, Any]) -> T:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ConfigError(
                f"{cls.__name__} has no option(s) {unknown}; options: {sorted(fields)}"
            )
        values = {k: _from_json(fields[k], v) for k, v in data.items()}
        try:
            return cls(**values)
        except (TypeError, ValueError, OverflowError) as error:  # a plugin's check that raised
            raise ConfigError(f"invalid options for {cls.__name__}: {error}") from None

    def to_json(self) -> str:
        """``to_dict`` as a JSON string."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


class ConfigUnion(AdapterConfig):
    """Several methods' configs under one adapter name, e.g. ``ConfigUnion(LoRAConfig(),
    LoReftConfig())`` or the string ``"lora|loreft"``. Each part must be a different method."""

    method: ClassVar[str] = "union"

    def __init__(self, *configs: AdapterConfig) -> None:
        if len(configs) < 2:
            raise ConfigError("ConfigUnion needs at least two configs")
        methods = [c.method for c in configs]
        if any(isinstance(c, ConfigUnion) for c in configs):
            raise ConfigError("ConfigUnion cannot contain another ConfigUnion")
        if len(set(methods)) != len(methods):
            raise ConfigError(f"ConfigUnion parts must be different methods; got {methods}")
        object.__setattr__(self, "configs", tuple(configs))

    configs: tuple[AdapterConfig, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "configs": [c.to_dict() for c in self.configs]}

    def replace(self, **changes: Any) -> ConfigUnion:
        raise ConfigError(
            "replace() a part of a ConfigUnion instead: union.configs[i].replace(...)"
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ConfigUnion) and self.configs == other.configs

    def __hash__(self) -> int:
        return hash(self.configs)

    def __repr__(self) -> str:
        return f"ConfigUnion({', '.join(repr(c) for c in self.configs)})"


def config_parts(config: AdapterConfig) -> tuple[AdapterConfig, ...]:
    """The single-method configs inside ``config`` (itself unless it is a union)."""
    return config.configs if isinstance(config, ConfigUnion) else (config,)


def resolve_config(config: Any) -> AdapterConfig:
    """Turn what a user passes as ``config=`` into a config object.

    Accepts a config object, a dict (``to_dict`` output), a preset name with optional overrides
    (``"lora[r=16, attn_matrices=['q','v']]"``; values are Python literals, parsed without
    ``eval``), a union ``"lora|loreft"``, or the path of a JSON file.
    """
    return check_config_values(_resolve(config))


def _resolve(config: Any) -> AdapterConfig:
    if isinstance(config, AdapterConfig):
        return config
    if isinstance(config, Mapping):
        check_json_values(config, "config dict")
        return AdapterConfig.from_dict(config)
    if isinstance(config, os.PathLike) or (isinstance(config, str) and config.endswith(".json")):
        path = os.fspath(config)
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path!r} does not exist")
        data = load_json_strict(path, error=ConfigError)
        if not isinstance(data, Mapping):
            raise ConfigError(f"config file {path!r} does not hold a JSON object")
        if "config" in data and isinstance(data["config"], Mapping):
            data = data["config"]
        return AdapterConfig.from_dict(data)
    if not isinstance(config, str):
        raise ConfigError(
            f"config must be a config object, dict, preset string or JSON path; got "
            f"{type(config).__name__}"
        )
    parts = _split_top_level(config, "|")
    if len(parts) > 1:
        return ConfigUnion(*[_resolve(p) for p in parts])
    name, overrides = parse_config_string(config)
    registry = catalog()
    preset = registry.presets.get(name)
    if preset is None:
        raise registry.missing_config_error(name)
    try:
        return preset.replace(**overrides) if overrides else preset
    except (TypeError, ValueError, OverflowError) as error:
        raise ConfigError(f"invalid options for {name!r}: {error}") from None


#: The longest config string accepted (a real one is a few dozen characters).
MAX_CONFIG_STRING = 10_000


def parse_config_string(text: str) -> tuple[str, dict[str, Any]]:
    """``"lora[r=16, alpha=32]"`` → ``("lora", {"r": 16, "alpha": 32})``; literals only."""
    if len(text) > MAX_CONFIG_STRING:
        raise ConfigError(
            f"config string of {len(text)} characters ({text[:40]!r}...); at most "
            f"{MAX_CONFIG_STRING} are accepted"
        )
    text = text.strip()
    if "[" not in text:
        if not text.replace("_", "").replace("-", "").replace("+", "").isalnum():
            raise ConfigError(f"invalid config name {text!r}")
        return text, {}
    if not text.endswith("]"):
        raise ConfigError(f"config string {text!r} must end with ']' (e.g. 'lora[r=16]')")
    name, inner = text[: text.index("[")].strip(), text[text.index("[") + 1 : -1]
    try:
        call = ast.parse(f"f({inner})", mode="eval").body
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        raise ConfigError(
            f"cannot parse options {inner!r} of {name!r}; write key=value pairs with Python "
            "literal values, e.g. lora[r=16, attn_matrices=['q','v']]"
        ) from None
    if not isinstance(call, ast.Call) or not (
        isinstance(call.func, ast.Name) and call.func.id == "f"
    ):
        raise ConfigError(
            f"cannot parse options {inner!r} of {name!r}; write key=value pairs, e.g. lora[r=16]"
        )
    if call.args or any(k.arg is None for k in call.keywords):
        raise ConfigError(f"options of {name!r} must all be key=value pairs: {inner!r}")
    values: dict[str, Any] = {}
    for keyword in call.keywords:
        if keyword.arg in values:
            raise ConfigError(
                f"option {keyword.arg}= is given twice in {text!r}; give each option once"
            )
        try:
            values[keyword.arg] = ast.literal_eval(keyword.value)  # type: ignore[index]
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            raise ConfigError(
                f"option {keyword.arg}= of {name!r} is not a literal (numbers, strings, lists, "
                "True/False/None only)"
            ) from None
        check_json_values(values[keyword.arg], f"option {keyword.arg}= of {text!r}")
    return name, values


def _split_top_level(text: str, sep: str) -> list[str]:
    parts, depth, quote, current = [], 0, None, []
    for char in text:
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[(":
            depth += 1
        elif char in "])":
            depth -= 1
        elif char == sep and depth == 0:
            parts.append("".join(current).strip())
            current = []
            continue
        current.append(char)
    parts.append("".join(current).strip())
    return [p for p in parts if p]


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, AdapterConfig):
        return value.to_dict()
    if hasattr(value, "is_floating_point") or type(value).__module__ == "torch":
        return str(value)
    return value


def _from_json(field: dataclasses.Field, value: Any) -> Any:
    # Lists come back from JSON where the dataclass may use tuples; keep the declared shape.
    default = field.default if field.default is not dataclasses.MISSING else None
    if isinstance(value, list) and isinstance(default, tuple):
        return tuple(value)
    return value


def make_missing_error(name: str, hint: str | None, known: list[str]) -> Exception:
    """The error for a preset or method no installed plugin provides."""
    if hint:
        return MethodNotInstalledError(
            f"config {name!r} needs the {hint} package, which is not installed: pip install {hint}"
        )
    return ConfigError(
        f"unknown adapter config {name!r}; installed presets: {', '.join(sorted(known)) or '(none)'}"
    )


# ---------------------------------------------------------------------------------------------
# values: finite numbers only, each key once
# ---------------------------------------------------------------------------------------------


def check_json_values(value: Any, where: str, error: type[Exception] = ConfigError) -> None:
    """Raise ``error`` if ``value`` (a config value, dict or list, recursively) holds a
    non-finite number (NaN, inf: they give NaN outputs) or a complex number."""
    if isinstance(value, bool):
        return
    if isinstance(value, float | complex) and not (
        isinstance(value, float) and math.isfinite(value)
    ):
        raise error(f"{where} holds {value!r}; numbers in configs must be finite real numbers")
    if isinstance(value, Mapping):
        for key, item in value.items():
            check_json_values(item, f"{where}[{key!r}]", error)
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            check_json_values(item, f"{where}[{i}]", error)


def check_config_values(config: AdapterConfig) -> AdapterConfig:
    """``config`` itself, after checking that every field holds finite numbers only (from any
    source: objects, dicts, strings, files, foreign checkpoints); else `ConfigError`."""
    for part in config_parts(config):
        if dataclasses.is_dataclass(part):
            for f in dataclasses.fields(part):
                check_json_values(
                    getattr(part, f.name), f"{type(part).__name__}.{f.name}", ConfigError
                )
    return config


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _refuse_constant(name: str) -> Any:
    raise _NonFinite(name)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NonFinite(text)
    return value


class _NonFinite(ValueError):
    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


def parse_json_strict(text: str, source: str, error: type[Exception] = ConfigError) -> Any:
    """``json.loads(text)`` refusing duplicate keys and non-finite numbers (``NaN``,
    ``Infinity``, ``1e999``) with ``error`` naming ``source`` and the key or value."""
    try:
        return json.loads(
            text,
            object_pairs_hook=_unique_keys,
            parse_constant=_refuse_constant,
            parse_float=_finite_float,
        )
    except _DuplicateKey as dup:
        raise error(
            f"{source}: key {dup.key!r} appears twice in one JSON object; keep one"
        ) from None
    except _NonFinite as bad:
        raise error(
            f"{source}: the number {bad.text} is not finite; configs hold finite numbers only"
        ) from None
    except json.JSONDecodeError as bad:
        raise error(f"{source} is not valid JSON: {bad}") from None
    except RecursionError:
        raise error(f"{source} nests JSON arrays or objects too deeply to be a config") from None


#: The largest JSON file read (configs, manifests, indexes are a few kilobytes).
MAX_JSON_BYTES = 64 << 20


def load_json_strict(path: str, error: type[Exception] = ConfigError) -> Any:
    """The JSON value in file ``path`` (see `parse_json_strict`); unreadable files (not a
    regular file, larger than `MAX_JSON_BYTES`) and malformed JSON raise ``error`` naming the
    file."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO cannot block
        with os.fdopen(fd, "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise error(f"cannot read {path!r}: not a regular file")
            if info.st_size > MAX_JSON_BYTES:
                raise error(
                    f"cannot read {path!r}: {info.st_size} bytes, more than a JSON file of ours "
                    f"holds ({MAX_JSON_BYTES})"
                )
            text = f.read(MAX_JSON_BYTES + 1).decode("utf-8")
    except (OSError, UnicodeDecodeError) as bad:
        raise error(f"cannot read {path!r}: {bad}") from None
    return parse_json_strict(text, repr(path), error)
