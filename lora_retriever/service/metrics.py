"""Prometheus text-format metrics, written by hand (no client library): counters, gauges and histograms.

``ServiceMetrics`` holds every series the service exports at ``GET /metrics`` (text exposition format 0.0.4):
requests by endpoint and status, batch sizes, queue wait, generated tokens and tokens/s, adapter cache hits,
misses, evictions and load time. All updates are thread-safe (the scheduler thread and the HTTP event loop
both write).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

__all__ = ["Counter", "Gauge", "Histogram", "ServiceMetrics"]

Labels = tuple[tuple[str, str], ...]


def _labels(values: dict[str, str]) -> Labels:
    return tuple(sorted((k, str(v)) for k, v in values.items()))


def _format_labels(labels: Labels, extra: tuple[tuple[str, str], ...] = ()) -> str:
    pairs = [*labels, *extra]
    if not pairs:
        return ""
    escaped = (v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for _, v in pairs)
    return "{" + ",".join(f'{k}="{v}"' for (k, _), v in zip(pairs, escaped)) + "}"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str):
        self.name = name
        self.help = help_text
        self._lock = threading.Lock()

    def render(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}", *self._samples()]

    def _samples(self) -> list[str]:
        raise NotImplementedError


class _Labelled(_Metric):
    """One value per label set."""

    def __init__(self, name: str, help_text: str):
        super().__init__(name, help_text)
        self._values: dict[Labels, float] = {}

    def value(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(_labels(labels), 0.0)

    def _samples(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return [f"{self.name}{_format_labels(k)} {_number(v)}" for k, v in items] or [f"{self.name} 0"]


class Counter(_Labelled):
    """A monotonically increasing count per label set."""

    kind = "counter"

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = _labels(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount


class Gauge(_Labelled):
    """A value that goes up and down (one per label set)."""

    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        with self._lock:
            self._values[_labels(labels)] = float(value)


class Histogram(_Metric):
    """Cumulative buckets, sum and count (no labels)."""

    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: Sequence[float]):
        super().__init__(name, help_text)
        self.buckets = tuple(sorted(buckets)) + (math.inf,)
        self._counts = [0] * len(self.buckets)
        self._sum = 0.0
        self._count = 0

    def observe(self, value: float) -> None:
        with self._lock:
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    self._counts[i] += 1
            self._sum += value
            self._count += 1

    @property
    def count(self) -> int:
        with self._lock:
            return self._count

    @property
    def sum(self) -> float:
        with self._lock:
            return self._sum

    def _samples(self) -> list[str]:
        with self._lock:
            counts, total, count = list(self._counts), self._sum, self._count
        lines = [
            f"{self.name}_bucket{_format_labels((), (('le', _number(b)),))} {c}"
            for b, c in zip(self.buckets, counts)
        ]
        return [*lines, f"{self.name}_sum {_number(total)}", f"{self.name}_count {count}"]


class ServiceMetrics:
    """Every series ``GET /metrics`` exports."""

    def __init__(self) -> None:
        self.requests = Counter("lora_retriever_requests_total", "HTTP requests by endpoint and status code")
        self.batch_size = Histogram(
            "lora_retriever_batch_size",
            "generation requests decoded together in one batch",
            (1, 2, 4, 8, 16, 32, 64),
        )
        self.queue_wait = Histogram(
            "lora_retriever_queue_wait_seconds",
            "time a generation request waited before its batch started",
            (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.generated_tokens = Counter("lora_retriever_generated_tokens_total", "tokens generated")
        self.prompt_tokens = Counter("lora_retriever_prompt_tokens_total", "prompt tokens processed")
        self.tokens_per_second = Gauge(
            "lora_retriever_tokens_per_second", "generated tokens per second of the latest batch"
        )
        self.batch_seconds = Histogram(
            "lora_retriever_batch_seconds",
            "wall time of one batch's generate",
            (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.cache_hits = Counter(
            "lora_retriever_adapter_cache_hits_total", "adapter requests served from memory"
        )
        self.cache_misses = Counter(
            "lora_retriever_adapter_cache_misses_total", "adapter requests that loaded it"
        )
        self.cache_evictions = Counter(
            "lora_retriever_adapter_cache_evictions_total", "adapters unloaded to stay within the budget"
        )
        self.adapter_load = Histogram(
            "lora_retriever_adapter_load_seconds",
            "time to load one adapter into the model",
            (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
        )
        self.adapters_resident = Gauge("lora_retriever_adapters_resident", "adapters loaded in the model")
        self.adapter_bytes = Gauge(
            "lora_retriever_adapter_resident_bytes", "bytes of the resident adapters' weights"
        )
        self.queue_depth = Gauge("lora_retriever_queue_depth", "generation requests waiting for a batch")

    def render(self) -> str:
        metrics = [value for value in vars(self).values() if isinstance(value, _Metric)]
        return "\n".join(line for metric in metrics for line in metric.render()) + "\n"
