"""The optimization table: every variant of a tuned model (merged, quantized, distilled) beside
the original (the adapter on its base), with its size, serving speed and memory, its quality on
the golden set, and whether it passed the quality floor.

One row per variant. A number that was not measured (a benchmark that could not run, a variant
that failed to load) is ``None`` in the rows and reads "not computed" in the report; it is never
a 0. A variant is failed when it could not be loaded or evaluated, or when its primary metric
is more than ``floor_points`` points (metric x 100) below the original's; a failed variant is
never deployed. Ratios are against the original.

Pure Python: no dagster, no MLflow; charts through matplotlib (Agg).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from genops_assets.lib.stats import bootstrap_ci

BASELINE = "original"
PASSED, FAILED = "passed", "failed"
NOT_COMPUTED = "not computed"
LEVELS = ("1", "16")  # benchmark concurrency levels in the table
TABLE_METRICS = ("valid_json_rate", "mean_field_exact_match", "overall_exact_match")
# A delta of exactly the floor passes; float noise below 1e-9 points does not fail it.
_EPS = 1e-9


@dataclass
class VariantMeasurement:
    """What was measured for one variant; ``None`` marks a number that was not computed."""

    name: str
    format: str  # "safetensors" | "gguf" | "adapter" (the original)
    engine: str  # "local" | "llamacpp"
    version: str | None = None  # registry version (None for the original's own adapter row)
    size_bytes: int | None = None
    peak_rss_bytes: int | None = None
    bench: dict[str, dict[str, float]] | None = None  # level -> {"tokens_per_s", "p50_s", ...}
    metrics: dict[str, float] | None = None
    per_example: dict[str, list[float]] = field(default_factory=dict)  # metric -> one score per example
    error: str | None = None  # why the variant could not be loaded, served or evaluated
    bench_error: str | None = None  # why the benchmark has no numbers (the variant may still be judged)


def metric_intervals(per_example: Mapping[str, Sequence[float]], level: float = 0.95,
                     seed: int = 0) -> dict[str, dict[str, float]]:
    """95% bootstrap interval of each metric from its per-example scores (as eval_report's)."""
    return {m: bootstrap_ci(v, level=level, seed=seed).as_dict() for m, v in per_example.items() if len(v)}


def delta_points(value: float | None, baseline: float | None) -> float | None:
    """``value - baseline`` in points (x 100); None when either is missing."""
    if value is None or baseline is None:
        return None
    return round((float(value) - float(baseline)) * 100.0, 9)


def judge(m: VariantMeasurement, original: VariantMeasurement, primary: str, floor_points: float) -> tuple[str, str]:
    """``(status, reason)`` of one variant against the original on the primary metric."""
    if m.error:
        return FAILED, f"load failure: {m.error}"
    if not m.metrics or primary not in m.metrics:
        return FAILED, f"{primary} not computed"
    if m.name == original.name:
        return PASSED, "baseline"
    delta = delta_points(m.metrics[primary], original.metrics[primary])
    if delta < -floor_points - _EPS:
        return FAILED, (f"{primary} {m.metrics[primary]:.4f} is {-delta:.2f} points below the original's "
                        f"{original.metrics[primary]:.4f} (floor {floor_points:g} points)")
    return PASSED, f"{primary} {delta:+.2f} points vs the original (floor -{floor_points:g})"


def _ratio(value: float | None, baseline: float | None) -> float | None:
    if value is None or baseline is None or baseline == 0:
        return None
    return round(float(value) / float(baseline), 3)


def _level(m: VariantMeasurement, level: str, key: str) -> float | None:
    if not m.bench or level not in m.bench:
        return None
    value = m.bench[level].get(key)
    return None if value is None else float(value)


def build_rows(original: VariantMeasurement, variants: Sequence[VariantMeasurement], primary: str,
               floor_points: float) -> list[dict[str, Any]]:
    """The table: the original first, then each variant, with deltas, ratios and status."""
    if original.error or not original.metrics or primary not in original.metrics:
        raise ValueError(f"the original has no {primary} ({original.error or 'not computed'}): "
                         "the variants cannot be judged against it")
    names = [v.name for v in variants]
    if BASELINE in names or len(set(names)) != len(names):
        raise ValueError(f"variant names must be unique and not '{BASELINE}': {names}")
    rows = []
    for m in (original, *variants):
        status, reason = judge(m, original, primary, floor_points)
        speed = {lv: {"tokens_per_s": _level(m, lv, "tokens_per_s"), "p50_s": _level(m, lv, "p50_s")}
                 for lv in LEVELS}
        metrics = dict(m.metrics or {})
        rows.append({
            "variant": m.name, "format": m.format, "engine": m.engine, "version": m.version,
            "size_bytes": m.size_bytes, "peak_rss_bytes": m.peak_rss_bytes, "speed": speed,
            "metrics": metrics, "intervals": metric_intervals(m.per_example),
            "delta_points": {k: delta_points(metrics.get(k), original.metrics.get(k))
                             for k in (primary, *TABLE_METRICS)},
            "ratios": {
                "size": _ratio(m.size_bytes, original.size_bytes),
                "peak_rss": _ratio(m.peak_rss_bytes, original.peak_rss_bytes),
                **{f"tokens_per_s_c{lv}": _ratio(speed[lv]["tokens_per_s"],
                                                  _level(original, lv, "tokens_per_s")) for lv in LEVELS},
                **{f"p50_s_c{lv}": _ratio(speed[lv]["p50_s"], _level(original, lv, "p50_s")) for lv in LEVELS},
            },
            "status": status, "reason": reason, "error": m.error, "bench_error": m.bench_error,
        })
    return rows


def fastest_passing(rows: Sequence[Mapping[str, Any]], candidates: Sequence[str] | None = None) -> str | None:
    """The passing variant (never the original) with the most single-stream tokens/s, among
    ``candidates`` when given; None when no passing variant has that number."""
    best = [(r["speed"]["1"]["tokens_per_s"], r["variant"]) for r in rows
            if r["variant"] != BASELINE and r["status"] == PASSED and r["speed"]["1"]["tokens_per_s"] is not None
            and (candidates is None or r["variant"] in candidates)]
    return max(best)[1] if best else None


def mlflow_metrics(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Every computed number, prefixed by the variant (``q4_k_m.tokens_per_s_c1``); missing ones are left out."""
    out: dict[str, float] = {}
    for r in rows:
        p = r["variant"]
        values = {"size_bytes": r["size_bytes"], "peak_rss_bytes": r["peak_rss_bytes"],
                  "passed": 1.0 if r["status"] == PASSED else 0.0,
                  **{f"{k}_c{lv}": r["speed"][lv][k] for lv in LEVELS for k in ("tokens_per_s", "p50_s")},
                  **{m: v for m, v in r["metrics"].items()},
                  **{f"{m}_{b}": iv[b] for m, iv in r["intervals"].items() for b in ("low", "high")},
                  **{f"{m}_delta_points": d for m, d in r["delta_points"].items()},
                  **{f"ratio_{k}": v for k, v in r["ratios"].items()}}
        out.update({f"{p}.{k}": float(v) for k, v in values.items() if v is not None})
    return out


def _size(n: int | None) -> str:
    return NOT_COMPUTED if n is None else f"{n / 2**20:,.1f} MiB"


def _num(v: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return NOT_COMPUTED if v is None else f"{v:{spec}}{suffix}"


def _metric_cell(r: Mapping[str, Any], metric: str) -> str:
    iv = r["intervals"].get(metric)
    if iv is not None:
        return f"{iv['estimate']:.3f} [{iv['low']:.3f}, {iv['high']:.3f}]"
    return _num(r["metrics"].get(metric), ".3f")


def one_line(text: str, limit: int = 240) -> str:
    """``text`` fit for a Markdown table cell: one line, no column separator, at most ``limit`` characters."""
    flat = " ".join(text.split()).replace("|", "\\|")
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def table_rows(rows: Sequence[Mapping[str, Any]], primary: str) -> list[dict[str, str]]:
    """The rows as report text: every missing number reads "not computed"."""
    out = []
    for r in rows:
        ratio = r["ratios"]["tokens_per_s_c1"]
        out.append({
            "variant": r["variant"] + (f" (v{r['version']})" if r["version"] else ""),
            "engine": f"{r['format']} / {r['engine']}",
            "size": _size(r["size_bytes"]), "peak_rss": _size(r["peak_rss_bytes"]),
            **{f"tps{lv}": _num(r["speed"][lv]["tokens_per_s"], ".1f") for lv in LEVELS},
            **{f"p50_{lv}": _num(r["speed"][lv]["p50_s"], ".2f", " s") for lv in LEVELS},
            "speedup": _num(ratio, ".2f", "x"),
            "primary": _metric_cell(r, primary),
            "delta": _num(r["delta_points"].get(primary), "+.2f"),
            "metrics": {m: _metric_cell(r, m) for m in TABLE_METRICS},
            "status": r["status"], "reason": one_line(r["reason"]),
            "bench_error": one_line(r["bench_error"] or ""),
        })
    return out


def report_markdown(title: str, rows: Sequence[Mapping[str, Any]], primary: str, floor_points: float,
                    fastest: str | None, chart: str | None = None) -> str:
    """The table as Markdown (template ``optimization_report.md``)."""
    from genops_assets.lib.report import render

    metrics = [m for m in TABLE_METRICS if m != primary]
    return render("optimization_report.md", title=title, rows=table_rows(rows, primary), primary=primary,
                  metrics=metrics, floor=floor_points, fastest=fastest, chart=chart, levels=LEVELS,
                  not_computed=NOT_COMPUTED).rstrip("\n") + "\n"


def quality_speed_png(rows: Sequence[Mapping[str, Any]], primary: str) -> bytes:
    """Primary metric (95% interval) against single-stream tokens/s, one point per variant;
    failed variants in red, variants without a speed along the left edge."""
    from genops_assets.lib.report import _plt, _png

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    speeds = [r["speed"]["1"]["tokens_per_s"] for r in rows if r["speed"]["1"]["tokens_per_s"] is not None]
    left = 0.0 if not speeds else min(speeds) * 0.5
    for r in rows:
        y = r["metrics"].get(primary)
        if y is None:
            continue
        x = r["speed"]["1"]["tokens_per_s"]
        color = "#616161" if r["variant"] == BASELINE else ("#2e7d32" if r["status"] == PASSED else "#c62828")
        iv = r["intervals"].get(primary)
        yerr = None if iv is None else [[y - iv["low"]], [iv["high"] - y]]
        ax.errorbar(left if x is None else x, y, yerr=yerr, fmt="o" if x is not None else "x", color=color,
                    capsize=4)
        ax.annotate(r["variant"] + ("" if x is not None else f" ({NOT_COMPUTED})"), (left if x is None else x, y),
                    textcoords="offset points", xytext=(5, 5), fontsize=7)
    ax.set_xlabel("tokens/s at concurrency 1", fontsize=8)
    ax.set_ylabel(primary, fontsize=8)
    ax.set_title("quality vs single-stream speed (95% CI; red: failed)", fontsize=9)
    return _png(fig)
