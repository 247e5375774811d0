"""`select`: which layers, KV groups, query heads within groups and channels survive, from hand-made scores."""
import torch

from slimlm.toolkit.models import tiny_model
from slimlm.toolkit.prune import Importance, Shape, select, shrink


def scores(heads, kv, n_layers=2, inter=128, hidden=96):
    return Importance(heads=torch.tensor(heads, dtype=torch.float64), kv_heads=torch.tensor(kv, dtype=torch.float64),
                      mlp=torch.arange(n_layers * inter, dtype=torch.float64).view(n_layers, inter),
                      hidden=torch.arange(hidden, dtype=torch.float64), layers=torch.tensor([2.0, 1.0]),
                      method="activation")


def test_keeps_the_best_heads_of_each_group_and_the_best_groups():
    model, _ = tiny_model("llama", num_attention_heads=6, num_key_value_heads=2, hidden_size=96)  # groups 0-2 | 3-5
    imp = scores(heads=[[5, 1, 4, 3, 9, 2], [1, 2, 3, 4, 5, 6]], kv=[[0, 0], [0, 0]])
    keep = select(model, imp, Shape(2, 4, 2, 128, 96))  # 2 groups x 2 heads
    assert keep.kv_heads == [[0, 1], [0, 1]]
    assert keep.q_heads == [[0, 2, 3, 4], [1, 2, 4, 5]]
    # One group of 2: group 1's best two (9 + 3 = 12) beat group 0's (5 + 4 = 9) in layer 0 ...
    keep = select(model, imp, Shape(2, 2, 1, 128, 96))
    assert keep.kv_heads == [[1], [1]] and keep.q_heads == [[3, 4], [4, 5]]
    # ... unless group 0's own KV score makes up the difference.
    keep = select(model, scores(heads=imp.heads.tolist(), kv=[[3.5, 0], [0, 0]]), Shape(2, 2, 1, 128, 96))
    assert keep.kv_heads == [[0], [1]] and keep.q_heads == [[0, 2], [4, 5]]
    # Whole groups, as before: every head of the kept groups.
    keep = select(model, imp, Shape(2, 3, 1, 128, 96))
    assert keep.q_heads == [[3, 4, 5], [3, 4, 5]] and keep.shape(model) == Shape(2, 3, 1, 128, 96)
    small = shrink(model, select(model, imp, Shape(1, 2, 2, 64, 48)))
    assert (small.config.num_attention_heads, small.config.num_key_value_heads) == (2, 2)
