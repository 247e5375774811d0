"""Prometheus metrics for `/metrics`, all named `slimlm_*`.

Each app gets its own registry rather than prometheus_client's global one, so several servers in
one process (tests, a benchmark beside a server) never collide on metric names. Engine gauges and
token counters are read from the worker's latest `engine.stats()` snapshot at scrape time: the
scrape never calls into the engine, which only its own thread may touch.
"""
from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Latency buckets span a fast GPU (ms) to a loaded 2-core CPU (tens of seconds).
_TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                 0.75, 1.0, 2.5, 5.0)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)

_GAUGES = {  # stats key -> (metric name, help)
    "running": ("slimlm_num_requests_running", "Requests in the engine's running batch."),
    "waiting": ("slimlm_num_requests_waiting", "Requests waiting for the engine to admit them."),
    "inflight": ("slimlm_num_requests_inflight", "Engine requests the server holds (bounded by max_queue)."),
    "kv_blocks_used": ("slimlm_kv_blocks_used", "KV-cache blocks in use."),
    "kv_blocks_free": ("slimlm_kv_blocks_free", "KV-cache blocks free."),
    "prefix_cache_hit_rate": ("slimlm_prefix_cache_hit_rate", "Share of prompt blocks served from the prefix cache."),
    "spec_acceptance_rate": ("slimlm_spec_acceptance_rate", "Share of drafted tokens accepted (speculative decoding)."),
    "spec_mean_accepted_length": ("slimlm_spec_mean_accepted_length",
                                  "Tokens emitted per speculative step and sequence (accepted drafts + 1)."),
}
_COUNTERS = {
    "prompt_tokens_total": ("slimlm_prompt_tokens", "Prompt tokens received."),
    "generation_tokens_total": ("slimlm_generation_tokens", "Tokens generated."),
    "preemptions_total": ("slimlm_num_preemptions", "Sequences preempted for KV-cache room (computed again later)."),
    "spec_draft_tokens_total": ("slimlm_spec_draft_tokens", "Tokens drafted by speculative decoding."),
    "spec_accepted_tokens_total": ("slimlm_spec_accepted_tokens", "Drafted tokens the target model accepted."),
    "spec_steps_total": ("slimlm_spec_steps", "Speculative steps, counted per sequence."),
    "spec_lookup_steps_total": ("slimlm_spec_lookup_steps", "Speculative steps whose draft came from prompt lookup."),
}


class _EngineCollector:
    def __init__(self, stats: Callable[[], dict]):
        self._stats = stats

    def collect(self):
        stats = self._stats() or {}
        for key, (name, doc) in _GAUGES.items():
            if key in stats:
                yield GaugeMetricFamily(name, doc, value=float(stats[key]))
        for key, (name, doc) in _COUNTERS.items():
            if key in stats:
                yield CounterMetricFamily(name, doc, value=float(stats[key]))


class Metrics:
    """Histograms and counters the server observes itself, plus the engine's state at scrape time."""

    def __init__(self, stats: Callable[[], dict]):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        ProcessCollector(registry=r)  # process_resident_memory_bytes etc.: the soak test reads RSS here
        self.ttft = Histogram("slimlm_time_to_first_token_seconds", "Arrival to first generated token.",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("slimlm_time_per_output_token_seconds",
                              "Mean time per generated token after the first, per request.",
                              buckets=_TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("slimlm_e2e_request_latency_seconds", "Arrival to finish, per engine request.",
                             buckets=_E2E_BUCKETS, registry=r)
        self.finished = Counter("slimlm_request_finished", "Completions finished, by finish reason.",
                                ["finish_reason"], registry=r)
        self.rejected = Counter("slimlm_request_rejected", "Requests refused, by cause (queue_full, ...).",
                                ["reason"], registry=r)
        r.register(_EngineCollector(stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)
