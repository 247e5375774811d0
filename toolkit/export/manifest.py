"""The manifest (`slimlm.json`) that makes a model folder a slimlm export.

A plain Hugging Face folder says what the model *is*; the manifest adds what was *done* to it
(quantization scheme, pruned shapes, exit layers), how it scored, which command made it, and the
sha256 of every tensor file, so a reader can prove the weights are the ones that were evaluated.

The schema is versioned. A reader refuses a newer `format_version` instead of guessing, because a
newer writer may record transforms that change how the weights must be interpreted; an older
reader that ignored them would serve a wrong model without a word.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

from ..errors import SlimlmError

FORMAT_VERSION = 1
MANIFEST_NAME = "slimlm.json"
# Filled in by later tools; a key not listed here is an error, so a typo cannot pass silently.
TRANSFORM_KEYS = ("quant", "pruned_shapes", "exit_layers")

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_REEXPORT = "Re-export the model (e.g. `slimlm export ... --overwrite`) to get a valid folder."


def _slimlm_version() -> str:
    try:
        return metadata.version("slimlm")
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def empty_transforms() -> dict[str, Any]:
    """The `transforms` of an untouched model: every known key present, all None."""
    return {key: None for key in TRANSFORM_KEYS}


@dataclass
class Manifest:
    """Everything slimlm knows about an exported model, beside the HF files it describes.

    `files` maps a file name (relative to the export folder) to `{"sha256": hex, "bytes": int}`
    for every `*.safetensors` file, the safetensors index and config.json, the files whose silent change
    would change the model's outputs (manifests written before config.json was hashed do not list it).
    """

    format_version: int = FORMAT_VERSION
    slimlm_version: str = field(default_factory=_slimlm_version)
    created: str = field(default_factory=_utc_now)
    base_model: str = ""
    transforms: dict[str, Any] = field(default_factory=empty_transforms)
    command: str = ""
    config: dict[str, Any] | None = None
    eval: dict[str, Any] = field(default_factory=dict)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def tensor_files(self) -> list[str]:
        """The `*.safetensors` files among `files` (not config.json or the index)."""
        return [name for name in self.files if name.endswith(".safetensors")]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; raises SlimlmError if a value cannot be stored as JSON."""
        data = dataclasses.asdict(self)
        try:
            json.dumps(data, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise SlimlmError(
                f"the export manifest holds a value JSON cannot store ({err}).",
                "Pass only strings, numbers, booleans, None, lists and dicts in `meta` "
                "(config, eval, transforms); convert paths and tensors first.") from err
        return data

    @classmethod
    def from_dict(cls, data: Any, source: str = MANIFEST_NAME) -> "Manifest":
        """Validate `data` (parsed JSON) and build a Manifest; SlimlmError names what is wrong.

        The version is checked before anything else, so a newer manifest is reported as newer
        rather than as "unknown field".
        """
        if not isinstance(data, dict):
            _bad(source, f"expected a JSON object, found {type(data).__name__}")
        version = data.get("format_version")
        if not _is_int(version) or version < 1:
            _bad(source, f"`format_version` must be a positive integer, found {version!r}")
        if version > FORMAT_VERSION:
            raise SlimlmError(
                f"{source} uses export format {version}, but this slimlm ({_slimlm_version()}) "
                f"reads formats up to {FORMAT_VERSION}.",
                "Upgrade slimlm (`pip install -U slimlm`) to read this export.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            _bad(source, f"unknown field(s) {', '.join(unknown)} for format {version}")
        missing = [name for name in known if name not in data]
        if missing:
            _bad(source, f"missing field(s) {', '.join(sorted(missing))}")
        for name in ("slimlm_version", "created", "base_model", "command"):
            if not isinstance(data[name], str):
                _bad(source, f"`{name}` must be a string, found {type(data[name]).__name__}")
        try:
            datetime.fromisoformat(data["created"])
        except ValueError:
            _bad(source, f"`created` is not an ISO date: {data['created']!r}")
        if data["config"] is not None and not isinstance(data["config"], dict):
            _bad(source, "`config` must be an object or null")
        if not isinstance(data["eval"], dict):
            _bad(source, "`eval` must be an object")
        check_transforms(data["transforms"], source)
        _check_files(data["files"], source)
        return cls(**{name: data[name] for name in known})


def check_transforms(transforms: Any, source: str = MANIFEST_NAME) -> None:
    """Refuse a `transforms` that is not a dict holding exactly the known keys."""
    if not isinstance(transforms, dict):
        _bad(source, "`transforms` must be an object")
    unknown = sorted(set(transforms) - set(TRANSFORM_KEYS))
    missing = [key for key in TRANSFORM_KEYS if key not in transforms]
    if unknown or missing:
        _bad(source, f"`transforms` must have exactly the keys {', '.join(TRANSFORM_KEYS)}"
                     f" (unknown: {unknown or 'none'}, missing: {missing or 'none'})")


def _check_files(files: Any, source: str) -> None:
    if not isinstance(files, dict):
        _bad(source, "`files` must be an object")
    for name, entry in files.items():
        # A bare file name only: a manifest must not make the reader open files outside the folder.
        if not name or "/" in name or "\\" in name or name in (".", ".."):
            _bad(source, f"`files` entry {name!r} is not a plain file name")
        if not isinstance(entry, dict) or set(entry) != {"sha256", "bytes"}:
            _bad(source, f"`files[{name!r}]` must be an object with exactly `sha256` and `bytes`")
        if not isinstance(entry["sha256"], str) or not _SHA256.match(entry["sha256"]):
            _bad(source, f"`files[{name!r}].sha256` must be 64 lowercase hex digits")
        if not _is_int(entry["bytes"]) or entry["bytes"] < 0:
            _bad(source, f"`files[{name!r}].bytes` must be a non-negative integer")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _bad(source: str, problem: str):
    raise SlimlmError(f"{source} is not a valid slimlm manifest: {problem}.", _REEXPORT)
