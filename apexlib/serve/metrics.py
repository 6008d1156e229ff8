"""Prometheus metrics of a server: the engine loop's state, engine counters, latency histograms.

Gauges and counters are read from the loop's published snapshot at scrape time (no lock, no engine
access from the HTTP side); latency histograms are observed by the loop thread when a request ends.
One registry per server, so several servers (tests) can live in one process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from apexlib.core.request import RequestMetrics
from apexlib.serve.loop import Delta, EngineLoop

#: Latency buckets in seconds (from 1 ms: a tiny model on a CPU decodes a token in a few ms).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
                   2.5, 5.0, 10.0, 20.0, 40.0, 80.0)


class _LoopCollector:
    def __init__(self, loop: EngineLoop) -> None:
        self.loop = loop

    def collect(self):
        up = bool(self.loop.alive)
        yield GaugeMetricFamily("apex_engine_up", "1 while the engine runs; 0 after it stopped or died (the engine's "
                                "gauges and counters are then not reported: they would be its last state)",
                                value=int(up))
        if not up:
            return
        snap = self.loop.snapshot
        for name, value, doc in (("requests_running", snap.running, "requests holding KV blocks and being scheduled"),
                                 ("requests_waiting", snap.waiting + snap.queued,
                                  "requests accepted and not yet running"),
                                 ("requests_cpu_resident", snap.cpu_resident,
                                  "running requests whose KV cache lives in the CPU tier")):
            yield GaugeMetricFamily(f"apex_{name}", doc, value=value)
        usage = GaugeMetricFamily("apex_kv_usage_ratio", "share of the KV blocks of a tier in use", labels=["tier"])
        free = GaugeMetricFamily("apex_kv_free_blocks", "free KV blocks of a tier", labels=["tier"])
        total = GaugeMetricFamily("apex_kv_total_blocks", "KV blocks of a tier", labels=["tier"])
        for tier, blocks in snap.total_blocks.items():
            free_blocks = snap.free_blocks.get(tier, 0)
            usage.add_metric([tier], (blocks - free_blocks) / blocks if blocks else 0.0)
            free.add_metric([tier], free_blocks)
            total.add_metric([tier], blocks)
        yield usage
        yield free
        yield total
        stats = snap.engine_stats
        for name, key, doc in (("preemptions", "preemptions", "requests preempted (recomputed later)"),
                               ("swapped_out_blocks", "swapped_out_blocks", "KV blocks moved GPU -> CPU tier"),
                               ("swapped_in_blocks", "swapped_in_blocks", "KV blocks moved CPU -> GPU tier"),
                               ("prefill_tokens", "prefill_tokens", "prompt tokens computed"),
                               ("gpu_decode_tokens", "gpu_decode_tokens", "tokens decoded from the GPU tier"),
                               ("cpu_decode_tokens", "cpu_decode_tokens", "tokens decoded from the CPU tier"),
                               ("iterations", "iterations", "engine iterations")):
            yield CounterMetricFamily(f"apex_{name}", doc, value=stats.get(key, 0))
        modes = CounterMetricFamily("apex_iteration_mode", "engine iterations by execution mode", labels=["mode"])
        for mode, count in sorted(stats.get("mode_counts", {}).items()):
            modes.add_metric([str(mode)], count)
        yield modes
        yield CounterMetricFamily("apex_iteration_errors", "engine iterations that failed and were discarded",
                                  value=snap.iteration_errors)
        yield CounterMetricFamily("apex_request_errors", "requests finished with an error",
                                  value=snap.failed_requests)


class ServerMetrics:
    def __init__(self, loop: EngineLoop) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_LoopCollector(loop))
        self.ttft = Histogram("apex_time_to_first_token_seconds", "arrival to first token", registry=self.registry,
                              buckets=LATENCY_BUCKETS)
        self.tpot = Histogram("apex_time_per_output_token_seconds", "(last - first token) / (tokens - 1)",
                              registry=self.registry, buckets=LATENCY_BUCKETS)
        self.itl = Histogram("apex_inter_token_latency_seconds", "time between consecutive tokens",
                             registry=self.registry, buckets=LATENCY_BUCKETS)
        self.e2e = Histogram("apex_e2e_request_latency_seconds", "arrival to the last token",
                             registry=self.registry, buckets=LATENCY_BUCKETS)
        self.finished = Counter("apex_requests_finished", "requests finished by the engine, by reason",
                                ["finish_reason"], registry=self.registry)
        self.responses = Counter("apex_http_responses", "HTTP responses by endpoint and status",
                                 ["endpoint", "status"], registry=self.registry)
        self.client_disconnects = Counter("apex_http_client_disconnects",
                                          "clients that left before their answer, by endpoint and phase (body: "
                                          "while sending the request; response: while waiting or streaming)",
                                          ["endpoint", "phase"], registry=self.registry)
        self.read_timeouts = Counter("apex_http_read_timeouts", "connections closed because the request headers "
                                     "or body did not arrive in time, by phase", ["phase"], registry=self.registry)

    def observe_finished(self, output, delta: Delta) -> None:
        """Called on the loop thread for every request the engine finished."""
        self.finished.labels(delta.finish_reason or "unknown").inc()
        metrics: RequestMetrics | None = delta.metrics
        if metrics is None or not metrics.token_times:
            return
        times = metrics.token_times
        self.ttft.observe(max(0.0, times[0] - metrics.arrival_time))
        self.e2e.observe(max(0.0, times[-1] - metrics.arrival_time))
        if len(times) > 1:
            self.tpot.observe((times[-1] - times[0]) / (len(times) - 1))
            for previous, current in zip(times[:-1], times[1:], strict=True):
                self.itl.observe(current - previous)
