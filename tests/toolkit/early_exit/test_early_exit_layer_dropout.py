"""Layer dropout: rates grow with depth, skips happen at those rates, identity at eval, seeded, removable."""
import pytest
import torch

from slimlm.toolkit.early_exit import LayerDropout, dropout_rates
from slimlm.toolkit.errors import SlimlmError
from slimlm.toolkit.models import tiny_model


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_rates_by_schedule():
    assert dropout_rates(5, 0.2, "linear") == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])
    exp = dropout_rates(5, 0.2, "exponential")
    assert exp[0] == 0.0 and exp[-1] == pytest.approx(0.2)
    assert all(a < b for a, b in zip(exp, exp[1:]))
    assert all(e <= lin + 1e-12 for e, lin in zip(exp, dropout_rates(5, 0.2, "linear")))  # convex: later
    assert dropout_rates(3, 0.1, "constant") == pytest.approx([0.1] * 3)
    with pytest.raises(SlimlmError, match="schedule"):
        dropout_rates(3, 0.1, "cubic")
    with pytest.raises(SlimlmError, match="p_max"):
        dropout_rates(3, 1.0)


def test_skip_frequency_matches_the_rates():
    model, _ = tiny_model("llama", num_hidden_layers=4)
    drop = LayerDropout(model, 0.6, "linear", seed=1)
    n = 2000
    freq = []
    for layer in range(4):
        hits = 0
        for step in range(n):
            drop.set_step(step)
            hits += drop.skips(layer)
        freq.append(hits / n)
    for f, r in zip(freq, [0.0, 0.2, 0.4, 0.6]):
        assert abs(f - r) < 0.04, (freq, r)


def run(model, x):
    return model(input_ids=x).logits


def test_training_skips_layers_eval_is_identity_and_remove_restores():
    model, _ = tiny_model("llama", num_hidden_layers=4)
    x = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = run(model.eval(), x)
    drop = LayerDropout(model, 0.9, "constant", seed=0).install()
    with torch.no_grad():
        assert torch.equal(run(model.eval(), x), reference) and drop.skipped == 0  # off at eval
        model.train()
        outs = []
        for step in range(6):
            drop.set_step(step)
            outs.append(run(model, x))
    assert drop.skipped > 0
    assert any(not torch.allclose(o, reference) for o in outs)
    drop.remove()
    with torch.no_grad():
        model.train()
        assert torch.equal(run(model, x), reference)  # tiny models have no dropout of their own
    assert "forward" not in model.model.layers[0].__dict__


def test_same_seed_same_skips_and_a_skipped_layer_returns_its_input():
    model, _ = tiny_model("llama", num_hidden_layers=4)
    x = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    model.train()
    drop = LayerDropout(model, 0.5, "constant", seed=7).install()
    seen = []
    layer0 = model.model.layers[0]
    hook = layer0.register_forward_hook(lambda m, a, out: seen.append(torch.equal(out, a[0])))
    runs = []
    for _ in range(2):
        drop.set_step(3)
        with torch.no_grad():
            runs.append(run(model, x))
    hook.remove()
    assert torch.equal(runs[0], runs[1])
    assert seen[0] == drop.skips(0) and seen[0] == seen[1]
    other = LayerDropout(model, 0.5, "constant", seed=8)
    pattern = lambda d: [(d.set_step(s), d.skips(i))[1] for s in range(20) for i in range(4)]
    assert pattern(drop) == pattern(LayerDropout(model, 0.5, "constant", seed=7)) != pattern(other)
    drop.remove()


def test_skipped_layers_still_get_a_zero_gradient():
    model, _ = tiny_model("llama", num_hidden_layers=2)
    model.train()
    drop = LayerDropout(model, 0.99, "constant", seed=0).install()
    drop.set_step(0)
    assert drop.skips(0) and drop.skips(1)
    x = torch.randint(0, 256, (1, 8))
    run(model, x).sum().backward()
    grads = [p.grad for p in model.model.layers[0].parameters()]
    assert all(g is not None and torch.count_nonzero(g) == 0 for g in grads)  # present (DDP) and zero
    drop.remove()
