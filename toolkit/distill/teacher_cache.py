"""A teacher's top-k log-probabilities, computed once and reused by every distillation run.

Running the teacher costs as much as training the student does, and for a fixed data set its
outputs never change, so they are written to disk once: per token, the k most likely tokens'
ids (int32) and log-probabilities (fp16 by default), in safetensors shards beside an index
(`topk_index.json`). Nothing is pickled.

Values are log_softmax over the teacher's full vocabulary at temperature 1, not raw logits:
they lie in [-inf, 0], where fp16 keeps about 3 significant digits near the likely tokens (raw
logits can sit anywhere, e.g. around 30, where fp16 steps are 0.016 and bf16 steps 0.125), and
1 - sum(exp(values)) still tells how much mass the top k miss. `kd_loss_topk` renormalises over
the k entries, where log-probs and logits give the same distribution at any temperature.

The index records, per batch, the sha256 of its token ids: a run asks for batch i *with its
input_ids*, and a cache written for other data (another tokenizer, packing, order or shuffling
seed) is refused instead of silently teaching the wrong targets. Write the cache with one
sequence per batch if the training loader shuffles: batch index = sequence index then.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import SlimlmError
from ..eval._common import eval_mode, forward_logits, model_device, progress_bar
from ..export.integrity import sha256_file

INDEX_NAME = "topk_index.json"
FORMAT, VERSION = "slimlm-topk-cache", 1
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def token_digest(input_ids: torch.Tensor) -> str:
    """sha256 of a batch's token ids and shape, independent of their integer dtype and device."""
    ids = torch.as_tensor(input_ids).detach().to("cpu", torch.int64).contiguous()
    digest = hashlib.sha256(str(list(ids.shape)).encode())
    digest.update(ids.numpy().tobytes())
    return digest.hexdigest()


def write_topk_cache(teacher, batches: Iterable, out_dir: str | os.PathLike, k: int = 64,
                     shard_tokens: int = 1 << 20, dtype: str = "float16", teacher_name: str | None = None,
                     overwrite: bool = False, progress: bool = True) -> Path:
    """Run `teacher` over `batches` and store its top-k log-probs per token under `out_dir`.

    Args:
        teacher: a causal LM (logits [B, T, V] from `teacher(input_ids=...)`).
        batches: input_ids tensors [B, T] (or [T], taken as one sequence), or dicts holding
            "input_ids" and optionally "attention_mask"; replay them in this order when reading.
        k: tokens kept per position (64 covers nearly all of the mass of a trained LM).
        shard_tokens: tokens per shard before a new one starts (a batch never spans shards);
            the default 2**20 makes ~400 MB shards at k = 64.
        dtype: "float16" (default; see the module docstring) or "bfloat16" for the values.
        teacher_name: recorded in the index (default: the model's name_or_path).
        overwrite: replace a complete cache already in `out_dir` (otherwise refused; the leftovers
            of an interrupted write are always replaced, and a folder with other files never is).

    Returns the cache folder. The index is written last, so a folder without it is incomplete.
    """
    if k < 1 or shard_tokens < 1:
        raise SlimlmError(f"k and shard_tokens must be positive, got k={k}, shard_tokens={shard_tokens}.")
    if dtype not in _DTYPES:
        raise SlimlmError(f"unknown cache dtype {dtype!r}.", f"Use one of: {', '.join(_DTYPES)}.")
    out = Path(out_dir)
    _prepare_folder(out, overwrite)
    index = {"format": FORMAT, "version": VERSION, "k": k, "vocab_size": None,
             "teacher": teacher_name or _model_name(teacher), "dtype": dtype,
             "values": "log_softmax over the full vocabulary at temperature 1", "token_count": 0,
             "batches": [], "shards": {}}
    pending: dict[str, torch.Tensor] = {}
    pending_tokens = 0
    device = model_device(teacher)
    total = len(batches) if hasattr(batches, "__len__") else None
    with eval_mode(teacher), torch.inference_mode(), progress_bar(progress) as bar:
        task = bar.add_task("teacher top-k", total=total)
        for i, batch in enumerate(batches):
            ids, attention = _unpack(batch, i)  # ids: [B, T]
            logits = forward_logits(teacher, ids.to(device),
                                    None if attention is None else attention.to(device))  # [B, T, V]
            vocab = logits.shape[-1]
            if index["vocab_size"] not in (None, vocab):
                raise SlimlmError(f"batch {i} gave logits over {vocab} tokens, earlier ones over "
                                  f"{index['vocab_size']}.", "Use one teacher for the whole cache.")
            if k > vocab:
                raise SlimlmError(f"k={k} exceeds the teacher's vocabulary of {vocab} tokens.",
                                  f"Use k <= {vocab}.")
            index["vocab_size"] = vocab
            top, top_idx = logits.topk(k, dim=-1)  # top, top_idx: [B, T, k]
            log_z = torch.logsumexp(logits.float(), dim=-1, keepdim=True)  # [B, T, 1]
            del logits
            name = _shard_name(len(index["shards"]))
            pending[f"batch_{i}.values"] = (top.float() - log_z).to(_DTYPES[dtype]).cpu()
            pending[f"batch_{i}.indices"] = top_idx.to(torch.int32).cpu()
            pending[f"batch_{i}.input_ids"] = ids.to(torch.int32).cpu()
            index["batches"].append({"shard": name, "shape": list(ids.shape),
                                     "tokens_sha256": token_digest(ids)})
            pending_tokens += ids.numel()
            index["token_count"] += ids.numel()
            if pending_tokens >= shard_tokens:
                _flush(out, name, pending, index)
                pending, pending_tokens = {}, 0
            bar.advance(task)
    if pending:
        _flush(out, _shard_name(len(index["shards"])), pending, index)
    if not index["batches"]:
        raise SlimlmError("no batches to run the teacher on.", "Pass a non-empty iterable of input_ids.")
    tmp = out / (INDEX_NAME + ".tmp")
    tmp.write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, out / INDEX_NAME)  # atomic: readers see no index or a complete one
    return out


