"""A small Prometheus registry for the endpoint: counters, gauges and histograms written in
the text exposition format (version 0.0.4) that Prometheus scrapes from ``GET /metrics``.

Kept in-house because the endpoint needs only these three kinds and one process; names
follow vLLM's where the meaning is the same, so dashboards built for vLLM read this endpoint.
"""

from __future__ import annotations

import bisect
import math
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

LabelValues = tuple[str, ...]


def format_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _labels(names: Sequence[str], values: Sequence[str]) -> str:
    if not names:
        return ""
    return "{" + ",".join(f'{n}="{_escape_label(v)}"' for n, v in zip(names, values, strict=True)) + "}"


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()):
        if not _NAME.match(name):
            raise ValueError(f"invalid metric name {name!r}")
        bad = [n for n in labelnames if not _LABEL.match(n) or n.startswith("__") or n == "le"]
        if bad:
            raise ValueError(f"invalid label name(s) {bad} for metric {name}")
        self.name = name
        self.help = help_text
        self.labelnames = tuple(labelnames)
        self._lock = threading.Lock()

    def _key(self, labels: Mapping[str, str]) -> LabelValues:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name} takes labels {list(self.labelnames)}, got {sorted(labels)}")
        return tuple(str(labels[n]) for n in self.labelnames)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {_escape_help(self.help)}", f"# TYPE {self.name} {self.kind}"]

    def lines(self) -> list[str]:
        raise NotImplementedError


class Counter(_Metric):
    """A value that only goes up. Name it ``..._total``."""

    kind = "counter"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()):
        super().__init__(name, help_text, labelnames)
        self._values: dict[LabelValues, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError(f"{self.name}: a counter cannot decrease (inc by {amount})")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def lines(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return [f"{self.name}{_labels(self.labelnames, k)} {format_value(v)}" for k, v in items]


class Gauge(_Metric):
    """A value read at scrape time from ``collect`` (label values -> value), so it can never
    drift from the state it reports (queue lengths, loaded adapters)."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = (),
                 collect: Callable[[], Mapping[LabelValues, float]] | None = None):
        super().__init__(name, help_text, labelnames)
        self._collect = collect or dict

    def lines(self) -> list[str]:
        items = sorted(self._collect().items())
        return [f"{self.name}{_labels(self.labelnames, tuple(map(str, k)))} {format_value(v)}" for k, v in items]


class Histogram(_Metric):
    """Observations counted into cumulative ``le`` buckets, with their sum and count."""

    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: Iterable[float], labelnames: Sequence[str] = ()):
        super().__init__(name, help_text, labelnames)
        bounds = sorted(float(b) for b in buckets if not math.isinf(b))
        if not bounds or len(set(bounds)) != len(bounds):
            raise ValueError(f"{self.name}: buckets must be distinct finite numbers, got {list(buckets)}")
        self.bounds = bounds
        self._series: dict[LabelValues, list[float]] = {}  # per-bucket counts (+Inf last), sum

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        slot = bisect.bisect_left(self.bounds, value)  # first bucket whose bound is >= value
        with self._lock:
            counts = self._series.setdefault(key, [0.0] * (len(self.bounds) + 2))
            counts[slot] += 1
            counts[-1] += value

    def lines(self) -> list[str]:
        with self._lock:
            items = sorted((k, list(v)) for k, v in self._series.items())
        out = []
        names = (*self.labelnames, "le")
        for key, counts in items:
            running = 0.0
            for bound, n in zip([*self.bounds, math.inf], counts[:-1], strict=True):
                running += n
                out.append(f"{self.name}_bucket{_labels(names, (*key, format_value(bound)))} {format_value(running)}")
            out.append(f"{self.name}_sum{_labels(self.labelnames, key)} {format_value(counts[-1])}")
            out.append(f"{self.name}_count{_labels(self.labelnames, key)} {format_value(running)}")
        return out


class Registry:
    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}

    def add(self, metric: _Metric) -> _Metric:
        if metric.name in self._metrics:
            raise ValueError(f"metric {metric.name} is registered twice")
        self._metrics[metric.name] = metric
        return metric

    def counter(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> Counter:
        return self.add(Counter(name, help_text, labelnames))  # type: ignore[return-value]

    def gauge(self, name: str, help_text: str, labelnames: Sequence[str] = (),
              collect: Callable[[], Mapping[LabelValues, float]] | None = None) -> Gauge:
        return self.add(Gauge(name, help_text, labelnames, collect))  # type: ignore[return-value]

    def histogram(self, name: str, help_text: str, buckets: Iterable[float],
                  labelnames: Sequence[str] = ()) -> Histogram:
        return self.add(Histogram(name, help_text, buckets, labelnames))  # type: ignore[return-value]

    def render(self) -> str:
        out: list[str] = []
        for metric in self._metrics.values():
            out += metric.header() + metric.lines()
        return "\n".join(out) + "\n"

