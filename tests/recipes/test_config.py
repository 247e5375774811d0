"""recipes/config.py: YAML -> dataclass, `key=value` overrides with YAML typing, errors that name the key."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from slimlm.recipes.config import from_dict, load_config, parse_override, to_dict
from slimlm.toolkit.errors import SlimlmError

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "distill"


@dataclass
class Inner:
    kind: str = "forward_kl"
    weight: float = 1.0
    layers: list[int] = field(default_factory=list)


@dataclass
class Outer:
    name: str = "run"
    steps: int = 10
    lr: float = 1e-3
    flag: bool = False
    limit: int | None = None
    devices: int | str = "auto"
    inner: Inner = field(default_factory=Inner)


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_file_then_overrides_in_order(tmp_path):
    path = write(tmp_path, "name: base\nsteps: 5\ninner:\n  kind: js\n  weight: 2\n")
    cfg = load_config(Outer, path, ["steps=7", "inner.weight=0.5", "lr=3e-4", "steps=9", "flag=true",
                                    "inner.layers=[1, 3]", "limit=null", "devices=2"])
    assert cfg == Outer(name="base", steps=9, lr=3e-4, flag=True, limit=None, devices=2,
                        inner=Inner(kind="js", weight=0.5, layers=[1, 3]))
    assert isinstance(cfg.inner.weight, float) and isinstance(cfg.lr, float)


def test_defaults_without_a_file():
    assert load_config(Outer, None, []) == Outer()
    assert load_config(Outer, None, ["inner.kind=reverse_kl"]).inner.kind == "reverse_kl"


def test_yaml_typing_of_override_values():
    assert parse_override("a=1") == ("a", 1)
    assert parse_override("a=1.5") == ("a", 1.5)
    assert parse_override("a.b=true") == ("a.b", True)
    assert parse_override("a=[x, y]") == ("a", ["x", "y"])
    assert parse_override("a=") == ("a", None)
    assert parse_override("a=b=c") == ("a", "b=c")  # only the first = splits


def test_yaml_exponent_without_dot_is_still_a_float(tmp_path):
    # PyYAML (YAML 1.1) reads `1e-4` as a string; a float field takes it anyway.
    assert load_config(Outer, write(tmp_path, "lr: 1e-4\n"), []).lr == pytest.approx(1e-4)
    assert load_config(Outer, None, ["lr=5e-5"]).lr == pytest.approx(5e-5)


def test_a_number_where_a_name_is_expected_becomes_a_string():
    assert load_config(Outer, None, ["name=2024"]).name == "2024"
    assert load_config(Outer, None, ["devices=auto"]).devices == "auto"


@pytest.mark.parametrize("override, words", [
    ("stepz=3", ["stepz", "steps", "inner"]),
    ("inner.knd=js", ["knd", "kind", "weight"]),
])
def test_unknown_key_names_it_and_lists_valid_ones(override, words):
    with pytest.raises(SlimlmError) as err:
        load_config(Outer, None, [override])
    for word in words:
        assert word in str(err.value)


def test_unknown_key_in_the_file(tmp_path):
    with pytest.raises(SlimlmError, match="teachr"):
        load_config(Outer, write(tmp_path, "teachr: x\n"), [])


def test_an_override_at_fault_is_named_not_the_file(tmp_path):
    """A bad override was blamed on the file ("FILE: unknown setting(s) x"), which holds no such thing."""
    path = write(tmp_path, "steps: 3\n")
    with pytest.raises(SlimlmError, match=r"c\.yaml with stepz=4: unknown setting") as err:
        load_config(Outer, path, ["stepz=4"])
    assert "with" not in str(err.value).split("\n")[1]  # the hint is left as it was
    with pytest.raises(SlimlmError, match=r"c\.yaml with steps=two: steps must be int"):
        load_config(Outer, path, ["steps=two"])
    bad = write(tmp_path, "teachr: x\n")
    with pytest.raises(SlimlmError, match=r"c\.yaml: unknown setting"):  # the file's own fault: the file
        load_config(Outer, bad, ["steps=4"])


@pytest.mark.parametrize("override, match", [
    ("steps=1.5", "steps must be int"),
    ("flag=yes please", "flag must be bool"),
    ("inner.layers=3", "must be a list"),
    ("inner.layers=[a]", r"inner: layers\[0\] must be int"),
    ("inner=3", "expected a mapping"),
    ("steps.x=1", "steps must be int"),
])
def test_wrong_types_are_refused(override, match):
    with pytest.raises(SlimlmError, match=match):
        load_config(Outer, None, [override])


@pytest.mark.parametrize("bad", ["steps", "=3", "a..b=1", "1x=2", "a b=1"])
def test_malformed_overrides(bad):
    with pytest.raises(SlimlmError, match="key=value"):
        parse_override(bad)


def test_bad_files(tmp_path):
    with pytest.raises(SlimlmError, match="does not exist"):
        load_config(Outer, tmp_path / "missing.yaml", [])
    with pytest.raises(SlimlmError, match="not valid YAML"):
        load_config(Outer, write(tmp_path, "a: [1, 2\n"), [])
    with pytest.raises(SlimlmError, match="mapping"):
        load_config(Outer, write(tmp_path, "- 1\n- 2\n"), [])
    assert load_config(Outer, write(tmp_path, ""), []) == Outer()
    with pytest.raises(SlimlmError, match="is a folder"):
        load_config(Outer, tmp_path, [])


def test_a_key_given_twice_in_the_file_is_refused(tmp_path):
    """Plain YAML keeps the last of two `lr:` lines silently; a config that says two things is refused."""
    with pytest.raises(SlimlmError, match="the key 'a' is given twice"):
        load_config(Outer, write(tmp_path, "a: 1\nb: x\na: 5\n"), [])
    with pytest.raises(SlimlmError, match="the key 'x' is given twice"):
        load_config(Outer, write(tmp_path, "inner:\n  x: 1\n  x: 2\n"), [])
    from slimlm.recipes.config import read_yaml  # a merge key's keys may be overridden: not a duplicate
    merged = read_yaml(write(tmp_path, "base: &b {x: 1, y: 2}\nother:\n  <<: *b\n  y: 3\n"))
    assert merged["other"] == {"x": 1, "y": 3}


def test_round_trip_through_a_dict():
    cfg = load_config(Outer, None, ["inner.layers=[2]", "steps=3"])
    assert from_dict(Outer, to_dict(cfg)) == cfg


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_shipped_distill_configs_load(name):
    from slimlm.recipes.distill import DistillConfig

    cfg = load_config(DistillConfig, CONFIGS / name, ["max_steps=3"])
    assert cfg.max_steps == 3 and cfg.teacher and cfg.student


def test_distill_config_refuses_bad_choices():
    from slimlm.recipes.distill import DistillConfig

    with pytest.raises(SlimlmError, match="deepspeed_stage_3"):  # the valid strategies are listed
        load_config(DistillConfig, None, ["strategy=deepspeed_stage_4"])
    with pytest.raises(SlimlmError, match="reverse_kl"):
        load_config(DistillConfig, None, ["loss.kind=kl"])
    with pytest.raises(SlimlmError, match="teacher_mode"):
        load_config(DistillConfig, None, ["teacher_mode=magic"])
    with pytest.raises(SlimlmError, match="precision"):
        load_config(DistillConfig, None, ["precision=16"])
    with pytest.raises(SlimlmError, match="hidden"):
        load_config(DistillConfig, None, ["teacher_mode=topk", "loss.hidden_layers=2"])
    with pytest.raises(SlimlmError, match="offload"):
        load_config(DistillConfig, None, ["strategy=ddp", "offload=true"])


def test_dotted_override_into_a_single_value_from_the_file(tmp_path):
    with pytest.raises(SlimlmError, match="single value, not a section"):
        load_config(Outer, write(tmp_path, "steps: 3\n"), ["steps.x=1"])
