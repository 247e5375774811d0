"""The Llama family (Llama 2/3, SmolLM2, Mistral) and Qwen2/Qwen3, over a paged KV cache.

One implementation; the families differ only in what their checkpoints hold, read at load time:
attention bias (Qwen2), per-head RMSNorm of q and k before RoPE (Qwen3), tied embeddings (SmolLM2,
small Qwens), an explicit head_dim (Qwen3, some Mistrals), RoPE scaling (Llama 3.1+).

Built for batch-1 decode on CPU, where Python overhead per layer is a large share of the time:
q/k/v are one matmul and gate/up another (weights concatenated at load), q and k get RoPE (and the
Qwen3 norm) in one op on their joint view, RoPE tables are looked up once per step, and the cache
is preallocated by `allocate_kv_cache` and written in place (in the model dtype, or in int8 with
per-block scales: `serve/layers/kv_quant.py`).

`forward` returns the residual stream before the final norm, after `num_layers` layers (all by
default): early-exit heads read it there. `compute_logits` applies the final norm and the LM head
to the rows asked for only.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers.attention import AttentionMetadata, paged_attention, write_kv
from ..layers.kv_quant import QuantizedKV, kv_block_bytes
from ..layers.linear import LinearFactory, make_linear as dense_linear
from ..layers.norm import RMSNorm, add_rms_norm, rms_norm
from ..layers.rotary import RotaryEmbedding, apply_rotary, rope_inv_freq, rope_write_kv
from . import cpu_decode
from .cpu_decode import silu_mul

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class ModelArgs:
    """The shape of a model, as plain data (read from a Hugging Face config by `from_hf_config`)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_parameters: dict = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    # Where some layer attends only to this many recent tokens. The runtime attends to the whole context, the same
    # up to the window, so the engine caps its max model length there (see `from_hf_config`).
    sliding_window: int | None = None

    @classmethod
    def from_hf_config(cls, config) -> ModelArgs:
        """Read a transformers `PretrainedConfig` of a supported family; raise ValueError for what we cannot run."""
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not supported by slimlm's runtime; supported: "
                             f"{', '.join(SUPPORTED_MODEL_TYPES)}. Serve it with transformers or vLLM instead.")
        act = getattr(config, "hidden_act", "silu")
        if act not in ("silu", "swish"):  # transformers' two names of the same function
            raise ValueError(f"hidden_act {act!r} is not supported (the Llama-family MLP here is SiLU-gated)")
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        if heads % kv_heads:
            raise ValueError(f"num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})")
        rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
        rope.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
        rope.setdefault("rope_type", rope.get("type", "default"))
        if rope["rope_type"] == "llama3":
            rope.setdefault("original_max_position_embeddings", config.max_position_embeddings)
        window = getattr(config, "sliding_window", None)
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None:  # transformers names each layer's attention (Qwen2/3: the layers past
            slides = "sliding_attention" in layer_types  # max_window_layers slide, the others do not)
        else:
            slides = model_type == "mistral" or bool(getattr(config, "use_sliding_window", False))
        if not slides or (window is not None and window >= config.max_position_embeddings):
            window = None  # no layer's window is shorter than the context
        return cls(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                   intermediate_size=config.intermediate_size, num_layers=config.num_hidden_layers,
                   num_heads=heads, num_kv_heads=kv_heads,
                   head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
                   rms_norm_eps=config.rms_norm_eps, rope_parameters=rope,
                   max_position_embeddings=config.max_position_embeddings,
                   tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
                   sliding_window=window)


