"""Parameter counting, budget parsing and planning: exact counts, the shared-ratio rule, user errors."""
import copy

import pytest
from transformers import AutoModelForCausalLM

from slimlm.toolkit.errors import SlimlmError
from slimlm.toolkit.models import tiny_model
from slimlm.toolkit.prune import Shape, check_shape, count_params, parse_axes, parse_target, plan, shape_at, shape_of


def built_size(model, shape: Shape) -> int:
    """Independent count: instantiate the shape with transformers and count its unique parameters."""
    config = copy.deepcopy(model.config)
    for k, v in shape.to_dict().items():
        setattr(config, k, v)
    config.head_dim = model.config.hidden_size // model.config.num_attention_heads
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[: shape.num_hidden_layers]
    return sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())


def test_count_matches_hand_arithmetic_for_tiny_llama():
    model, _ = tiny_model("llama")  # V=259, H=64, I=128, 2 layers, 4 heads / 2 KV heads of 16, tied
    layer = 64 * 64 + 2 * 32 * 64 + 64 * 64 + 3 * 128 * 64 + 2 * 64
    assert count_params(model) == 259 * 64 + 64 + 2 * layer == sum(p.numel() for p in model.parameters())
    small = Shape(num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, intermediate_size=32,
                  hidden_size=48)
    layer = 48 * 32 + 2 * 48 * 16 + 32 * 48 + 3 * 32 * 48 + 2 * 48
    assert count_params(model, small) == 259 * 48 + 48 + layer


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_count_matches_a_model_built_with_that_shape(arch):
    model, _ = tiny_model(arch, num_hidden_layers=3)
    for shape in [Shape(3, 4, 2, 128, 64), Shape(2, 2, 1, 48, 32), Shape(1, 4, 2, 16, 48)]:
        assert count_params(model, shape) == built_size(model, shape)


def test_parse_target():
    assert parse_target("70M", 10**9) == 70_000_000
    assert parse_target("1.5B", 10**10) == 1_500_000_000
    assert parse_target("500k", 10**9) == 500_000
    assert parse_target("123456", 10**9) == 123456
    assert parse_target("0.5", 1000) == 500
    assert parse_target(0.25, 1000) == 250
    assert parse_target("40%", 1000) == 400
    for bad in ["abc", "0", "-3M", "12X", "", "1.5", 2.5]:  # 1.5: neither a fraction nor a count
        with pytest.raises(SlimlmError):
            parse_target(bad, 1000)


def test_parse_axes_refuses_unknown_or_empty():
    assert parse_axes("mlp, heads,mlp") == {"mlp": 1.0, "heads": 1.0}
    assert parse_axes(["depth", "width:0.25"]) == {"depth": 1.0, "width": 0.25}
    for bad in ("width:0", "width:-1", "width:x", "mlp:inf"):
        with pytest.raises(SlimlmError, match="must be a positive number"):
            parse_axes(bad)
    with pytest.raises(SlimlmError, match="unknown pruning axis 'experts'"):
        parse_axes("heads,experts")
    with pytest.raises(SlimlmError, match="no pruning axis"):
        parse_axes(" , ")


def test_shape_rule_rounds_to_multiples_and_uniform_head_groups():
    model, _ = tiny_model("llama", num_hidden_layers=4, intermediate_size=256, num_attention_heads=8,
                          num_key_value_heads=4, hidden_size=128)
    s = shape_at(model, 0.6, ("heads", "mlp", "width", "depth"), multiple=16)
    # 0.6 * 256 = 153.6 -> 160 (10 x 16); 0.6 * 128 = 76.8 -> 80; 0.6 * 8 heads = 4.8 -> 4, as 2 whole groups
    # (whole groups win a tie of head counts; 80 = 5 x lcm(16, 4)); 0.6 * 4 layers = 2.4 -> 2
    assert s == Shape(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=160,
                      hidden_size=80)
    # The default multiple is 64; hidden 128 holds fewer than 4 of them, so it falls back to 32.
    assert shape_at(model, 0.6, ("mlp",)) == Shape(4, 8, 4, 128, 128)  # 153.6 -> 128; other axes untouched
    assert shape_at(model, 1.0, ("mlp", "width")) == shape_of(model)
    assert shape_at(model, 0.0, ("mlp", "width", "heads", "depth")) == Shape(1, 1, 1, 64, 32)
    # Weights: width:0.5 keeps 1 - 0.5 * 0.4 = 0.8 -> 102.4 -> 96; depth:2 keeps 1 - 2 * 0.4 = 0.2 -> 0.8 -> 1
    assert shape_at(model, 0.6, "mlp,width:0.5,depth:2") == Shape(1, 8, 4, 128, 96)
    assert shape_at(model, 0.6, "mlp,width:0.5,depth:2", multiple=16) == Shape(1, 8, 4, 160, 96)


