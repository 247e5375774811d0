"""Float32 linear layers through oneDNN while a CPU model is evaluated.

PyTorch runs a float32 `F.linear` on CPU through MKL's sgemm. At evaluation shapes (a batch of windows:
thousands of rows) oneDNN's matmul on the same weights was 1.2-1.3x faster on the 2-core AVX2 machine this
project measures on (121 against 91-95 GFLOP/s for SmolLM2's projections, 82-94 against 69-80 for its
49,152-row LM head; docs/benchmarks.md), and the perplexity of six models is most of the quickstart's time.
oneDNN sums in another order, so logits differ by float32 rounding (~1e-6 relative); perplexities agree
to their printed digits. The weight is reordered inside each call: no second copy of the model.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

MIN_ROWS = 256  # evaluation batches have thousands of rows; a few-row call keeps MKL (the threshold is not tuned)


def _linear(x, weight, bias):  # the module's own reference, so tests can count the calls
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def available() -> bool:
    return (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _forward(module: nn.Linear):
    def forward(x):
        if (x.dtype == torch.float32 and x.dim() in (2, 3) and x.device.type == "cpu" and not torch.is_grad_enabled()
                and x.numel() // x.shape[-1] >= MIN_ROWS):
            return _linear(x.contiguous(), module.weight, module.bias)
        return F.linear(x, module.weight, module.bias)
    return forward


@contextmanager
def onednn_linears(model: nn.Module):
    """Inside the block, every float32 CPU `nn.Linear` of `model` runs through oneDNN for inputs of at least
    MIN_ROWS rows without autograd (other calls keep `F.linear`); afterwards the modules are as they were."""
    patched = []
    if available():
        for m in model.modules():
            if (type(m) is nn.Linear and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu"
                    and "forward" not in vars(m)):  # not one patched already (a nested block leaves it to the outer)
                m.forward = _forward(m)
                patched.append(m)
    try:
        yield len(patched)
    finally:
        for m in patched:
            del m.forward  # the class's forward again
