"""write_topk_cache / TopkCache: round trip, integrity and the same-data check."""
import hashlib
import json

import pytest
import torch

from slimlm.toolkit.distill import TopkCache, kd_loss, kd_loss_topk, write_topk_cache
from slimlm.toolkit.distill.teacher_cache import INDEX_NAME
from slimlm.toolkit.errors import SlimlmError
from slimlm.toolkit.models import tiny_model


@pytest.fixture(scope="module")
def teacher():
    return tiny_model("llama")[0]


def _batches(n=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (2, 8), generator=gen) for _ in range(n)]


def test_round_trip_keeps_the_top_k_log_probs(teacher, tmp_path):
    batches = _batches()
    # 16 tokens per batch, shards close at >= 20 tokens: batches 0 + 1 in one shard, 2 in the next.
    out = write_topk_cache(teacher, batches, tmp_path / "cache", k=5, shard_tokens=20, progress=False)
    index = json.loads((out / INDEX_NAME).read_text())
    assert (index["k"], index["vocab_size"], index["token_count"]) == (5, 259, 48)
    assert index["teacher"] and index["dtype"] == "float16"
    assert [b["shard"] for b in index["batches"]] == ["topk-00000.safetensors"] * 2 + ["topk-00001.safetensors"]
    for name, entry in index["shards"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == entry["sha256"]

    cache = TopkCache(out, vocab_size=259)
    assert len(cache) == 3 and cache.k == 5
    for i, ids in enumerate(batches):
        values, indices = cache.get(i, ids)
        assert values.dtype == torch.float16 and indices.dtype == torch.int32
        with torch.no_grad():
            want_v, want_i = teacher(input_ids=ids).logits.log_softmax(-1).topk(5, dim=-1)
        assert torch.equal(indices.long(), want_i)
        assert torch.allclose(values.float(), want_v, atol=2e-3)


def test_full_vocab_cache_reproduces_the_dense_loss(teacher, tmp_path):
    ids = _batches(1)[0]
    write_topk_cache(teacher, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}],
                     tmp_path / "c", k=259, progress=False)
    values, indices = TopkCache(tmp_path / "c").get(0, ids)
    with torch.no_grad():
        t_logits = teacher(input_ids=ids).logits
    s_logits = torch.randn_like(t_logits)
    for kind in ("forward_kl", "js"):
        assert kd_loss_topk(s_logits, values, indices, kind=kind).item() == pytest.approx(
            kd_loss(s_logits, t_logits, kind=kind).item(), rel=2e-3)


def test_tampered_shard_is_refused(teacher, tmp_path):
    batches = _batches(2)
    out = write_topk_cache(teacher, batches, tmp_path / "c", k=4, progress=False)
    shard = out / "topk-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # same size, one value changed
    shard.write_bytes(bytes(data))
    cache = TopkCache(out)  # sizes still match: opening is fine
    with pytest.raises(SlimlmError, match="sha256"):
        cache.get(0, batches[0])
    with pytest.raises(SlimlmError, match="sha256"):
        cache.verify_all()
    shard.write_bytes(bytes(data[:-1]))
    with pytest.raises(SlimlmError, match="wrong size"):
        TopkCache(out)


def test_other_tokens_are_refused(teacher, tmp_path):
    batches = _batches(2)
    out = write_topk_cache(teacher, batches, tmp_path / "c", k=4, progress=False)
    cache = TopkCache(out)
    with pytest.raises(SlimlmError, match="other tokens"):
        cache.get(0, batches[1])  # right data, wrong order
    changed = batches[0].clone()
    changed[1, 3] += 1
    with pytest.raises(SlimlmError, match="other tokens"):
        cache.get(0, changed)
    with pytest.raises(SlimlmError, match="does not exist"):
        cache.get(2, batches[0])
    values, _ = cache.get(0, batches[0].int())  # the dtype of the ids does not matter
    assert values.shape == (2, 8, 4)


def test_wrong_vocab_and_incomplete_cache_are_refused(teacher, tmp_path):
    out = write_topk_cache(teacher, _batches(1), tmp_path / "c", k=4, progress=False)
    with pytest.raises(SlimlmError, match="vocabulary"):
        TopkCache(out, vocab_size=1000)
    (out / INDEX_NAME).unlink()
    with pytest.raises(SlimlmError, match="did not finish"):
        TopkCache(out)


def test_existing_folder_needs_overwrite(teacher, tmp_path):
    out = write_topk_cache(teacher, _batches(1), tmp_path / "c", k=4, progress=False)
    with pytest.raises(SlimlmError, match="already holds a teacher cache"):
        write_topk_cache(teacher, _batches(1), out, k=4, progress=False)
    write_topk_cache(teacher, _batches(1, seed=1), out, k=3, overwrite=True, progress=False)
    assert TopkCache(out).k == 3
    (out / INDEX_NAME).unlink()  # as if the writer had died before the index: leftovers are replaced
    write_topk_cache(teacher, _batches(1), out, k=2, progress=False)
    assert TopkCache(out).k == 2
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SlimlmError, match="not part of a teacher cache"):
        write_topk_cache(teacher, _batches(1), out, k=4, overwrite=True, progress=False)


def test_bad_arguments_are_refused(teacher, tmp_path):
    with pytest.raises(SlimlmError, match="exceeds"):
        write_topk_cache(teacher, _batches(1), tmp_path / "a", k=300, progress=False)
    with pytest.raises(SlimlmError, match="dtype"):
        write_topk_cache(teacher, _batches(1), tmp_path / "b", dtype="int8", progress=False)
    with pytest.raises(SlimlmError, match="no batches"):
        write_topk_cache(teacher, [], tmp_path / "c", progress=False)
