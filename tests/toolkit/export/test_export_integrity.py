"""`read` refuses any export whose files are not the ones that were written."""
import json
import shutil

import pytest
from transformers import AutoModelForCausalLM

from slimlm.toolkit.errors import SlimlmError
from slimlm.toolkit.export import MANIFEST_NAME, is_export, read, write
from slimlm.toolkit.models import tiny_model


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    model, tok = tiny_model("llama")
    return write(model, tok, tmp_path_factory.mktemp("pristine") / "export", max_shard_size="100KB")


@pytest.fixture
def export(pristine, tmp_path):
    # Each test damages its own copy.
    return shutil.copytree(pristine, tmp_path / "export")


def _shard(folder):
    return sorted(folder.glob("model-*.safetensors"))[0]


def test_intact_export_reads(export):
    assert len(read(export).files) >= 3


def test_flipped_byte_is_refused(export):
    shard = _shard(export)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content: only the hash can tell
    shard.write_bytes(bytes(data))
    with pytest.raises(SlimlmError, match="altered") as err:
        read(export)
    assert shard.name in str(err.value) and "Re-export" in str(err.value)
    read(export, verify=False)  # sizes alone cannot see it: that is what verify is for


def test_altered_index_is_refused(export):
    index = export / "model.safetensors.index.json"
    text = index.read_bytes()
    assert b"-00001-of-" in text
    index.write_bytes(text.replace(b"-00001-of-", b"-00002-of-", 1))  # a tensor now "lives" elsewhere
    with pytest.raises(SlimlmError, match="altered") as err:
        read(export)
    assert "model.safetensors.index.json" in str(err.value)


def test_truncated_file_is_refused(export):
    shard = _shard(export)
    shard.write_bytes(shard.read_bytes()[:-100])
    for verify in (True, False):
        with pytest.raises(SlimlmError, match="truncated") as err:
            read(export, verify=verify)
        assert shard.name in str(err.value)


def test_missing_file_is_refused(export):
    shard = _shard(export)
    shard.unlink()
    with pytest.raises(SlimlmError, match="missing") as err:
        read(export)
    assert shard.name in str(err.value)


def test_unlisted_tensor_file_is_refused(export):
    (export / "extra.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(SlimlmError, match="extra.safetensors"):
        read(export)


def test_plain_hf_folder_is_not_an_export(tmp_path):
    model, _ = tiny_model("qwen3")
    model.save_pretrained(tmp_path / "hf")
    assert not is_export(tmp_path / "hf")
    with pytest.raises(SlimlmError, match="not a slimlm export") as err:
        read(tmp_path / "hf")
    assert "from_pretrained" in str(err.value)


def test_missing_folder_and_file_path(tmp_path):
    with pytest.raises(SlimlmError, match="does not exist"):
        read(tmp_path / "nowhere")
    (tmp_path / "f").write_text("x")
    with pytest.raises(SlimlmError, match="is a file"):
        read(tmp_path / "f")
    assert not is_export(tmp_path / "nowhere") and not is_export(tmp_path / "f")


def test_malformed_manifest_is_refused(export):
    (export / MANIFEST_NAME).write_text("{not json")
    assert is_export(export)  # still claims to be an export, so loaders ask read, which refuses
    with pytest.raises(SlimlmError, match="not valid JSON"):
        read(export)
    (export / MANIFEST_NAME).write_text("[1, 2]")
    with pytest.raises(SlimlmError, match="JSON object"):
        read(export)


def test_newer_format_is_refused(export):
    path = export / MANIFEST_NAME
    data = json.loads(path.read_text())
    data["format_version"] += 1
    data["a_field_from_the_future"] = True
    path.write_text(json.dumps(data))
    with pytest.raises(SlimlmError, match="Upgrade slimlm"):
        read(export)


def test_manifest_cannot_point_outside_the_folder(export, tmp_path):
    path = export / MANIFEST_NAME
    data = json.loads(path.read_text())
    data["files"]["../secret"] = {"sha256": "0" * 64, "bytes": 0}
    path.write_text(json.dumps(data))
    with pytest.raises(SlimlmError, match="plain file name"):
        read(export)


def test_export_still_loads_with_transformers(export):
    AutoModelForCausalLM.from_pretrained(export)  # the manifest does not get in HF's way
