"""Lens exits: an affine map of h_E (zero at first) before the exit's own norm, fitted by least squares to
the last layer's state; written and read back with the export."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from slimlm.toolkit.early_exit import (EXIT_FILE, ExitHeads, capture_hidden, fit_lenses, load_exit_tensors, load_exits,
                                       read_exit_spec, solve_lens, write_with_exits)
from slimlm.toolkit.errors import SlimlmError
from slimlm.toolkit.models import tiny_model


def random_model(seed=0, layers=3):
    model, tok = tiny_model("llama", seed=seed, num_hidden_layers=layers)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval(), tok


def test_a_fresh_lens_is_the_own_norm_exit_and_its_map_changes_the_logits():
    model, _ = random_model()
    own, lens = ExitHeads.for_model(model, [1, 2], "own"), ExitHeads.for_model(model, [1, 2], "lens")
    h = torch.randn(2, 5, model.config.hidden_size)
    with torch.no_grad():
        assert torch.equal(own.logits(model, 1, h), lens.logits(model, 1, h))
        head = lens.exits["1"]
        head.proj.weight.normal_()
        head.proj.bias.normal_()
        n = model.model.norm(h)
        want = model.lm_head(n + n @ head.proj.weight.T + head.proj.bias)
        torch.testing.assert_close(lens.logits(model, 1, h), want)
    assert sorted(lens.state_dict()) == [f"exits.{e}.{n}" for e in (1, 2)
                                         for n in ("norm.weight", "proj.bias", "proj.weight")]


def test_solve_lens_recovers_an_exact_affine_map():
    g = torch.Generator().manual_seed(0)
    d, n = 6, 200
    a, b = torch.randn(d, d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    x = torch.cat([torch.randn(n, d, generator=g, dtype=torch.float64), torch.ones(n, 1, dtype=torch.float64)], 1)
    y = x[:, :d] @ a + b
    weight, bias = solve_lens(x.T @ x, x.T @ y, ridge=0.0)
    torch.testing.assert_close(weight, (a - torch.eye(d, dtype=torch.float64)).T)
    torch.testing.assert_close(bias, b)
    # a ridge pulls the map towards zero, never away from it
    ridged, _ = solve_lens(x.T @ x, x.T @ y, ridge=10.0)
    assert (ridged + torch.eye(d, dtype=torch.float64)).norm() < a.norm()
    with pytest.raises(SlimlmError, match="ridge must be >= 0"):
        solve_lens(x.T @ x, x.T @ y, ridge=-1.0)


def test_fit_lenses_is_the_least_squares_map_over_every_position():
    model, _ = random_model(seed=1)
    blocks = torch.randint(0, 256, (5, 40), generator=torch.Generator().manual_seed(1))  # 5: not a multiple of 2; 200 rows > D+1
    exits = ExitHeads.for_model(model, [1, 2], "lens")
    fit_lenses(model, exits, blocks, ridge=0.0, batch_size=2, progress=False)
    with torch.no_grad(), capture_hidden(model, [1, 2, 3]) as hidden:
        model(input_ids=blocks, use_cache=False)
    d = model.config.hidden_size
    with torch.no_grad():
        y = model.model.norm(hidden[3]).reshape(-1, d).double()
        for e in (1, 2):
            n = exits.exits[str(e)].norm(hidden[e]).reshape(-1, d).double()
            x = torch.cat([n, torch.ones(len(y), 1, dtype=torch.float64)], 1)
            solution = torch.linalg.lstsq(x, y).solution  # [D+1, D], the reference
            proj = exits.exits[str(e)].proj
            torch.testing.assert_close(proj.weight.double(), (solution[:d] - torch.eye(d, dtype=torch.float64)).T,
                                       atol=2e-4, rtol=1e-3)
            torch.testing.assert_close(proj.bias.double(), solution[d], atol=2e-4, rtol=1e-3)
            # the fitted exit predicts what the head reads from the last layer better than its norm alone
            fitted = exits.exits[str(e)](hidden[e]).reshape(-1, d).double()
            assert (fitted - y).pow(2).mean() < (n - y).pow(2).mean()


def test_fit_lenses_refuses_other_exits_and_empty_blocks():
    model, _ = random_model()
    with pytest.raises(SlimlmError, match="needs lens exits"):
        fit_lenses(model, ExitHeads.for_model(model, [1], "own"), torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(SlimlmError, match=r"token blocks \[N, T\]"):
        fit_lenses(model, ExitHeads.for_model(model, [1], "lens"), torch.zeros(4, dtype=torch.long))


def test_lens_exits_round_trip_through_the_export(tmp_path):
    model, tok = random_model(seed=2)
    exits = ExitHeads.for_model(model, [1, 2], "lens")
    with torch.no_grad():
        for p in exits.parameters():
            p.normal_()
    out = write_with_exits(model, tok, exits, tmp_path / "lens")
    spec = read_exit_spec(out)
    assert (spec.layers, spec.norm, spec.file) == ([1, 2], "lens", EXIT_FILE)
    back = load_exits(out, model)
    h = torch.randn(1, 4, model.config.hidden_size)
    with torch.no_grad():
        for e in (1, 2):
            assert torch.equal(back.logits(model, e, h), exits.logits(model, e, h))
    # a lens file without its maps is refused by the manifest's size check, and by its keys
    tensors = load_file(str(out / EXIT_FILE))
    del tensors["exits.2.proj.bias"]
    save_file(tensors, str(out / EXIT_FILE))
    with pytest.raises(SlimlmError, match="truncated or replaced"):
        load_exits(out, model)
    with pytest.raises(SlimlmError, match=r"expected \[.*exits.2.proj.bias"):
        load_exit_tensors(out, spec)
