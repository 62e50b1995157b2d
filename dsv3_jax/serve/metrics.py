"""serve.py's Prometheus metrics: vLLM's names and meanings under our own prefix (see `Metrics`)."""
from __future__ import annotations

import time


class Metrics:
    """Prometheus metrics with vLLM's names and meanings under our prefix (`dsv3:` for `vllm:`), so dashboards
    built for vLLM read them, each with a `model_name` label:

    counters   prompt_tokens, generation_tokens (counted as each step produces them), request_success
               {finished_reason}, num_preemptions, prefix_cache_queries / prefix_cache_hits (tokens),
               spec_decode_num_drafts / spec_decode_num_accepted_tokens
    gauges     num_requests_running, num_requests_waiting, kv_cache_usage_perc (0..1); ours: requests_held
               (records the engine still holds: 0 when idle), cache_pages_used, cache_pages_free
    histograms e2e_request_latency_seconds, request_queue_time_seconds, request_prefill_time_seconds,
               request_decode_time_seconds, time_to_first_token_seconds, request_time_per_output_token_seconds
               (a request's mean gap), inter_token_latency_seconds (every gap between a request's tokens;
               tokens of one multi-token dispatch arrive together: gap 0), request_prompt_tokens,
               request_generation_tokens
    """

    LATENCY = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
    TOKENS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)

    def __init__(self, model_name: str):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = reg = CollectorRegistry()
        self.model_name = model_name
        label = ["model_name"]

        def counter(name, doc, extra=()):
            return Counter(f"dsv3:{name}", doc, label + list(extra), registry=reg)

        def hist(name, doc, buckets):
            return Histogram(f"dsv3:{name}", doc, label, registry=reg, buckets=buckets)

        self.prompt = counter("prompt_tokens", "Prompt tokens processed")
        self.generated = counter("generation_tokens", "Tokens generated")
        self.success = counter("request_success", "Finished requests", ["finished_reason"])
        self.preemptions = counter("num_preemptions", "Requests preempted (pages ran out)")
        self.prefix_queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache")
        self.prefix_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache")
        self.drafts = counter("spec_decode_num_drafts", "MTP drafts verified")
        self.accepted = counter("spec_decode_num_accepted_tokens", "MTP draft tokens accepted")
        self.hist = {k: hist(k, doc, b) for k, doc, b in (
            ("e2e_request_latency_seconds", "Arrival to finish", self.LATENCY),
            ("request_queue_time_seconds", "Arrival to first scheduled", self.LATENCY),
            ("request_prefill_time_seconds", "First scheduled to first token", self.LATENCY),
            ("request_decode_time_seconds", "First token to last token", self.LATENCY),
            ("time_to_first_token_seconds", "Arrival to first token", self.LATENCY),
            ("request_time_per_output_token_seconds", "A request's mean gap between tokens", self.LATENCY),
            ("inter_token_latency_seconds", "Each gap between a request's tokens", self.LATENCY),
            ("request_prompt_tokens", "Prompt tokens per request", self.TOKENS),
            ("request_generation_tokens", "Generated tokens per request", self.TOKENS))}
        self.gauges = {k: Gauge(f"dsv3:{k}", doc, label, registry=reg) for k, doc in (
            ("num_requests_running", "Requests in the running batch"),
            ("num_requests_waiting", "Requests waiting to be scheduled"),
            ("kv_cache_usage_perc", "Fraction of the latent-cache pages in use (0..1)"),
            ("requests_held", "Request records the engine holds (0 when idle)"),
            ("cache_pages_used", "Cache pages in use"), ("cache_pages_free", "Cache pages free"))}
        self._seen = {"preemptions": 0, "prefix_queries": 0, "prefix_hits": 0}

    def _l(self, metric, **extra):
        return metric.labels(model_name=self.model_name, **extra)

    def on_tokens(self, req, new):  # engine thread: counted per step, as vLLM does
        if len(req.output) == len(new) and req.preemptions == 0:  # its first tokens: its prompt has run
            self._l(self.prompt).inc(len(req.prompt))
        self._l(self.generated).inc(len(new))

    def on_finish(self, req):  # engine thread
        self._l(self.success, finished_reason=req.finish_reason or "unknown").inc()
        self._l(self.drafts).inc(req.drafted)
        self._l(self.accepted).inc(req.accepted)
        h = {k: self._l(v) for k, v in self.hist.items()}
        h["request_prompt_tokens"].observe(len(req.prompt))
        h["request_generation_tokens"].observe(len(req.output))
        end, times = time.perf_counter(), req.token_times
        h["e2e_request_latency_seconds"].observe(max(0.0, end - req.arrival))
        if req.started is not None:
            h["request_queue_time_seconds"].observe(max(0.0, req.started - req.arrival))
        if times and req.started is not None:
            h["request_prefill_time_seconds"].observe(max(0.0, times[0] - req.started))
            h["time_to_first_token_seconds"].observe(max(0.0, times[0] - req.arrival))
            h["request_decode_time_seconds"].observe(times[-1] - times[0])
        if len(times) > 1:
            h["request_time_per_output_token_seconds"].observe((times[-1] - times[0]) / (len(times) - 1))
            for a, b in zip(times, times[1:]):
                h["inter_token_latency_seconds"].observe(b - a)

    def render(self, stats: dict) -> str:
        from prometheus_client import generate_latest

        for key, counter in (("preemptions", self.preemptions), ("prefix_queries", self.prefix_queries),
                             ("prefix_hits", self.prefix_hits)):  # the engine's running totals, as counters
            self._l(counter).inc(max(0, stats[key] - self._seen[key]))
            self._seen[key] = max(self._seen[key], stats[key])
        pages = max(1, stats["pages"])
        for k, v in (("num_requests_running", stats["running"]), ("num_requests_waiting", stats["waiting"]),
                     ("kv_cache_usage_perc", stats["pages_used"] / pages), ("requests_held", stats["requests_held"]),
                     ("cache_pages_used", stats["pages_used"]), ("cache_pages_free", stats["pages_free"])):
            self._l(self.gauges[k]).set(v)
        return generate_latest(self.registry).decode()
