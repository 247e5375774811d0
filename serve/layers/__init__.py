"""Building blocks of slimlm's runtime models: paged attention, rotary, RMSNorm, the linear seam."""
from .attention import AttentionMetadata, paged_attention, reference_paged_attention, write_kv
from .kv_quant import QuantizedKV
from .linear import Linear, LinearFactory, make_linear
from .norm import RMSNorm, rms_norm
from .rotary import RotaryEmbedding, apply_rotary, rope_inv_freq

__all__ = ["AttentionMetadata", "Linear", "QuantizedKV", "LinearFactory", "RMSNorm", "RotaryEmbedding", "apply_rotary",
           "make_linear", "paged_attention", "reference_paged_attention", "rms_norm", "rope_inv_freq",
           "write_kv"]