class TopkCache:
    """Reader of a cache from `write_topk_cache`.

    Opening checks the index and that every shard is present with its recorded size (cheap);
    each shard's sha256 is checked the first time a batch from it is read (hashing a whole
    multi-GB cache up front would delay every run), or all at once with `verify_all()`.
    `vocab_size`, when given, must equal the teacher vocabulary the cache was written with.
    """

    def __init__(self, directory: str | os.PathLike, vocab_size: int | None = None, verify: bool = True):
        self.dir = Path(directory)
        self.verify = verify
        index = _read_index(self.dir)
        self.k, self.vocab_size, self.teacher = index["k"], index["vocab_size"], index["teacher"]
        self.token_count, self.dtype = index["token_count"], index["dtype"]
        self._batches, self._shards = index["batches"], index["shards"]
        self._verified: set[str] = set()
        if vocab_size is not None and vocab_size != self.vocab_size:
            raise SlimlmError(f"the teacher cache at {self.dir} covers a vocabulary of {self.vocab_size} "
                              f"tokens, the student has {vocab_size}.",
                              "Distil with a student that shares the teacher's tokenizer, or rewrite the cache.")
        for name, entry in self._shards.items():
            path = self.dir / name
            if not path.is_file() or path.stat().st_size != entry["bytes"]:
                raise SlimlmError(f"teacher cache shard {path} is missing or has the wrong size "
                                  "(an interrupted copy?).", _REWRITE)

    def __len__(self) -> int:
        return len(self._batches)

    def get(self, index: int, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values [B, T, k] fp16/bf16, indices [B, T, k] int32) of batch `index`, on CPU.

        `input_ids` must be the very batch the cache was written for (checked by hash).
        """
        if not 0 <= index < len(self._batches):
            raise SlimlmError(f"the teacher cache at {self.dir} holds {len(self._batches)} batches; "
                              f"batch {index} does not exist.",
                              "Read it over the same data it was written for, or rewrite it.")
        entry = self._batches[index]
        ids = torch.as_tensor(input_ids)
        ids = ids.unsqueeze(0) if ids.dim() == 1 else ids
        if token_digest(ids) != entry["tokens_sha256"]:
            raise SlimlmError(
                f"batch {index} of the teacher cache at {self.dir} was written for other tokens "
                f"(shape {entry['shape']}) than the batch given (shape {list(ids.shape)}).",
                "The cache must be read over the same data, tokenizer, packing and order it was "
                "written with (no shuffling, or one sequence per cached batch). Rewrite it with "
                "write_topk_cache for this data.")
        path = self.dir / entry["shard"]
        if self.verify and entry["shard"] not in self._verified:
            self._check_hash(entry["shard"])
        with safe_open(path, framework="pt") as f:
            return f.get_tensor(f"batch_{index}.values"), f.get_tensor(f"batch_{index}.indices")

    def verify_all(self) -> None:
        """Hash every shard now (e.g. once before a long run) instead of on first use."""
        for name in self._shards:
            if name not in self._verified:
                self._check_hash(name)

    def _check_hash(self, name: str) -> None:
        if sha256_file(self.dir / name) != self._shards[name]["sha256"]:
            raise SlimlmError(f"teacher cache shard {self.dir / name} does not match its sha256 in "
                              f"{INDEX_NAME} (it was altered after it was written).", _REWRITE)
        self._verified.add(name)


_REWRITE = "Delete the cache folder and write it again with write_topk_cache."


def _unpack(batch, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    attention = None
    if isinstance(batch, dict):
        if "input_ids" not in batch:
            raise SlimlmError(f"batch {i} is a dict without 'input_ids' (keys: {sorted(batch)}).")
        batch, attention = batch["input_ids"], batch.get("attention_mask")
    ids = torch.as_tensor(batch)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
        attention = None if attention is None else torch.as_tensor(attention).unsqueeze(0)
    if ids.dim() != 2 or ids.dtype.is_floating_point:
        raise SlimlmError(f"batch {i} has token ids of shape {tuple(ids.shape)} and dtype {ids.dtype}.",
                          "Pass integer input_ids shaped [batch, tokens].")
    return ids, attention


def _flush(out: Path, name: str, tensors: dict[str, torch.Tensor], index: dict) -> None:
    path = out / name
    save_file(tensors, str(path), metadata={"format": FORMAT})
    index["shards"][name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def _shard_name(number: int) -> str:
    return f"topk-{number:05d}.safetensors"


def _model_name(model) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "name_or_path", None) or getattr(config, "_name_or_path", None) \
        or type(model).__name__


def _prepare_folder(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise SlimlmError(f"{out} exists and is not a folder.", "Choose another cache folder.")
    existing = list(out.iterdir()) if out.exists() else []
    ours = [p for p in existing if p.name in (INDEX_NAME, INDEX_NAME + ".tmp")
            or (p.name.startswith("topk-") and p.name.endswith(".safetensors"))]
    if len(ours) != len(existing):
        raise SlimlmError(f"{out} holds files that are not part of a teacher cache; not writing there.",
                          "Choose an empty folder.")
    # Shards without an index are the leftovers of an interrupted write: nothing can read them, so
    # they are replaced without asking; a complete cache is replaced only on request.
    if (out / INDEX_NAME).exists() and not overwrite:
        raise SlimlmError(f"{out} already holds a teacher cache.",
                          "Read it with TopkCache, choose another folder, or pass overwrite=True.")
    (out / INDEX_NAME).unlink(missing_ok=True)  # first, so a half rewrite never looks complete
    for p in ours:
        p.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def _read_index(folder: Path) -> dict:
    path = folder / INDEX_NAME
    if not path.is_file():
        raise SlimlmError(f"{folder} has no {INDEX_NAME}: not a teacher cache, or its writing did not finish.",
                          _REWRITE)
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise SlimlmError(f"cannot read {path}: {err}.", _REWRITE) from err
    if not isinstance(index, dict) or index.get("format") != FORMAT or index.get("version") != VERSION:
        raise SlimlmError(f"{path} is not a version {VERSION} {FORMAT} index.", _REWRITE)
    for name in index["shards"]:
        if Path(name).name != name or not name.endswith(".safetensors"):
            raise SlimlmError(f"{path} names a shard {name!r} outside its folder.", _REWRITE)
    if any(b["shard"] not in index["shards"] for b in index["batches"]):
        raise SlimlmError(f"{path} lists a batch in a shard it does not describe.", _REWRITE)
    return index
