"""Write a model as a slimlm export: a plain HF folder plus `slimlm.json`.

The folder is written under a hidden temporary name beside `out_dir` (same filesystem, so the
final rename is atomic) and renamed into place only when complete. A crash therefore never leaves
a half export at `out_dir`; a leftover temporary folder carries an "incomplete" marker, so no
reader takes it for an export.
"""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any

from ..errors import SlimlmError
from .integrity import INCOMPLETE_MARKER, describe_files
from .manifest import MANIFEST_NAME, TRANSFORM_KEYS, Manifest, empty_transforms

META_KEYS = ("base_model", "command", "config", "eval", "transforms")
_QUANT_ATTRS = ("hf_quantizer", "is_quantized", "quantization_method")


def write(model, tokenizer, out_dir: str | os.PathLike, meta: dict | None = None,
          overwrite: bool = False, max_shard_size: int | str = "2GB",
          extra_tensors: dict[str, dict] | None = None) -> Path:
    """Export `model` (and `tokenizer`, unless None) to `out_dir`; return its absolute path.

    `meta` may hold `base_model` (default: the model's `name_or_path`), `command` (default: this
    process's command line), `config`, `eval` and `transforms` (merged over all-None defaults);
    any other key is refused, so a misspelt key is not silently dropped. A non-empty `out_dir` is
    refused unless `overwrite`; then it is replaced only once the new export is complete.
    Shards of at most `max_shard_size` keep each file loadable with bounded memory.
    `extra_tensors` maps a file name (`*.safetensors`, not one of HF's `model*` names) to a dict of
    tensors written beside the model (e.g. early-exit norms): hashed like the weights, and never
    read by transformers, which loads only `model.safetensors` or the files its index lists.
    """
    out = Path(os.path.abspath(out_dir))
    manifest = _manifest_from_meta(model, meta)
    extra = _check_extra(extra_tensors)
    check_target(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(out, "tmp")
    tmp.mkdir()  # not mkdtemp: its 0700 mode would outlive the rename; this one follows the umask
    try:
        (tmp / INCOMPLETE_MARKER).touch()
        with _plain_checkpoint(model):
            model.save_pretrained(tmp, max_shard_size=max_shard_size)
        if not (tmp / "generation_config.json").exists() and getattr(model, "generation_config", None):
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _write_extra(tmp, extra)
        _readable_as_the_umask_says(tmp)
        manifest.files = describe_files(tmp)
        text = json.dumps(manifest.to_dict(), indent=2) + "\n"
        (tmp / MANIFEST_NAME).write_text(text, encoding="utf-8")
        _fsync_tree(tmp)
        _move_into_place(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already if the rename succeeded
        raise
    return out


def _manifest_from_meta(model, meta: dict | None) -> Manifest:
    # Checked before any weights are written, so a bad argument costs nothing.
    meta = dict(meta or {})
    unknown = sorted(set(meta) - set(META_KEYS))
    if unknown:
        raise SlimlmError(f"unknown export meta key(s): {', '.join(unknown)}.",
                          f"Expected only {', '.join(META_KEYS)}.")
    transforms = meta.get("transforms") or {}
    if not isinstance(transforms, dict) or set(transforms) - set(TRANSFORM_KEYS):
        raise SlimlmError(f"export meta `transforms` must be a dict with keys among "
                          f"{', '.join(TRANSFORM_KEYS)}; got {transforms!r}.")
    base_model = meta.get("base_model") or getattr(model, "name_or_path", "") or ""
    command = meta.get("command") or shlex.join(sys.argv)
    config, evals = meta.get("config"), meta.get("eval") or {}
    for name, value, ok in (("base_model", base_model, isinstance(base_model, (str, os.PathLike))),
                            ("command", command, isinstance(command, str)),
                            ("config", config, config is None or isinstance(config, dict)),
                            ("eval", evals, isinstance(evals, dict))):
        if not ok:
            raise SlimlmError(f"export meta `{name}` has the wrong type ({type(value).__name__}).",
                              "Expected: base_model and command strings, config and eval dicts.")
    manifest = Manifest(base_model=os.fspath(base_model), command=command, config=config,
                        eval=evals, transforms={**empty_transforms(), **transforms})
    manifest.to_dict()  # fail now, not after the weights are written, if meta is not JSON-able
    return manifest


def _check_extra(extra: dict | None) -> dict:
    # Checked before any weights are written. HF names its weight files model.safetensors and
    # model-0000k-of-0000n.safetensors: an extra file must never shadow or join them.
    import torch

    extra = dict(extra or {})
    for name, tensors in extra.items():
        plain = isinstance(name, str) and "/" not in name and "\\" not in name and not name.startswith(".")
        if not plain or not name.endswith(".safetensors") or name.startswith("model"):
            raise SlimlmError(f"extra tensor file name {name!r} is not allowed.",
                              "Use a plain name ending in .safetensors that does not start with 'model', "
                              "e.g. early_exit.safetensors.")
        if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                    for k, v in tensors.items()):
            raise SlimlmError(f"extra_tensors[{name!r}] must map tensor names (str) to torch tensors.")
    return extra


def _write_extra(folder: Path, extra: dict) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if extra and single.is_file() and not index.exists():
        # vLLM and SGLang load every *.safetensors of a folder without an index (and refuse tensors their model
        # lacks); with one they load only the files it lists. transformers prefers model.safetensors to it.
        with safe_open(str(single), "pt") as fh:
            names = sorted(fh.keys())
        with open(single, "rb") as fh:  # the tensors' bytes: the file less its 8-byte length and JSON header
            data_bytes = single.stat().st_size - 8 - int.from_bytes(fh.read(8), "little")
        index.write_text(json.dumps({"metadata": {"total_size": data_bytes},
                                     "weight_map": {k: single.name for k in names}}, indent=2) + "\n",
                         encoding="utf-8")
    for name, tensors in extra.items():
        if (folder / name).exists():  # e.g. a model class that saves under an unusual name
            raise SlimlmError(f"extra tensor file {name} collides with a file the model itself wrote.",
                              "Choose another name for the extra tensors.")
        save_file({k: v.detach().to("cpu").clone() for k, v in tensors.items()}, str(folder / name),
                  metadata={"format": "pt"})


def _readable_as_the_umask_says(folder: Path) -> None:
    """Give every file the mode the umask gives a new file (safetensors writes its files 0600, unreadable to
    the other users a server or container may run as); the folder itself was made under the umask."""
    mode = folder.stat().st_mode & 0o666
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(mode)


def check_folder_can_be_made(out: Path, what: str = "an export", beside: bool = True) -> None:
    """Refuse a folder path under which nothing can be made: its nearest existing parent is a file, or folders
    cannot be created there (a read-only place, /proc). Tried by making and removing a hidden folder there.
    `beside`: the writer makes its temporary folder beside `out`, so the parent is tried even where `out` exists;
    False: only inside `out` (a training run's folder), so an existing `out` is tried itself."""
    import tempfile

    base = next(p for p in [out.parent if beside else out, *out.parents] if p.exists())
    if not base.is_dir():
        raise SlimlmError(f"{out}: {base} is a file, so {what} cannot be made under it.",
                          "Choose an output path under a folder.")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".slimlm-probe-", dir=base))
    except OSError as e:
        raise SlimlmError(f"{out}: folders cannot be made in {base} ({e.strerror}), so {what} cannot be written there.",
                          "Choose an output path you can write to.") from None


