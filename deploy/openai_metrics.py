"""Prometheus metrics of the HTTP front end, named like vLLM's with a ``tandem:`` prefix.

Per request (observed by this ingress when a request finishes, from the router's lifetime
metrics): TTFT, time per output token, inter-token latency (each gap), end-to-end latency, queue
time, prefill time and KV transfer time histograms; prompt and generation token and KV transfer
byte counters; finished requests by reason.
Per instance (read from the router at each scrape): requests running and waiting, KV-cache usage,
preemptions; migrations by outcome. A lone ingress process has its own registry. Replicas of the
ingress (deploy/ingress.py) run in Prometheus' multiprocess mode: each writes its request metrics to
files in ``$PROMETHEUS_MULTIPROC_DIR``, and any replica's ``/metrics`` sums every replica's.
"""
from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0,
                   80.0)


class Metrics:
    def __init__(self, stats) -> None:
        """``stats()`` returns the router's stats (``Client.stats``), read at each scrape."""
        self.registry = CollectorRegistry()
        histogram = lambda name, doc: Histogram(name, doc, registry=self.registry,  # noqa: E731
                                                buckets=LATENCY_BUCKETS)
        self.ttft = histogram("tandem:time_to_first_token_seconds", "Time to first token")
        self.tpot = histogram("tandem:time_per_output_token_seconds",
                              "Mean time per output token after the first")
        self.itl = histogram("tandem:inter_token_latency_seconds", "Time between consecutive output tokens")
        self.e2e = histogram("tandem:e2e_request_latency_seconds", "Arrival to finish")
        self.queue = histogram("tandem:request_queue_time_seconds", "Arrival to the start of its prefill")
        self.prefill = histogram("tandem:request_prefill_time_seconds", "Prefill of the request")
        self.transfer = histogram("tandem:kv_transfer_time_seconds", "Prefill instance to decode batch")
        self.prompt_tokens = Counter("tandem:prompt_tokens", "Prompt tokens of finished requests",
                                     registry=self.registry)
        self.generation_tokens = Counter("tandem:generation_tokens", "Tokens generated",
                                         registry=self.registry)
        self.finished = Counter("tandem:request_success", "Finished requests by reason", ["finished_reason"],
                                registry=self.registry)
        self.transfer_bytes = Counter("tandem:kv_transfer_bytes", "KV bytes moved from prefill to decode",
                                      registry=self.registry)
        self.instances = _InstanceCollector(stats)
        self.registry.register(self.instances)

    def observe(self, metrics: dict[str, float] | None, finish_reason: str | None,
                token_gaps: list[float] | None = None) -> None:
        """A finished request, from its last ``StreamChunk``'s metrics and token gaps."""
        metrics = metrics or {}
        for gap in token_gaps or ():
            self.itl.observe(gap)
        self.transfer_bytes.inc(metrics.get("transfer_bytes", 0))
        for histogram, key in ((self.ttft, "ttft"), (self.tpot, "tpot"), (self.e2e, "finish"),
                               (self.queue, "prefill_start"), (self.transfer, "transfer_time")):
            if key in metrics:
                histogram.observe(metrics[key])
        if "prefill_start" in metrics and "prefill_end" in metrics:
            self.prefill.observe(metrics["prefill_end"] - metrics["prefill_start"])
        self.prompt_tokens.inc(metrics.get("num_prompt_tokens", 0))
        self.generation_tokens.inc(metrics.get("num_output_tokens", 0))
        self.finished.labels(finish_reason or "unknown").inc()

    def exposition(self) -> bytes:
        """The text a scrape gets: this process's metrics, or, as an ingress replica, the sum of
        every replica's (their files in ``$PROMETHEUS_MULTIPROC_DIR``) and the per-instance ones."""
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        registry.register(self.instances)
        return generate_latest(registry)


class _InstanceCollector:
    """Per-instance gauges and migration counts, from the router's stats at scrape time."""

    def __init__(self, stats) -> None:
        self.stats = stats

    def collect(self):
        try:
            stats = self.stats()
        except Exception:  # the router is away: the request metrics are still served
            return
        running = GaugeMetricFamily("tandem:num_requests_running", "Requests running", labels=["instance"])
        waiting = GaugeMetricFamily("tandem:num_requests_waiting", "Requests waiting", labels=["instance"])
        usage = GaugeMetricFamily("tandem:kv_cache_usage_perc", "Fraction of KV blocks in use",
                                  labels=["instance"])
        preempted = CounterMetricFamily("tandem:num_preemptions", "Requests preempted", labels=["instance"])
        for name, s in stats["instances"].items():
            if "error" in s:
                continue
            running.add_metric([name], s.get("running", 0))
            waiting.add_metric([name], s.get("waiting", 0))
            usage.add_metric([name], 1 - s["free_blocks"] / max(1, s["num_blocks"]))
            preempted.add_metric([name], s.get("preemptions", 0))
        migrations = CounterMetricFamily("tandem:migrations", "Live migrations by outcome",
                                         labels=["outcome"])
        for outcome in ("started", "committed", "resumed", "cancelled"):
            migrations.add_metric([outcome], stats["migrations"].get(outcome, 0))
        yield from (running, waiting, usage, preempted, migrations)
