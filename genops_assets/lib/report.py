"""Evaluation and training reports: Markdown, HTML with embedded charts, PNG images.

Each report builds one context and renders it through Jinja2 templates (``templates/``): a
``.md`` and, where there is one, an ``.html`` template of the same report. HTML templates
escape every value; a fragment that is already HTML (a section, a diff) arrives as ``Markup``.
"""

from __future__ import annotations

import base64
import functools
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup

from genops_assets.lib.hashing import atomic_write_text

REPORT_METRICS = (
    "valid_json_rate",
    "json_found_rate",
    "mean_field_exact_match",
    "overall_exact_match",
)


def number(value: float | None, spec: str = ".3f") -> str:
    """A statistic as report text; a missing one (None) reads "-"."""
    return "-" if value is None else format(value, spec)


@functools.cache
def _templates() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("genops_assets.lib", "templates"),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html",), default=False),
        trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined,
    )
    env.filters["num"] = number
    return env


def render(template: str, **context: Any) -> str:
    """One of the report templates (``templates/<template>``) filled with ``context``."""
    return _templates().get_template(template).render(**context)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def metric_chart_png(models: Mapping[str, Mapping[str, float]], metrics: Sequence[str]) -> bytes:
    """Grouped bars: one group per metric, one bar per model."""
    plt = _plt()
    names = list(models)
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(metrics) + 2), 3.6), dpi=110)
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        vals = [models[name].get(m, 0.0) for m in metrics]
        xs = [j + i * width for j in range(len(metrics))]
        bars = ax.bar(xs, vals, width, label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(metrics))])
    ax.set_xticklabels([m.replace("_", " ") for m in metrics], rotation=15, fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_title("Golden-set metrics")
    ax.legend(fontsize=8)
    return _png(fig)


def loss_curve_png(history: Sequence[Mapping[str, float]], title: str = "LoRA SFT loss") -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.4), dpi=110)
    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    val = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if val:
        ax.plot(*zip(*val, strict=True), marker="o", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    return _png(fig)


def _cell(models: Mapping[str, Mapping[str, float]], intervals: Mapping[str, Mapping[str, Mapping[str, float]]],
          name: str, metric: str) -> str:
    iv = intervals.get(name, {}).get(metric)
    if iv is not None:
        return f"{iv['estimate']:.3f} [{iv['low']:.3f}, {iv['high']:.3f}]"
    return number(models[name].get(metric))


def _shared_cell(summary: Mapping[str, Any]) -> str:
    if not summary.get("n"):
        return "- (no example with reference passages)"
    return f"{summary['estimate']:.3f} [{summary['low']:.3f}, {summary['high']:.3f}] (n={summary['n']}, every model)"


def _table_context(models: Mapping[str, Mapping[str, float]], metrics: Sequence[str],
                   intervals: Mapping[str, Mapping[str, Mapping[str, float]]],
                   shared: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    return {"names": list(models),
            "rows": [{"metric": m, "cells": [_cell(models, intervals, n, m) for n in models]} for m in metrics],
            "shared_rows": [{"metric": m, "text": _shared_cell(summary)} for m, summary in shared.items()]}


def metrics_table_md(models: Mapping[str, Mapping[str, float]], metrics: Sequence[str],
                     intervals: Mapping[str, Mapping[str, Mapping[str, float]]] | None = None,
                     shared: Mapping[str, Mapping[str, Any]] | None = None) -> str:
    """One row per metric, one column per model; a cell with an interval reads ``mean [low, high]``.
    ``shared`` rows hold one value for every model (metrics of the data, not the answers)."""
    return render("metrics_table.md", **_table_context(models, metrics, intervals or {}, shared or {})).rstrip("\n")


def write_eval_report(
    out_dir: Path,
    title: str,
    models: Mapping[str, Mapping[str, float]],
    metrics: Sequence[str],
    gate: Mapping[str, Any],
    samples: Sequence[Mapping[str, Any]],
    sections: Sequence[tuple[str, str, str]] = (),
    intervals: Mapping[str, Mapping[str, Mapping[str, float]]] | None = None,
    shared: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Path]:
    """Write report.md, report.html (chart embedded) and metrics.png into ``out_dir``.
    ``sections`` adds (title, markdown, html) blocks after the summary; ``intervals`` (model ->
    metric -> interval) and ``shared`` (metric -> summary of one value for every model) go
    into the metrics table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    png = metric_chart_png(models, [m for m in REPORT_METRICS if m in metrics] or list(metrics)[:4])
    (out_dir / "metrics.png").write_bytes(png)
    context = {
        **_table_context(models, metrics, intervals or {}, shared or {}),
        "title": title, "verdict": "PASSED" if gate.get("passed") else "FAILED", "reason": str(gate.get("reason", "")),
        "sections": [{"title": t, "markdown": md, "html": Markup(h)} for t, md, h in sections],
        "samples": samples, "chart_b64": base64.b64encode(png).decode(),
    }
    atomic_write_text(out_dir / "report.md", render("eval_report.md", **context))
    atomic_write_text(out_dir / "report.html", render("eval_report.html", **context))
    return {"markdown": out_dir / "report.md", "html": out_dir / "report.html", "chart": out_dir / "metrics.png"}


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    _plt().close(fig)
    return buf.getvalue()


def candidate_scores_png(bars: Sequence[tuple[str, Any]], metric: str) -> bytes:
    """One bar per prompt (first: production) with its 95% interval."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.1 * max(len(bars), 2) + 2.0, 3.2), dpi=110)
    for i, (_label, iv) in enumerate(bars):
        ax.bar(i, iv.estimate, color="#616161" if i == 0 else "#1565c0",
               yerr=[[iv.estimate - iv.low], [iv.high - iv.estimate]], capsize=5)
        ax.text(i, iv.high + 0.02, f"{iv.estimate:.2f}", ha="center", fontsize=8)
    ax.set_xticks(range(len(bars)))
    ax.set_xticklabels([b[0] for b in bars], fontsize=8, rotation=15)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel(metric, fontsize=8)
    ax.set_title("prompt candidates on the validation split (95% CI)", fontsize=9)
    return _png(fig)


def win_rate_chart_png(summary: Mapping[str, Any], candidate: str, baseline: str) -> bytes:
    """Win / tie / loss rates of the candidate with their 95% intervals."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 3.2), dpi=110)
    keys = [("win_rate", "win", "#2e7d32"), ("tie_rate", "tie", "#9e9e9e"), ("loss_rate", "loss", "#c62828")]
    for i, (k, _label, color) in enumerate(keys):
        iv = summary[k]
        ax.bar(i, iv["estimate"], color=color, yerr=[[iv["estimate"] - iv["low"]], [iv["high"] - iv["estimate"]]],
               capsize=6)
        ax.text(i, iv["high"] + 0.02, f"{iv['estimate']:.2f}", ha="center", fontsize=8)
    ax.set_xticks(range(3))
    ax.set_xticklabels([k[1] for k in keys])
    ax.set_ylim(0, 1.1)
    ax.set_title(f"{candidate} vs {baseline} (95% CI)", fontsize=9)
    return _png(fig)


def attack_success_png(candidate: Mapping[str, Mapping[str, Any]],
                       champion: Mapping[str, Mapping[str, Any]] | None = None) -> bytes:
    """Attack success rate per attack class (95% intervals), the champion's beside it."""
    plt = _plt()
    names = list(candidate)
    fig, ax = plt.subplots(figsize=(1.0 * max(len(names), 2) + 2.4, 3.4), dpi=110)
    width = 0.4 if champion else 0.6
    for i, cls in enumerate(names):
        s = candidate[cls]
        est, (low, high) = s["attack_success_rate"], s["ci"]
        ax.bar(i - (width / 2 if champion else 0), est, width, color="#c62828", yerr=[[est - low], [high - est]],
               capsize=4, label="candidate" if i == 0 else None)
        ax.text(i - (width / 2 if champion else 0), high + 0.02, f"{est:.2f}", ha="center", fontsize=7)
        if champion and cls in champion:
            ax.bar(i + width / 2, champion[cls]["attack_success_rate"], width, color="#9e9e9e",
                   label="champion" if i == 0 else None)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, fontsize=7, rotation=20)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("attack success rate", fontsize=8)
    ax.set_title("red-team attack success by class (95% CI)", fontsize=9)
    if champion:
        ax.legend(fontsize=7)
    return _png(fig)


def delta_chart_png(pointwise: Mapping[str, Mapping[str, Any]]) -> bytes:
    """Candidate-minus-baseline difference per rubric, with 95% intervals."""
    plt = _plt()
    names = list(pointwise)
    fig, ax = plt.subplots(figsize=(5.2, 0.5 * max(len(names), 1) + 1.4), dpi=110)
    for i, n in enumerate(names):
        d = pointwise[n]["delta"]
        ax.errorbar(d["estimate"], i, xerr=[[d["estimate"] - d["low"]], [d["high"] - d["estimate"]]], fmt="o",
                    capsize=5, color="#1565c0")
    ax.axvline(0, color="#555", lw=0.8)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=8)
    ax.set_xlabel("score delta (candidate - baseline, 1-5 scale)", fontsize=8)
    return _png(fig)