def test_weighted_plan_shrinks_the_light_axis_less():
    model, _ = tiny_model("llama", num_hidden_layers=4, intermediate_size=256, hidden_size=128)
    even = plan(model, 0.5, "mlp,width")
    light = plan(model, 0.5, "mlp,width:0.3")
    assert light.shape.hidden_size > even.shape.hidden_size
    assert light.shape.intermediate_size < even.shape.intermediate_size
    assert light.params <= light.target and light.ratio < even.ratio
    # with every weight below 1 the ratio may go below 0 before an axis reaches its minimum
    axes = "mlp:0.5,width:0.5,depth:0.5"
    small = count_params(model, shape_at(model, -0.5, axes))  # keeps 1 - 0.5 * 1.5 = 25% of each axis
    deep = plan(model, small, axes)
    assert deep.params == small and -0.5 <= deep.ratio < 0


@pytest.mark.parametrize("axes", [("mlp",), ("heads", "mlp", "width"), ("heads", "mlp", "width", "depth")])
def test_plan_is_the_largest_shape_under_the_target(axes):
    model, _ = tiny_model("qwen2", num_hidden_layers=4, intermediate_size=256)
    before = count_params(model)
    target = int(before * 0.7) if axes == ("mlp",) else before // 2
    p = plan(model, target, axes)
    assert p.params == count_params(model, p.shape) <= target and p.params_before == before
    # Maximal for the rule: any larger shared ratio would exceed the budget.
    bigger = shape_at(model, min(1.0, p.ratio + 1e-6), axes)
    assert bigger == p.shape or count_params(model, bigger) > target
    assert p.shape != shape_of(model)


def test_plan_to_the_full_size_keeps_everything():
    model, _ = tiny_model("llama")
    p = plan(model, count_params(model), ("mlp", "width"))
    assert p.shape == shape_of(model) and p.ratio == 1.0


def test_target_larger_than_model_is_refused():
    model, _ = tiny_model("llama")
    with pytest.raises(SlimlmError, match="larger than the model"):
        plan(model, count_params(model) + 1, ("mlp",))


def test_unreachable_target_names_the_axes_to_add():
    model, _ = tiny_model("llama")
    with pytest.raises(SlimlmError, match="cannot be reached by pruning mlp") as err:
        plan(model, 0.3, ("mlp",))  # the embedding alone is 18% of the tiny model; mlp cannot go under ~70%
    assert "heads, width, depth" in str(err.value)


def test_unknown_axis_is_refused_by_plan():
    model, _ = tiny_model("llama")
    with pytest.raises(SlimlmError, match="unknown pruning axis"):
        plan(model, 0.5, ("heads", "vocab"))


def test_head_counts_must_keep_kv_groups_uniform():
    model, _ = tiny_model("llama", num_attention_heads=6, num_key_value_heads=2, hidden_size=96)  # 3 per group
    for heads, kv in [(5, 2), (6, 1), (4, 1)]:  # a ragged group, or more heads per group than the model has
        with pytest.raises(SlimlmError, match="same number of query heads per KV group") as err:
            check_shape(model, Shape(2, heads, kv, 128, 96))
        assert "1/1, 2/1, 2/2, 3/1, 4/2, 6/2" in str(err.value)
    with pytest.raises(SlimlmError, match="the model has 6"):
        check_shape(model, Shape(2, 9, 3, 128, 96))
    for heads, kv in [(6, 2), (4, 2), (2, 2), (3, 1), (1, 1)]:  # whole groups, or p heads in each of g groups
        check_shape(model, Shape(2, heads, kv, 128, 96))


def test_llama_width_must_be_a_multiple_of_the_heads():
    model, _ = tiny_model("llama", num_attention_heads=6, num_key_value_heads=2, hidden_size=96)
    with pytest.raises(SlimlmError, match="hidden_size to be a multiple of num_attention_heads"):
        check_shape(model, Shape(2, 6, 2, 128, 64))  # transformers would refuse to load 64 / 6
    check_shape(model, Shape(2, 4, 2, 128, 64))
    qwen, _ = tiny_model("qwen2", num_attention_heads=6, num_key_value_heads=2, hidden_size=96)
    check_shape(qwen, Shape(2, 6, 2, 128, 64))  # Qwen2's config has no such rule


def test_bad_multiple_is_refused():
    model, _ = tiny_model("llama")
    for bad in (0, -16, 1.5, "64", True):
        with pytest.raises(SlimlmError, match="size multiple must be a positive integer"):
            plan(model, 0.5, ("mlp",), multiple=bad)