def check_target(out: Path, overwrite: bool) -> None:
    """Refuse an output path that is a file, under which no folder can be made, a non-empty folder unless
    `overwrite`, or one overwrite must never delete (a root, home or current folder): the writer's checks, for
    commands to run before any work."""
    if out.exists() and not out.is_dir():
        raise SlimlmError(f"{out} is a file; an export needs a folder there.",
                          "Choose another output path or remove the file.")
    check_folder_can_be_made(out)
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise SlimlmError(f"{out} already exists and is not empty.",
                          "Pass overwrite=True (`--overwrite` on the command line) to replace it, "
                          "or choose another output folder.")
    # Overwrite removes the whole folder; refuse the folders where a slip would be a disaster.
    real, cwd = out.resolve(), Path.cwd().resolve()
    if real == real.parent or real == Path.home().resolve() or real == cwd or real in cwd.parents:
        raise SlimlmError(f"refusing to overwrite {out}: it is a root, home or current directory "
                          "(or holds it), and overwrite deletes everything in it.",
                          "Choose a dedicated output folder.")


def _sibling(out: Path, kind: str) -> Path:
    # Hidden and unique; the random part keeps two writers to the same target apart.
    return out.parent / f".{out.name}.slimlm-{kind}-{uuid.uuid4().hex[:12]}"


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    check_target(out, overwrite)  # again: the folder may have appeared while we were writing
    old = None
    if out.exists():
        old = _sibling(out, "old")
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)
        raise
    # Last, so a crash just before it leaves `out` marked unfinished rather than trusted.
    (out / INCOMPLETE_MARKER).unlink()
    _fsync_dir(out)
    _fsync_dir(out.parent)
    if old is not None and old.is_symlink():  # `out` was a link: drop the link, not its target
        old.unlink()
    elif old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    # The rename must not become durable before the data it publishes (power loss, not just crash).
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems cannot fsync a directory
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _quant_method(qconfig: Any) -> str | None:
    method = qconfig.get("quant_method") if isinstance(qconfig, dict) else getattr(qconfig, "quant_method", None)
    method = getattr(method, "value", method)  # QuantizationMethod enum -> its string
    return None if method is None else str(method)


@contextlib.contextmanager
def _plain_checkpoint(model):
    """Hide a GGUF loader's quantizer from `save_pretrained` while saving; restore it after.

    Loading a GGUF dequantizes the weights but leaves the quantizer attached, and transformers
    refuses to save a model whose quantizer is not serializable, or would record a GGUF
    `quantization_config` that no loader can apply to safetensors. Other quantizers (GPTQ, ...)
    describe weights that really are quantized, so they are left alone.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    config = model.config
    qconfig = getattr(config, "quantization_config", None)
    if "gguf" not in (_quant_method(getattr(quantizer, "quantization_config", None)), _quant_method(qconfig)):
        yield
        return
    if getattr(quantizer, "packed_modules", None):
        raise SlimlmError(
            "this GGUF model keeps its weights packed in GGUF blocks, which safetensors cannot hold.",
            "Load it dequantized, e.g. `from_pretrained(..., gguf_file=..., "
            "quantization_config=GgufConfig(dequantize=True))`, then export it.")
    saved = {k: model.__dict__[k] for k in _QUANT_ATTRS if k in model.__dict__}
    had_qconfig = hasattr(config, "quantization_config")
    try:
        model.hf_quantizer, model.is_quantized = None, False
        model.__dict__.pop("quantization_method", None)
        if had_qconfig:
            delattr(config, "quantization_config")
        yield
    finally:
        for key in _QUANT_ATTRS:
            model.__dict__.pop(key, None)
        model.__dict__.update(saved)
        if had_qconfig:
            config.quantization_config = qconfig
