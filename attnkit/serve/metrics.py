"""Prometheus metrics for GET /metrics (names after vLLM's, prefixed ``attnkit_``).

Counters and histograms are updated as requests finish; the engine's state (running and waiting
requests, KV-cache usage, prefix-cache queries and hits, preemptions) is read at scrape time from
:meth:`AsyncLLMEngine.stats`, and with speculative decoding on, its draft and accepted tokens from the engine's
``spec.stats``. Each app has its own ``CollectorRegistry``, so several servers in one
process (tests) do not share counts.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..engine.async_engine import AsyncLLMEngine

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
_PER_TOKEN = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)


class _EngineCollector(Collector):
    def __init__(self, engine: AsyncLLMEngine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        s = self.engine.stats()
        for name, doc, value in (
            ("attnkit_num_requests_running", "Requests with a sequence in the running batch.", s.running),
            ("attnkit_num_requests_waiting", "Requests accepted and waiting to run (queued or preempted).", s.waiting),
            ("attnkit_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use (0 to 1).", s.kv_usage),
            ("attnkit_kv_cache_blocks_used", "KV-cache blocks in use.", s.kv_blocks_used),
            ("attnkit_kv_cache_blocks_total", "KV-cache blocks in the pool.", s.kv_blocks),
            ("attnkit_prefix_cache_hit_rate", "Prefix-cache hits / queries since start (full prompt blocks).",
             s.prefix_hit_rate),
        ):
            yield GaugeMetricFamily(name, doc, value=value)
        for name, doc, value in (
            ("attnkit_prefix_cache_queries", "Full prompt blocks looked up in the prefix cache.", s.prefix_queries),
            ("attnkit_prefix_cache_hits", "Full prompt blocks found in the prefix cache.", s.prefix_hits),
            ("attnkit_num_preemptions", "Sequences preempted (recomputed later) for lack of KV blocks.", s.preemptions),
            ("attnkit_num_aborted_requests", "Requests aborted in the engine before finishing (client gone); "
             "their KV blocks are freed at once.", s.aborted),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        spec = self.engine.engine.spec
        if spec is None:
            return
        st = spec.stats  # replaced whole by the engine at each update: one consistent reading
        for name, doc, value in (
            ("attnkit_spec_decode_num_draft_tokens", "Speculative draft tokens verified by the target.", st.proposed),
            ("attnkit_spec_decode_num_accepted_tokens", "Speculative draft tokens the target accepted.", st.accepted),
            ("attnkit_spec_decode_num_verifications", "Sequence-steps that verified at least one draft token.",
             st.verifications),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        yield GaugeMetricFamily("attnkit_spec_decode_acceptance_rate",
                                "Accepted / proposed draft tokens since start (0 to 1).", value=st.acceptance_rate)
        yield GaugeMetricFamily("attnkit_spec_decode_mean_accepted_length",
                                "Tokens emitted per verifying sequence-step since start (1: nothing gained).",
                                value=st.mean_accepted_length)


class ServerMetrics:
    def __init__(self, engine: AsyncLLMEngine | None) -> None:
        self.registry = r = CollectorRegistry()
        self.http_requests = Counter("attnkit_http_requests", "HTTP requests by endpoint and status code.",
                                     ["endpoint", "status"], registry=r)
        self.finished = Counter("attnkit_request_finished", "Generation requests finished, by finish reason.",
                                ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("attnkit_prompt_tokens", "Prompt tokens of generation requests.", registry=r)
        self.generation_tokens = Counter("attnkit_generation_tokens", "Tokens generated.", registry=r)
        self.ttft = Histogram("attnkit_time_to_first_token_seconds", "Request arrival to first token.",
                              buckets=_LATENCY, registry=r)
        self.tpot = Histogram("attnkit_time_per_output_token_seconds",
                              "Mean time per output token after the first, per request.", buckets=_PER_TOKEN,
                              registry=r)
        self.e2e = Histogram("attnkit_e2e_request_latency_seconds", "Request arrival to last token.",
                             buckets=_LATENCY, registry=r)
        if engine is not None:
            r.register(_EngineCollector(engine))

    def observe(self, arrival: float, first_token: float | None, end: float, prompt_tokens: int,
                output_tokens: int, longest: int, finish_reasons: list[str | None]) -> None:
        """Record one finished generation request (times from ``time.perf_counter``; ``longest``: the most
        tokens of one choice, which sets the time per output token when n > 1 choices grow side by side)."""
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(output_tokens)
        for reason in finish_reasons:
            self.finished.labels(reason or "abort").inc()
        self.e2e.observe(end - arrival)
        if first_token is not None:
            self.ttft.observe(first_token - arrival)
            if longest > 1:
                self.tpot.observe((end - first_token) / (longest - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
