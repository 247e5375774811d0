"""Recipe configs: YAML -> dataclass at the edge, with `key=value` overrides from the command line.

A recipe declares its settings as a (possibly nested) dataclass. `load_config(Cls, path, overrides)`
reads the YAML file, applies overrides such as `lr=3e-4` or `loss.kind=reverse_kl` (values parsed
as YAML, so `3e-4` is a float, `true` a bool, `[1, 2]` a list and `null` None), checks every key
and type against the dataclass, and returns an instance. Modules below the recipe never see the
config object: the recipe passes them plain arguments.

Unknown keys are errors that name the key and list the valid ones, because a misspelt setting that
is silently ignored makes a run that looks right and is not.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from slimlm.toolkit.errors import SlimlmError

T = TypeVar("T")


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: list[str] | tuple = ()) -> T:
    """Build `cls` from the YAML mapping in `path` (None: defaults only), then apply `overrides`.

    Each override is `key=value` or `section.key=value`; later overrides win over earlier ones and
    over the file. Raises SlimlmError for an unreadable file, a bad override, an unknown key or a
    value of the wrong type.
    """
    data: dict[str, Any] = {}
    if path is not None:
        data = read_yaml(path)
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(data, key.split("."), value)
    where = str(path) if path is not None else "config"
    try:
        return from_dict(cls, data, where=where)
    except SlimlmError as err:
        if path is None or not overrides or not err.what.startswith(where):
            raise
        try:  # the file alone: if it passes, the fault is in the overrides, not in the file the message names
            from_dict(cls, read_yaml(path), where=where)
        except SlimlmError:
            raise err from None
        raise SlimlmError(f"{where} with {' '.join(overrides)}{err.what[len(where):]}", err.hint) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: its keys may be overridden here
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping at the top of a YAML file (an empty file is an empty mapping)."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise SlimlmError(f"config file {p} is a folder.", "Pass the YAML file itself, e.g. configs/distill/smollm2-135m.yaml.")
    if not p.is_file():
        raise SlimlmError(f"config file {p} does not exist.", "Check the path of the YAML file.")
    try:
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        raise SlimlmError(f"config file {p} is not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SlimlmError(f"config file {p} must hold a mapping of settings, found {type(data).__name__}.")
    return data


def parse_override(item: str) -> tuple[str, Any]:
    """`"a.b=1e-3"` -> `("a.b", 0.001)`; the value is parsed as YAML (empty means None)."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part.isidentifier() for part in key.split(".")):
        raise SlimlmError(f"bad override {item!r}.", "Write overrides as key=value or section.key=value, "
                          "e.g. lr=3e-4 loss.kind=reverse_kl.")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as err:
        raise SlimlmError(f"override {item!r}: the value is not valid YAML ({err}).") from err
    return key, value


def to_dict(config) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (for manifests, checkpoints and logs)."""
    return dataclasses.asdict(config)


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Check `data` against the fields of dataclass `cls` (recursively) and build an instance."""
    if not isinstance(data, dict):
        raise SlimlmError(f"{where}: expected a mapping of settings, found {type(data).__name__} ({data!r}).")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise SlimlmError(f"{where}: unknown setting(s) {', '.join(unknown)}.",
                          f"Valid settings here: {', '.join(fields)}.")
    hints = typing.get_type_hints(cls)
    values = {name: _check_value(hints[name], value, f"{where}: {name}") for name, value in data.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:  # a __post_init__ refusing a combination of values
        raise SlimlmError(f"{where}: {err}") from err


def _set_dotted(data: dict, keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        node = data.get(key)
        if node is None:
            node = data[key] = {}
        elif not isinstance(node, dict):
            raise SlimlmError(f"override {'.'.join(keys)}: {key} is a single value, not a section.")
        data = node
    data[keys[-1]] = value


def _check_value(hint: Any, value: Any, where: str) -> Any:
    """`value` made to fit the type `hint`, or a SlimlmError that says what was expected."""
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value if value is not None else {}, where)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check_value(arg, value, where)
            except SlimlmError as err:
                errors.append(err)
        raise errors[0]
    if origin is typing.Literal:
        if value in args:
            return value
        raise SlimlmError(f"{where} = {value!r} is not allowed.", f"Expected one of: {', '.join(map(str, args))}.")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise SlimlmError(f"{where} must be a list, e.g. [a, b]; got {value!r}.")
        item = args[0] if args else Any
        return [_check_value(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise SlimlmError(f"{where} must be a mapping; got {value!r}.")
        return dict(value)
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        # A YAML scalar that happens to parse as a number or date is still a valid name or path.
        if isinstance(value, str):
            return value
        if value is not None and not isinstance(value, (list, dict, bool)):
            return str(value)
    else:
        raise TypeError(f"config.py cannot check a field of type {hint!r}")
    raise SlimlmError(f"{where} must be {hint.__name__}; got {value!r} ({type(value).__name__}).")
