"""Evaluation and training reports: Markdown, HTML with embedded charts, PNG images."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

REPORT_METRICS = (
    "valid_json_rate",
    "mean_field_exact_match",
    "overall_exact_match",
)


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
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def loss_curve_png(history: Sequence[Mapping[str, float]]) -> bytes:
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
    ax.set_title("LoRA SFT loss")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def metrics_table_md(models: Mapping[str, Mapping[str, float]], metrics: Sequence[str]) -> str:
    names = list(models)
    lines = ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for m in metrics:
        cells = []
        for n in names:
            v = models[n].get(m)
            cells.append("-" if v is None else f"{v:.3f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_eval_report(
    out_dir: Path,
    title: str,
    models: Mapping[str, Mapping[str, float]],
    metrics: Sequence[str],
    gate: Mapping[str, Any],
    samples: Sequence[Mapping[str, Any]],
) -> dict[str, Path]:
    """Write report.md, report.html (chart embedded) and metrics.png into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    png = metric_chart_png(models, [m for m in REPORT_METRICS if m in metrics] or list(metrics)[:4])
    (out_dir / "metrics.png").write_bytes(png)
    table = metrics_table_md(models, metrics)
    verdict = "PASSED" if gate.get("passed") else "FAILED"
    md = [f"# {title}", "", f"**Promotion gate: {verdict}** - {gate.get('reason', '')}", "", table, "",
          "![metrics](metrics.png)", "", "## Sample predictions", ""]
    for s in samples:
        md.append(f"- `{s['example_id']}` **{s['model']}**: `{s['prediction'][:200]}`")
    (out_dir / "report.md").write_text("\n".join(md) + "\n", encoding="utf-8")

    rows = "".join(
        "<tr><td>{}</td>{}</tr>".format(
            html.escape(m),
            "".join(
                f"<td>{models[n][m]:.3f}</td>" if m in models[n] else "<td>-</td>" for n in models
            ),
        )
        for m in metrics
    )
    head = "".join(f"<th>{html.escape(n)}</th>" for n in models)
    sample_rows = "".join(
        f"<tr><td>{html.escape(s['example_id'])}</td><td>{html.escape(s['model'])}</td>"
        f"<td><pre>{html.escape(s['input'][:300])}</pre></td><td><pre>{html.escape(s['prediction'][:300])}</pre></td>"
        f"<td>{'yes' if s.get('valid_json') else 'no'}</td></tr>"
        for s in samples
    )
    b64 = base64.b64encode(png).decode()
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px}}
pre{{white-space:pre-wrap;margin:0;max-width:40em}}.passed{{color:#080}}.failed{{color:#b00}}</style></head><body>
<h1>{html.escape(title)}</h1>
<p class="{verdict.lower()}"><b>Promotion gate: {verdict}</b> - {html.escape(str(gate.get('reason', '')))}</p>
<table><tr><th>metric</th>{head}</tr>{rows}</table>
<p><img alt="metrics chart" src="data:image/png;base64,{b64}"></p>
<h2>Sample predictions</h2><table><tr><th>id</th><th>model</th><th>input</th><th>prediction</th><th>valid JSON</th></tr>{sample_rows}</table>
</body></html>"""
    (out_dir / "report.html").write_text(page, encoding="utf-8")
    return {"markdown": out_dir / "report.md", "html": out_dir / "report.html", "chart": out_dir / "metrics.png"}
