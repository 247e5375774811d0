"""Read and verify a slimlm export before anything trusts its weights."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import SlimlmError
from .integrity import INCOMPLETE_MARKER, verify_files
from .manifest import MANIFEST_NAME, Manifest


def is_export(path: str | os.PathLike) -> bool:
    """True if `path` is a folder with a manifest that a finished writer left in place.

    Structural only, no hashing: loaders use it to choose between "slimlm export" and "plain HF
    folder". If it verified the files, a corrupted export would look like a plain folder and be
    loaded without complaint; instead it says "export" and `read` then reports what is wrong.
    """
    folder = Path(path)
    return (folder / MANIFEST_NAME).is_file() and not (folder / INCOMPLETE_MARKER).exists()


def read(path: str | os.PathLike, verify: bool = True) -> Manifest:
    """Return the manifest of the export at `path`, after checking the files it lists.

    Every listed file must exist with its recorded size and, when `verify` (the default), its
    recorded sha256. `verify=False` skips only the hashing (seconds per GB), for callers that
    verified the same folder moments ago. Raises SlimlmError with the file name and a fix.
    """
    folder = Path(path)
    if not folder.exists():
        raise SlimlmError(f"{folder} does not exist.", "Check the path to the exported model.")
    if not folder.is_dir():
        raise SlimlmError(f"{folder} is a file; a slimlm export is a folder.",
                          "Pass the folder that `slimlm export` (or `toolkit.export.write`) wrote.")
    if (folder / INCOMPLETE_MARKER).exists():
        raise SlimlmError(
            f"{folder} is an unfinished export: its writer stopped before completing it.",
            "Delete the folder and export the model again.")
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        raise SlimlmError(
            f"{folder} is not a slimlm export (it has no {MANIFEST_NAME}).",
            "A plain Hugging Face folder can be loaded directly, e.g. "
            "`AutoModelForCausalLM.from_pretrained(path)`; use `slimlm export` to make an export.")
    try:
        data = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SlimlmError(f"{manifest_path} is not valid JSON ({err}).",
                          "Re-export the model to rewrite the manifest.") from err
    manifest = Manifest.from_dict(data, source=str(manifest_path))
    verify_files(folder, manifest.files, hashes=verify)
    return manifest


def kept_transforms(model: str | os.PathLike) -> dict:
    """What a model made from `model` keeps of its manifest's transforms: a pruned export's `pruned_shapes` (quantizing,
    distilling or adding exits leaves the shapes as they are). {} for a model that is not such an export."""
    from ..models import resolve  # as the loaders read the spec: a built-in name wins over a folder of that name

    source = resolve(str(model))
    if source.kind != "export":
        return {}
    shapes = read(source.location, verify=False).transforms.get("pruned_shapes")
    return {"pruned_shapes": shapes} if shapes else {}