def write_sxs_report(out_dir: Path, title: str, candidate: str, baseline: str, summary: Mapping[str, Any],
                     rows: Sequence[Mapping[str, Any]], usage: Mapping[str, Any],
                     judge_status: str | None = None) -> dict[str, Path]:
    """One self-contained HTML page (charts inlined) plus the charts and rows as files.
    ``judge_status``: a warning shown above everything (an uncertified judge)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    charts: dict[str, bytes] = {}
    if "win_rate" in summary:
        charts["win_rate.png"] = win_rate_chart_png(summary, candidate, baseline)
    if summary.get("pointwise"):
        charts["pointwise_delta.png"] = delta_chart_png(summary["pointwise"])
    for name, data in charts.items():
        (out_dir / name).write_bytes(data)

    def iv(d: Mapping[str, Any] | None) -> str:
        return "-" if not d else f"{d['estimate']:.3f} [{d['low']:.3f}, {d['high']:.3f}]"

    summary_rows = [("examples", summary.get("examples")), ("judged pairs", summary.get("judged_pairs")),
                    ("failed calls (recorded per row)", summary.get("failures")),
                    ("win rate", iv(summary.get("win_rate"))), ("tie rate", iv(summary.get("tie_rate"))),
                    ("loss rate", iv(summary.get("loss_rate"))),
                    ("position consistency", iv(summary.get("position_consistency"))),
                    ("preference margin (P(candidate) - P(baseline), both orders averaged; > 0 favours the candidate)",
                     iv(summary.get("preference_margin"))),
                    ("pairwise rubric", summary.get("pairwise_rubric"))]
    for name, p in (summary.get("pointwise") or {}).items():
        summary_rows.append((f"{name}: candidate / baseline / delta",
                             f"{iv(p['candidate'])} / {iv(p['baseline'])} / {iv(p['delta'])}"))
    if summary.get("judge_human"):
        jh = summary["judge_human"]
        kappa = "not computed" if jh["cohen_kappa"] is None else f"{jh['cohen_kappa']:.3f}"
        summary_rows.append(("judge-human agreement", f"accuracy {jh['accuracy']:.3f}, kappa {kappa} (n={jh['n']})"))
    if summary.get("win_rate_ppi"):
        ppi = summary["win_rate_ppi"]
        summary_rows.append(("win rate, prediction-powered (judge corrected by human labels)",
                             (iv(ppi) if ppi.get("estimate") is not None else ppi.get("reason", "not computed"))
                             + f" (human-labelled {ppi['n_labelled']}, judge only {ppi['n_unlabelled']})"))
    summary_rows += [(f"judge {k}", v) for k, v in usage.items()]
    point_cols = sorted({k for r in rows for k in r if k.endswith("_candidate") and k != "candidate"})
    page = render(
        "sxs_report.html", title=title, judge_status=judge_status, candidate=candidate, baseline=baseline,
        summary_rows=summary_rows,
        charts=[(n, base64.b64encode(d).decode()) for n, d in charts.items()],
        point_columns=[c.removesuffix("_candidate") for c in point_cols],
        rows=[{**{k: str(r.get(k)) for k in ("outcome", "consistent", "verdict_candidate_first",
                                              "verdict_candidate_second")},
               **{k: r[k] for k in ("example_id", "input", "reference", "candidate", "baseline")},
               "explanation": r.get("explanation"), "error": r.get("error"),
               "point_scores": [(r.get(c, "-"), r.get(c.removesuffix("_candidate") + "_baseline", "-"))
                                for c in point_cols]}
              for r in rows])
    html_path = atomic_write_text(out_dir / "sxs_report.html", page)
    rows_path = out_dir / "sxs_rows.jsonl"
    rows_path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return {"html": html_path, "rows": rows_path, **{n: out_dir / n for n in charts}}


def prompt_comparison_section(old_label: str, new_label: str, diff: str, rows: Sequence[tuple[str, float, float]],
                              primary_ci: Mapping[str, float] | None, primary: str) -> tuple[str, str, str]:
    """(title, markdown, html) of a prompt comparison: the template diff beside the metric deltas."""
    from genops_assets.lib.prompts import diff_html

    ci_text = ""
    if primary_ci:
        ci_text = (f"{primary}: improvement {primary_ci['estimate']:+.4f}, 95% interval "
                   f"[{primary_ci['low']:+.4f}, {primary_ci['high']:+.4f}]")
    context = {
        "old_label": old_label, "new_label": new_label, "diff": diff.rstrip() or "(no difference)",
        "diff_html": Markup(diff_html(diff)), "ci_text": ci_text,
        "rows": [{"metric": m, "old": a, "new": b, "delta": b - a,
                  "color": "#080" if b > a else "#b00" if b < a else "#555"} for m, a, b in rows],
    }
    return (f"Prompt comparison: {new_label} vs {old_label}", render("prompt_comparison.md", **context).rstrip("\n"),
            Markup(render("prompt_comparison.html", **context)))


def rag_section(judged: Mapping[str, Mapping[str, Mapping[str, Any]]], retrieval: Mapping[str, Mapping[str, Any]],
                failures: Mapping[str, Sequence[Mapping[str, str]]], rubrics: Mapping[str, str],
                max_failures: int = 20) -> tuple[str, str, str]:
    """(title, markdown, html) of the retrieval-augmented metrics: per model the judged
    faithfulness / answer relevancy (mean, 95% interval, rows scored and failed), the
    retrieval metrics once, and the failed judge calls by row."""
    from genops_assets.lib.rag_metrics import interval_text

    names = list(judged)
    failed = [{"model": n, **f} for n, fs in failures.items() for f in fs]
    context = {
        "names": names,
        "judged": [{"metric": m, "cells": [interval_text(judged[n][m]) for n in names]}
                   for m in sorted({m for s in judged.values() for m in s})],
        "retrieval": [{"metric": m, "text": interval_text(s), "without_reference": s.get("without_reference", 0)}
                      for m, s in retrieval.items()],
        "note": ("Judge rubrics: " + ", ".join(f"{k}: {v}" for k, v in rubrics.items())
                 + ". Scores are the judge's expected rating mapped onto [0, 1];"
                 " failed calls are left out of the means."),
        "failed": failed[:max_failures], "failed_total": len(failed),
    }
    return ("Retrieval-augmented generation", render("rag_section.md", **context).rstrip("\n"),
            Markup(render("rag_section.html", **context)))


def png_markdown(alt: str, png: bytes) -> str:
    """A PNG as a Markdown image with the bytes inlined (a data URI): shown where the file is not."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"


def prompt_enhancement_markdown(production_label: str, production_score: float, candidates: Sequence[Any],
                                primary: str, target: str, n_examples: int, promoted: bool, verdict: str,
                                chart: str = "![candidates](candidates.png)") -> str:
    """The prompt-enhancement report: every candidate's score on the validation split (or why it
    was skipped) and the gate's verdict. ``chart`` is the Markdown image of the scores."""
    lines = [f"# Prompt enhancement from {production_label}", "",
             f"Scored on {n_examples} validation examples with the {target} model; metric {primary}.", "",
             f"| prompt | mode | {primary} | skipped because |", "|---|---|---|---|",
             f"| {production_label} | - | {production_score:.4f} | |"]
    for c in candidates:
        score = f"{c.metrics[primary]:.4f}" if c.metrics else "-"
        name = f"v{c.version}" if c.version else f"candidate {c.index + 1}"
        lines.append(f"| {name} | {c.mode} | {score} | {c.skip_reason or ''} |")
    lines += ["", f"**Gate:** {'promoted to candidate' if promoted else 'not promoted'} - {verdict}", "", chart]
    return "\n".join(lines) + "\n"
