"""The manifest schema: what it accepts, and how it refuses what it does not understand."""
import copy
import json

import pytest

from slimlm.toolkit.errors import SlimlmError
from slimlm.toolkit.export import FORMAT_VERSION, Manifest

GOOD = Manifest(base_model="m", command="c", config={"a": 1}, eval={"ppl": 7.5},
                transforms={"quant": {"bits": 4}, "pruned_shapes": None, "exit_layers": [3]},
                files={"model.safetensors": {"sha256": "ab" * 32, "bytes": 10}}).to_dict()


def _with(**changes):
    data = copy.deepcopy(GOOD)
    data.update(changes)
    return data


def test_round_trip_through_json():
    again = Manifest.from_dict(json.loads(json.dumps(GOOD)))
    assert again.to_dict() == GOOD
    assert again.format_version == FORMAT_VERSION == 1


def test_defaults():
    m = Manifest()
    assert m.transforms == {"quant": None, "pruned_shapes": None, "exit_layers": None}
    assert m.slimlm_version and m.created and m.files == {} and m.config is None
    Manifest.from_dict(m.to_dict())


def test_newer_version_refused_before_unknown_fields():
    data = _with(format_version=FORMAT_VERSION + 1, brand_new=1)
    with pytest.raises(SlimlmError, match=rf"format {FORMAT_VERSION + 1}.*up to {FORMAT_VERSION}"):
        Manifest.from_dict(data)


@pytest.mark.parametrize("version", [0, -1, "1", 1.0, True, None])
def test_bad_version(version):
    with pytest.raises(SlimlmError, match="format_version"):
        Manifest.from_dict(_with(format_version=version))


def test_unknown_and_missing_fields():
    with pytest.raises(SlimlmError, match="unknown field.*quantum"):
        Manifest.from_dict(_with(quantum=1))
    data = copy.deepcopy(GOOD)
    del data["files"], data["eval"]
    with pytest.raises(SlimlmError, match="missing field.*eval, files"):
        Manifest.from_dict(data)


@pytest.mark.parametrize("field,value", [
    ("base_model", 3), ("command", None), ("created", "yesterday"), ("config", [1]),
    ("eval", None), ("transforms", None), ("transforms", {"quant": None}),
    ("transforms", {"quant": None, "pruned_shapes": None, "exit_layers": None, "lora": 1}),
    ("files", []), ("files", {"a.safetensors": {"sha256": "xyz", "bytes": 1}}),
    ("files", {"a.safetensors": {"sha256": "ab" * 32, "bytes": -1}}),
    ("files", {"a.safetensors": {"sha256": "ab" * 32}}),
    ("files", {"sub/a.safetensors": {"sha256": "ab" * 32, "bytes": 1}}),
    ("files", {"..": {"sha256": "ab" * 32, "bytes": 1}}),
])
def test_bad_values(field, value):
    with pytest.raises(SlimlmError, match=field):
        Manifest.from_dict(_with(**{field: value}))


def test_not_an_object():
    with pytest.raises(SlimlmError, match="JSON object"):
        Manifest.from_dict([GOOD])


def test_unstorable_value_is_a_clear_error():
    with pytest.raises(SlimlmError, match="JSON cannot store"):
        Manifest(config={"path": object()}).to_dict()
