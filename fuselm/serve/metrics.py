"""`/metrics`: the engine's state and the server's timings in Prometheus' text format.

The names are vLLM's under a `fuselm:` prefix, so dashboards written for vLLM need only
the prefix changed; every sample carries a `model_name` label, as vLLM's do. Gauges and
counters are read from the engine when scraped (its counters only grow); the histograms
are filled by the server as requests are answered (generation.py). The format is
written here, a few lines, rather than taken from prometheus_client.
"""
from __future__ import annotations

import bisect

# vLLM's buckets for these two histograms, in seconds.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0, 7680.0)


class Histogram:
    """Counts of observations per bucket upper bound (cumulated when rendered), their sum
    and count. Observed on the event loop's thread only, so it needs no lock."""

    def __init__(self, name: str, help_text: str, buckets: tuple):
        self.name, self.help_text, self.buckets = name, help_text, tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last: above every bound (+Inf)
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def render(self, labels: str) -> list:
        lines = [f"# HELP {self.name} {self.help_text}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, count in zip(self.buckets + (float("inf"),), self.counts):
            cumulative += count
            le = "+Inf" if bound == float("inf") else repr(float(bound))
            lines.append(f'{self.name}_bucket{{{labels},le="{le}"}} {cumulative}')
        lines += [f"{self.name}_sum{{{labels}}} {self.sum!r}", f"{self.name}_count{{{labels}}} {self.count}"]
        return lines


class ServerMetrics:
    def __init__(self, engine, model_name: str):
        self.engine = engine
        self.labels = f'model_name="{_escape(model_name)}"'
        self.time_to_first_token = Histogram(
            "fuselm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", TTFT_BUCKETS)
        self.request_latency = Histogram(
            "fuselm:e2e_request_latency_seconds", "Histogram of end-to-end request latency in seconds.",
            LATENCY_BUCKETS)

    def render(self) -> str:
        engine = self.engine
        kv = engine.kv
        lines = []
        for name, kind, help_text, value in (
            ("fuselm:num_requests_running", "gauge", "Number of requests in model execution batches.",
             engine.num_running()),
            ("fuselm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.",
             engine.num_waiting()),
            ("fuselm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.",
             kv.num_used_blocks / kv.num_blocks),
            ("fuselm:prompt_tokens_total", "counter", "Number of prefill tokens processed.",
             engine.stats.prompt_tokens),
            ("fuselm:generation_tokens_total", "counter", "Number of generation tokens processed.",
             engine.stats.generation_tokens),
            ("fuselm:num_preemptions_total", "counter", "Cumulative number of preemptions from the engine.",
             engine.stats.preemptions),
        ):
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name}{{{self.labels}}} {value}"]
        lines += self.time_to_first_token.render(self.labels) + self.request_latency.render(self.labels)
        return "\n".join(lines) + "\n"


def _escape(label_value: str) -> str:
    """A label value as the text format quotes it."""
    return label_value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
