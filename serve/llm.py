"""The offline Python API: `LLM(model).generate(prompts, SamplingParams(...))`.

All prompts go into one engine at once, so they are batched continuously; outputs come back in
prompt order.
"""
from __future__ import annotations

from rich.progress import Progress

from .engine.engine import EngineConfig, LLMEngine
from .engine.outputs import RequestOutput
from .sampling_params import SamplingParams


class LLM:
    """`model` is anything `slimlm.toolkit.models.load` accepts, or a loaded HF model (pass `tokenizer`).

    `config` holds `EngineConfig` fields, e.g. `LLM("smollm2-135m", kv_cache_dtype="int8")` for an int8
    KV cache (twice the sequences of bf16 in the same `kv_cache_gb`).
    """

    def __init__(self, model, tokenizer=None, dtype=None, device: str = "cpu", **config):
        cfg = EngineConfig(**config)
        if isinstance(model, str):
            self.engine = LLMEngine.from_spec(model, cfg, dtype=dtype, device=device)
        else:
            if tokenizer is None:
                raise ValueError("pass the tokenizer together with a loaded model")
            if dtype is not None:  # the engine casts the loaded model's weights (was: ignored)
                from slimlm.toolkit.models import parse_dtype

                cfg.dtype = parse_dtype(dtype)
            self.engine = LLMEngine(model, tokenizer, cfg)
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None,
                 progress: bool = False) -> list[RequestOutput]:
        """Generate for a string, a list of strings, or a list of token-id lists."""
        if hasattr(prompts, "tolist"):  # token ids as a tensor or an array: [T] one prompt, [B, T] several
            prompts = prompts.tolist()
        if not isinstance(prompts, (str, list, tuple)):  # a single id (a 0-d tensor)
            prompts = [[prompts]]
        if isinstance(prompts, str) or (len(prompts) > 0 and not isinstance(prompts[0], (str, list, tuple))):
            prompts = [prompts]  # one prompt: a string, or its ids (the engine checks that they are integers)
        params = params or SamplingParams()
        per_prompt = params if isinstance(params, list) else [params] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"got {len(per_prompt)} SamplingParams for {len(prompts)} prompts")
        ids = [self.tokenizer(prompt).input_ids if isinstance(prompt, str) else list(prompt) for prompt in prompts]
        results: dict[str, RequestOutput] = {}
        try:  # a bad prompt, an error or Ctrl-C mid-way: nothing of this call stays queued in the engine
            for i, (prompt_ids, p) in enumerate(zip(ids, per_prompt)):
                try:
                    self.engine.add_request(str(i), prompt_ids, p)
                except ValueError as err:
                    raise ValueError(f"prompt {i}: {err}") from None
            with Progress(disable=not progress, transient=True) as bar:
                task = bar.add_task("generating", total=len(prompts))
                while self.engine.has_unfinished():
                    for out in self.engine.step():
                        if out.finished:
                            results[out.request_id] = out
                            bar.advance(task)
        finally:
            for i in range(len(prompts)):
                self.engine.abort_request(str(i))  # a no-op for finished ones
        return [results[str(i)] for i in range(len(prompts))]
