"""Hashes and checks of the tensor files an export lists.

Shared by the writer (which records sizes and hashes) and the reader (which re-checks them), so
both agree on which files count and how they are hashed.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from ..errors import SlimlmError

# Present in a folder while an export is being written; removed only once it is complete and in
# place. Its presence means a writer died midway, so readers refuse the folder.
INCOMPLETE_MARKER = ".slimlm-incomplete"
_CHUNK = 8 << 20  # 8 MiB: large enough to keep hashing at disk speed, small enough for any RAM


def sha256_file(path: Path) -> str:
    """The sha256 hex digest of `path`, read in chunks because tensor files can be many GB."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def tensor_files(folder: Path) -> list[Path]:
    """The files whose change would change the model: `*.safetensors` and their index json."""
    found = [p for p in folder.iterdir() if p.is_file() and
             (p.name.endswith(".safetensors") or p.name.endswith(".safetensors.index.json"))]
    return sorted(found)


# Hashed beside the tensor files: what the weights compute depends on it (layers, rope, norms, quantization).
# Manifests written before it was hashed do not list it, and are read as they were.
CONFIG_NAME = "config.json"


def describe_files(folder: Path) -> dict[str, dict]:
    """`{name: {"sha256": hex, "bytes": size}}` for every tensor file in `folder`, and its config.json."""
    files = tensor_files(folder) + [p for p in [folder / CONFIG_NAME] if p.is_file()]
    return {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in sorted(files)}


def verify_files(folder: Path, files: dict[str, dict], hashes: bool = True) -> None:
    """Raise SlimlmError unless every listed file is present, whole and unaltered.

    Sizes are checked before hashes, so a truncated multi-GB file is reported without reading it.
    A tensor file the manifest does not list is refused too: HF would load it (a single
    `model.safetensors` needs no index), so weights nobody hashed could slip in.
    """
    redo = "Re-export the model to get a complete, verified folder."
    edited = ("config.json decides what the weights compute; restore it, or re-export the model with the change "
              "(a folder without slimlm.json loads as a plain, unverified HF folder).")
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            raise SlimlmError(f"{path} is missing, but the export manifest lists it.", redo)
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise SlimlmError(
                f"{path} has {size} bytes, but the export manifest says {entry['bytes']} "
                f"({'edited' if name == CONFIG_NAME else 'truncated or replaced'} after export).",
                edited if name == CONFIG_NAME else redo)
    unlisted = [p.name for p in tensor_files(folder) if p.name not in files]
    if unlisted:
        raise SlimlmError(
            f"{folder} holds tensor file(s) the export manifest does not list: {', '.join(unlisted)}.",
            "Remove them, or re-export the model, so that every weight file is hashed.")
    if not hashes:
        return
    for name, entry in files.items():
        if sha256_file(folder / name) != entry["sha256"]:
            raise SlimlmError(
                f"{folder / name} does not match its sha256 in the export manifest "
                "(it was altered after export).", edited if name == CONFIG_NAME else redo)