class DecoderLayer(nn.Module):
    """Pre-norm attention block then pre-norm SiLU-gated MLP, each added to the residual stream."""

    def __init__(self, args: ModelArgs, qkv_proj: nn.Module, o_proj: nn.Module, gate_up_proj: nn.Module,
                 down_proj: nn.Module, input_norm: RMSNorm, post_attention_norm: RMSNorm,
                 qk_norm_weight: Tensor | None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        self.intermediate_size = args.intermediate_size
        self.eps = args.rms_norm_eps
        self.scale = args.head_dim ** -0.5
        self.qkv_proj, self.o_proj = qkv_proj, o_proj
        self.gate_up_proj, self.down_proj = gate_up_proj, down_proj
        self.input_norm, self.post_attention_norm = input_norm, post_attention_norm
        # Qwen3: q_norm repeated over the H query heads, then k_norm over the KVH key heads: [H + KVH, D],
        # so one norm covers the joint q|k view.
        self.qk_norm_weight = None if qk_norm_weight is None else nn.Parameter(qk_norm_weight, requires_grad=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor | QuantizedKV,
                v_cache: Tensor | QuantizedKV, meta: AttentionMetadata) -> Tensor:
        # x: [N, hidden]; cos, sin: [N, 1, D]; caches: [num_blocks, block_size, KVH, D] (plain or int8)
        n = x.shape[0]
        h, kvh, d = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(self.input_norm(x))                            # [N, (H + 2 KVH) D]
        if self.qk_norm_weight is None:
            q = rope_write_kv(qkv, cos, sin, k_cache, v_cache, meta.slot_mapping, h,  # [N, H, D]
                              one_token_per_block=meta.is_decode_only)
        else:
            qkv = qkv.view(n, h + 2 * kvh, d)                              # [N, H + 2 KVH, D]
            qk, v = qkv[:, :h + kvh], qkv[:, h + kvh:]                     # [N, H + KVH, D], [N, KVH, D]
            qk = apply_rotary(rms_norm(qk, self.qk_norm_weight, self.eps), cos, sin)
            q, k = qk[:, :h], qk[:, h:]
            write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        attn = paged_attention(q, k_cache, v_cache, meta, self.scale)      # [N, H, D]
        x, normed = add_rms_norm(x, self.o_proj(attn.reshape(n, h * d)), self.post_attention_norm.weight, self.eps)
        gate_up = self.gate_up_proj(normed)                                # [N, 2 I]
        return x + self.down_proj(silu_mul(gate_up))


class CausalLM(nn.Module):
    """A decoder-only LM whose attention reads and writes a paged KV cache. Inference only."""

    def __init__(self, args: ModelArgs, embed_tokens: Tensor | None, layers: list[DecoderLayer], norm: RMSNorm,
                 lm_head: nn.Module, inv_freq: Tensor | None = None):
        """`embed_tokens` [V, hidden], or None where the embeddings are tied and `lm_head` reads its rows from
        its packed weight (`PackedLinear.rows`): the matrix is then held once, not twice."""
        super().__init__()
        self.args = args
        self.embed_weight = None if embed_tokens is None else nn.Parameter(embed_tokens, requires_grad=False)
        # The lookup's source when tied: kept even where lm_head is replaced later (`quantize_lm_head`); not
        # a submodule of its own (the head is already one).
        self.__dict__["_embed_head"] = lm_head if embed_tokens is None else None
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        self.lm_head = lm_head
        computed = rope_inv_freq(args.head_dim, args.rope_parameters)  # also refuses RoPE types we cannot run
        inv_freq = computed if inv_freq is None else inv_freq
        self.rotary = RotaryEmbedding(inv_freq, max_positions=min(args.max_position_embeddings, 4096),
                                      dtype=norm.weight.dtype).to(norm.weight.device)

    @property
    def embed_tokens(self) -> Tensor:
        """The embedding matrix [V, hidden] (where tied and packed: unpacked anew, for inspection)."""
        return self.embed_weight if self._embed_head is None else self._embed_head.weight

    def embed(self, input_ids: Tensor) -> Tensor:
        """[N] token ids -> [N, hidden]."""
        if self._embed_head is None:
            return F.embedding(input_ids, self.embed_weight)
        return self._embed_head.rows(input_ids)

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    @classmethod
    def from_hf(cls, source, config=None, dtype: torch.dtype | None = None,
                make_linear: LinearFactory = dense_linear, quantized=None) -> CausalLM:
        """Build from a transformers model (or its state dict plus `config`), fusing q/k/v and gate/up.

        `dtype` defaults to the checkpoint's. `make_linear` builds every projection (the seam where a
        quantized format replaces the dense `F.linear`). `quantized(names, bias)`, if given, is asked
        first for each projection (`names`: the state-dict names of its fused parts, without ".weight";
        `bias` in `dtype`) and returns a module or None (dense). The weights are copied where fused or
        cast and shared otherwise, so the source model can be dropped afterwards.
        """
        if isinstance(source, nn.Module):
            config = config if config is not None else source.config
            state = source.state_dict()
        else:
            state = dict(source)
        if config is None:
            raise ValueError("from_hf got a state dict without a config; pass the model's transformers config")
        args = ModelArgs.from_hf_config(config)
        prefix = "model." if "model.embed_tokens.weight" in state else ""
        embed = state[prefix + "embed_tokens.weight"]
        dtype = dtype or embed.dtype
        get = lambda name: None if name not in state else state[name].to(dtype)  # noqa: E731
        cat = lambda *ts: None if ts[0] is None else torch.cat(ts, dim=0)  # noqa: E731

        def linear(*names: str) -> nn.Module:  # one projection, its parts fused along the output dim
            bias = cat(*(get(n + ".bias") for n in names))
            if quantized is not None and (layer := quantized(list(names), bias)) is not None:
                return layer
            return make_linear(cat(*(get(n + ".weight") for n in names)), bias)

        layers = []
        for i in range(args.num_layers):
            p = f"{prefix}layers.{i}."
            a, m = p + "self_attn.", p + "mlp."
            q_norm, k_norm = get(a + "q_norm.weight"), get(a + "k_norm.weight")
            qk_norm = None
            if q_norm is not None:
                qk_norm = torch.cat((q_norm.expand(args.num_heads, -1), k_norm.expand(args.num_kv_heads, -1)))
            layers.append(DecoderLayer(
                args,
                qkv_proj=linear(a + "q_proj", a + "k_proj", a + "v_proj"),
                o_proj=linear(a + "o_proj"),
                gate_up_proj=linear(m + "gate_proj", m + "up_proj"),
                down_proj=linear(m + "down_proj"),
                input_norm=RMSNorm(get(p + "input_layernorm.weight"), args.rms_norm_eps),
                post_attention_norm=RMSNorm(get(p + "post_attention_layernorm.weight"), args.rms_norm_eps),
                qk_norm_weight=qk_norm))
        embed = embed.to(dtype)
        if args.tie_word_embeddings or "lm_head.weight" not in state:
            head = make_linear(embed, None)
            if getattr(head, "has_rows", False):  # the lookup reads the head's packed rows: one copy, not two
                embed = None
        else:
            head = linear("lm_head")
        return cls(args, embed, layers, RMSNorm(get(prefix + "norm.weight"), args.rms_norm_eps),
                   head, inv_freq=_hf_inv_freq(source, args))

    def allocate_kv_cache(self, num_blocks: int, block_size: int, dtype: torch.dtype | None = None,
                          device: torch.device | str | None = None) -> list[tuple[Tensor, Tensor]]:
        """One zeroed (k_cache, v_cache) pair per layer, each [num_blocks, block_size, KVH, D].

        `dtype` defaults to the model's; torch.int8 gives `QuantizedKV` pairs (int8 data plus
        per-block, per-head scales). Zeroed, not empty: padding slots are read (then masked), and
        masked NaN garbage would still poison the softmax-weighted sum.
        """
        a = self.args
        shape = (num_blocks, block_size, a.num_kv_heads, a.head_dim)
        dtype, device = dtype or self.dtype, device or self.device
        if dtype == torch.int8:
            return [(QuantizedKV.zeros(shape, device), QuantizedKV.zeros(shape, device)) for _ in range(a.num_layers)]
        if not dtype.is_floating_point:
            raise ValueError(f"KV cache dtype {dtype} is not supported: use a float dtype or torch.int8")
        kw = dict(dtype=dtype, device=device)
        return [(torch.zeros(shape, **kw), torch.zeros(shape, **kw)) for _ in range(a.num_layers)]

    def kv_cache_block_bytes(self, block_size: int, dtype: torch.dtype | None = None) -> int:
        """Bytes of one KV block over all layers (K and V, int8 scales included) for cache `dtype`."""
        a = self.args
        return kv_block_bytes(a.num_layers, block_size, a.num_kv_heads, a.head_dim, dtype or self.dtype)

    def forward(self, input_ids: Tensor, positions: Tensor, kv_caches: list[tuple[Tensor, Tensor]],
                meta: AttentionMetadata, num_layers: int | None = None) -> Tensor:
        """Run the first `num_layers` layers (all by default) on a flattened step.

        input_ids, positions: [N]; kv_caches: from `allocate_kv_cache` (at least `num_layers` pairs). Int8
        caches run layer by layer (the fused C decode stack reads only caches in the model dtype).
        Returns the residual stream [N, hidden], before the final norm.
        """
        n_layers = len(self.layers) if num_layers is None else num_layers
        if not 0 <= n_layers <= len(self.layers) or len(kv_caches) < n_layers:
            raise ValueError(f"num_layers={n_layers} needs 0..{len(self.layers)} layers and as many KV cache "
                             f"pairs; got {len(kv_caches)} pairs")
        x = self.embed(input_ids)                                          # [N, hidden]
        return self.run_layers(x, positions, kv_caches, meta, 0, n_layers)

    def run_layers(self, x: Tensor, positions: Tensor, kv_caches: list[tuple[Tensor, Tensor]],
                   meta: AttentionMetadata, first: int, last: int) -> Tensor:
        """Layers [first, last) on the residual stream x [N, hidden] entering layer `first` (a speculative
        verify pass starts where the draft stopped). Decode-only steps of up to a few dozen rows run in one C call."""
        num_slots = kv_caches[0][0].shape[0] * kv_caches[0][0].shape[1] if last > first else 0
        slots = meta.slot_mapping
        if num_slots and slots.numel() and slots.device.type == "cpu":
            # The C kernels write where they are told: refuse what index_copy_ would have refused (CPU
            # only: on a GPU index_copy_ checks, and reading the bounds here would sync every step).
            lo, hi = (int(v) for v in torch.aminmax(slots))
            if lo < 0 or hi >= num_slots:
                raise ValueError(f"slot_mapping holds slots outside the KV cache's {num_slots} ({lo}..{hi})")
        cos, sin = self.rotary(positions, meta.max_seq_len - 1)            # [N, 1, D] each
        if (last > first and cpu_decode.can_run(meta, x.shape[0]) and (stack := self._decode_stack()) is not None
                and x.shape[0] <= stack.max_rows and stack.bind(kv_caches, last)):
            return stack(x, cos, sin, kv_caches, meta, first, last)       # the same layers, in one C call
        for layer, (k_cache, v_cache) in zip(self.layers[first:last], kv_caches[first:last]):
            x = layer(x, cos, sin, k_cache, v_cache, meta)
        return x

    def _decode_stack(self) -> cpu_decode.DecodeStack | None:
        # Built on the first small decode step (the weights are final by then), kept while kernels are on.
        if not cpu_decode.kernels_enabled():
            return None
        if not hasattr(self, "_stack"):
            self._stack = cpu_decode.decode_stack_for(self)
        return self._stack

    def compute_logits(self, hidden: Tensor) -> Tensor:
        """hidden [M, hidden] (e.g. `hidden[meta.last_token_indices]`) -> logits [M, vocab]."""
        return self.lm_head(self.norm(hidden))


def _hf_inv_freq(source, args: ModelArgs) -> Tensor | None:
    """The RoPE frequencies a transformers module actually uses (None: compute them from the config).

    transformers keeps `inv_freq` as a buffer that `model.to(torch.bfloat16)` rounds to bf16 (a model
    loaded in bf16 keeps it in fp32) and computes cos/sin from it: reading it keeps our positions
    bit-identical to the module's either way.
    """
    if not isinstance(source, nn.Module):
        return None
    for name, buf in source.named_buffers():
        if name.endswith("rotary_emb.inv_freq") and buf.shape == (args.head_dim // 2,):
            return buf.detach().float().cpu()
    return None
