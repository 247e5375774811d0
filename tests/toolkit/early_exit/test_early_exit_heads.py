"""Exit heads: the exit at the last layer with the shared norm is the model itself; h_E is layer E's output."""
import pytest
import torch

from slimlm.toolkit.early_exit import ExitHeads, capture_hidden, exit_logits
from slimlm.toolkit.errors import SlimlmError
from slimlm.toolkit.models import tiny_model


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def model(request):
    return tiny_model(request.param, seed=3, num_hidden_layers=4)[0]


def ids():
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


def test_last_layer_with_shared_norm_is_the_model_exactly(model):
    x = ids()
    exits = ExitHeads.for_model(model, [2, 4], "shared")
    with torch.no_grad():
        final, by_exit = exit_logits(model, x, exits)
        plain = model(input_ids=x).logits
    assert torch.equal(by_exit[4], plain) and torch.equal(final, plain)
    assert not torch.allclose(by_exit[2], plain, atol=1e-3)  # a shallower exit is a different model


def test_hidden_is_the_output_of_layer_e(model):
    x = ids()
    with torch.no_grad(), capture_hidden(model, [1, 3]) as hidden:
        out = model(input_ids=x, output_hidden_states=True)
    for e in (1, 3):
        assert torch.equal(hidden[e], out.hidden_states[e])
    # our hooks are gone after the block (transformers keeps its own once output_hidden_states was used)
    hooks = [len(m._forward_hooks) for m in model.model.layers]
    with torch.no_grad(), capture_hidden(model, [2]) as again:
        assert [len(m._forward_hooks) for m in model.model.layers][1] == hooks[1] + 1
        model(input_ids=x)
    assert set(again) == {2}
    assert [len(m._forward_hooks) for m in model.model.layers] == hooks


def test_own_norms_start_as_copies_of_the_final_norm_and_train_alone(model):
    x = ids()
    shared = ExitHeads.for_model(model, [2], "shared")
    own = ExitHeads.for_model(model, [2], "own")
    assert list(own.state_dict()) == ["exits.2.norm.weight"] and not list(shared.state_dict())
    with torch.no_grad():
        a = exit_logits(model, x, shared)[1][2]
        b = exit_logits(model, x, own)[1][2]
        assert torch.equal(a, b)
        own.exits["2"].norm.weight.mul_(2.0)
        c = exit_logits(model, x, own)[1][2]
    assert not torch.allclose(a, c)
    assert own.exits["2"].norm.weight.data_ptr() != model.model.norm.weight.data_ptr()


@pytest.mark.parametrize("layers, match", [([0], "out of range"), ([5], "out of range"), ([2, 2], "repeat"),
                                           ([], "no exit layers")])
def test_bad_layers_are_refused(model, layers, match):
    with pytest.raises(SlimlmError, match=match):
        ExitHeads.for_model(model, layers)


def test_unknown_norm_is_refused(model):
    with pytest.raises(SlimlmError, match="unknown exit norm"):
        ExitHeads.for_model(model, [1], "mine")
