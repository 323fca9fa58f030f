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
    "json_found_rate",
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


def _cell(models: Mapping[str, Mapping[str, float]], intervals: Mapping[str, Mapping[str, Mapping[str, float]]],
          name: str, metric: str) -> str:
    iv = intervals.get(name, {}).get(metric)
    if iv is not None:
        return f"{iv['estimate']:.3f} [{iv['low']:.3f}, {iv['high']:.3f}]"
    v = models[name].get(metric)
    return "-" if v is None else f"{v:.3f}"


def _shared_cell(summary: Mapping[str, Any]) -> str:
    if not summary.get("n"):
        return "- (no example with reference passages)"
    return f"{summary['estimate']:.3f} [{summary['low']:.3f}, {summary['high']:.3f}] (n={summary['n']}, every model)"


def metrics_table_md(models: Mapping[str, Mapping[str, float]], metrics: Sequence[str],
                     intervals: Mapping[str, Mapping[str, Mapping[str, float]]] | None = None,
                     shared: Mapping[str, Mapping[str, Any]] | None = None) -> str:
    """One row per metric, one column per model; a cell with an interval reads ``mean [low, high]``.
    ``shared`` rows hold one value for every model (metrics of the data, not the answers)."""
    names = list(models)
    lines = ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for m in metrics:
        lines.append(f"| {m} | " + " | ".join(_cell(models, intervals or {}, n, m) for n in names) + " |")
    for m, summary in (shared or {}).items():
        lines.append(f"| {m} | " + " | ".join(_shared_cell(summary) for _ in names) + " |")
    return "\n".join(lines)


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
    intervals, shared = intervals or {}, shared or {}
    out_dir.mkdir(parents=True, exist_ok=True)
    png = metric_chart_png(models, [m for m in REPORT_METRICS if m in metrics] or list(metrics)[:4])
    (out_dir / "metrics.png").write_bytes(png)
    table = metrics_table_md(models, metrics, intervals, shared)
    verdict = "PASSED" if gate.get("passed") else "FAILED"
    md = [f"# {title}", "", f"**Promotion gate: {verdict}** - {gate.get('reason', '')}", "", table, "",
          "![metrics](metrics.png)", ""]
    for sec_title, sec_md, _ in sections:
        md += [f"## {sec_title}", "", sec_md, ""]
    md += ["## Sample predictions", ""]
    for s in samples:
        md.append(f"- `{s['example_id']}` **{s['model']}**: `{s['prediction'][:200]}`")
    (out_dir / "report.md").write_text("\n".join(md) + "\n", encoding="utf-8")

    rows = "".join(
        "<tr><td>{}</td>{}</tr>".format(
            html.escape(m), "".join(f"<td>{html.escape(_cell(models, intervals, n, m))}</td>" for n in models))
        for m in metrics
    ) + "".join(f'<tr><td>{html.escape(m)}</td><td colspan="{len(models)}">{html.escape(_shared_cell(sm))}</td></tr>'
                for m, sm in shared.items())
    head = "".join(f"<th>{html.escape(n)}</th>" for n in models)
    sample_rows = "".join(
        f"<tr><td>{html.escape(s['example_id'])}</td><td>{html.escape(s['model'])}</td>"
        f"<td><pre>{html.escape(s['input'][:300])}</pre></td><td><pre>{html.escape(s['prediction'][:300])}</pre></td>"
        f"<td>{'yes' if s.get('valid_json') else 'no'}</td></tr>"
        for s in samples
    )
    b64 = base64.b64encode(png).decode()
    extra = "".join(f"<h2>{html.escape(t)}</h2>{h}" for t, _, h in sections)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px}}
pre{{white-space:pre-wrap;margin:0;max-width:40em}}.diff .add{{background:#e6ffed}}.diff .del{{background:#ffeef0}}
.side{{display:flex;gap:2em;align-items:flex-start}}.passed{{color:#080}}.failed{{color:#b00}}</style></head><body>
<h1>{html.escape(title)}</h1>
<p class="{verdict.lower()}"><b>Promotion gate: {verdict}</b> - {html.escape(str(gate.get('reason', '')))}</p>
<table><tr><th>metric</th>{head}</tr>{rows}</table>
<p><img alt="metrics chart" src="data:image/png;base64,{b64}"></p>
{extra}
<h2>Sample predictions</h2><table><tr><th>id</th><th>model</th><th>input</th><th>prediction</th><th>valid JSON</th></tr>{sample_rows}</table>
</body></html>"""
    (out_dir / "report.html").write_text(page, encoding="utf-8")
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
    for i, (label, iv) in enumerate(bars):
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
    for i, (k, label, color) in enumerate(keys):
        iv = summary[k]
        ax.bar(i, iv["estimate"], color=color, yerr=[[iv["estimate"] - iv["low"]], [iv["high"] - iv["estimate"]]],
               capsize=6)
        ax.text(i, iv["high"] + 0.02, f"{iv['estimate']:.2f}", ha="center", fontsize=8)
    ax.set_xticks(range(3))
    ax.set_xticklabels([k[1] for k in keys])
    ax.set_ylim(0, 1.1)
    ax.set_title(f"{candidate} vs {baseline} (95% CI)", fontsize=9)
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


_SXS_SCRIPT = """
<script>
function applyFilters() {
  const losses = document.getElementById('f-loss').checked;
  const incons = document.getElementById('f-incons').checked;
  document.querySelectorAll('tr.row').forEach(tr => {
    let show = true;
    if (losses && tr.dataset.outcome !== 'loss') show = false;
    if (incons && tr.dataset.consistent !== 'false') show = false;
    tr.style.display = show ? '' : 'none';
  });
}
</script>
"""


def write_sxs_report(out_dir: Path, title: str, candidate: str, baseline: str, summary: Mapping[str, Any],
                     rows: Sequence[Mapping[str, Any]], usage: Mapping[str, Any]) -> dict[str, Path]:
    """One self-contained HTML page (charts inlined) plus the charts and rows as files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    charts: dict[str, bytes] = {}
    if "win_rate" in summary:
        charts["win_rate.png"] = win_rate_chart_png(summary, candidate, baseline)
    if summary.get("pointwise"):
        charts["pointwise_delta.png"] = delta_chart_png(summary["pointwise"])
    for name, data in charts.items():
        (out_dir / name).write_bytes(data)
    esc = html.escape

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
        summary_rows.append(("judge-human agreement", f"accuracy {jh['accuracy']:.3f}, kappa {jh['cohen_kappa']:.3f} (n={jh['n']})"))
    summary_rows += [(f"judge {k}", v) for k, v in usage.items()]
    table = "".join(f"<tr><th>{esc(str(k))}</th><td>{esc(str(v))}</td></tr>" for k, v in summary_rows)
    imgs = "".join(f'<img alt="{esc(n)}" src="data:image/png;base64,{base64.b64encode(d).decode()}">'
                   for n, d in charts.items())
    point_cols = sorted({k for r in rows for k in r if k.endswith("_candidate") and k != "candidate"})
    head = "".join(f"<th>{esc(c.removesuffix('_candidate'))} (cand / base)</th>" for c in point_cols)
    body = []
    for r in rows:
        cells = "".join(
            f"<td>{r.get(c, '-')} / {r.get(c.removesuffix('_candidate') + '_baseline', '-')}</td>" for c in point_cols)
        body.append(
            f'<tr class="row" data-outcome="{esc(str(r.get("outcome")))}" '
            f'data-consistent="{str(r.get("consistent")).lower()}">'
            f"<td>{esc(r['example_id'])}</td><td><pre>{esc(r['input'])}</pre></td>"
            f"<td><pre>{esc(r['reference'])}</pre></td><td><pre>{esc(r['candidate'])}</pre></td>"
            f"<td><pre>{esc(r['baseline'])}</pre></td>"
            f"<td>{esc(str(r.get('outcome')))}<br><small>orders: {esc(str(r.get('verdict_candidate_first')))} / "
            f"{esc(str(r.get('verdict_candidate_second')))}; consistent: {esc(str(r.get('consistent')))}</small>"
            f"{'<br><small>' + esc(str(r['explanation'])) + '</small>' if r.get('explanation') else ''}"
            f"{'<br><small class=err>' + esc(str(r['error'])) + '</small>' if r.get('error') else ''}</td>"
            f"{cells}</tr>")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:24px}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ddd;padding:4px 6px;vertical-align:top;font-size:12px;text-align:left}}
pre{{white-space:pre-wrap;max-width:340px;margin:0}} img{{margin:8px 16px 8px 0}} .err{{color:#c62828}}</style>
{_SXS_SCRIPT}</head><body><h1>{esc(title)}</h1>
<h2>Summary</h2><table>{table}</table>{imgs}
<h2>Per example</h2>
<label><input type="checkbox" id="f-loss" onchange="applyFilters()"> losses only</label>
<label><input type="checkbox" id="f-incons" onchange="applyFilters()"> position-inconsistent only</label>
<table id="rows"><tr><th>id</th><th>input</th><th>reference</th><th>{esc(candidate)}</th><th>{esc(baseline)}</th>
<th>verdict</th>{head}</tr>{''.join(body)}</table></body></html>"""
    html_path = out_dir / "sxs_report.html"
    html_path.write_text(page, encoding="utf-8")
    rows_path = out_dir / "sxs_rows.jsonl"
    import json

    rows_path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return {"html": html_path, "rows": rows_path, **{n: out_dir / n for n in charts}}


def prompt_comparison_section(old_label: str, new_label: str, diff: str, rows: Sequence[tuple[str, float, float]],
                              primary_ci: Mapping[str, float] | None, primary: str) -> tuple[str, str, str]:
    """(title, markdown, html) of a prompt comparison: the template diff beside the metric deltas."""
    from genops_assets.lib.prompts import diff_html

    title = f"Prompt comparison: {new_label} vs {old_label}"
    table_md = ["| metric | " + old_label + " | " + new_label + " | delta |", "|---|---|---|---|"]
    table_md += [f"| {m} | {a:.4f} | {b:.4f} | {b - a:+.4f} |" for m, a, b in rows]
    ci_text = ""
    if primary_ci:
        ci_text = (f"{primary}: improvement {primary_ci['estimate']:+.4f}, 95% interval "
                   f"[{primary_ci['low']:+.4f}, {primary_ci['high']:+.4f}]")
    md = "\n".join(["```diff", diff.rstrip() or "(no difference)", "```", "", *table_md, "", ci_text])
    cells = "".join(
        f"<tr><td>{html.escape(m)}</td><td>{a:.4f}</td><td>{b:.4f}</td>"
        f"<td style='color:{'#080' if b > a else '#b00' if b < a else '#555'}'>{b - a:+.4f}</td></tr>"
        for m, a, b in rows)
    page = (f'<div class="side"><div>{diff_html(diff)}</div><div><table><tr><th>metric</th>'
            f"<th>{html.escape(old_label)}</th><th>{html.escape(new_label)}</th><th>delta</th></tr>{cells}</table>"
            f"<p>{html.escape(ci_text)}</p></div></div>")
    return title, md, page


def rag_section(judged: Mapping[str, Mapping[str, Mapping[str, Any]]], retrieval: Mapping[str, Mapping[str, Any]],
                failures: Mapping[str, Sequence[Mapping[str, str]]], rubrics: Mapping[str, str],
                max_failures: int = 20) -> tuple[str, str, str]:
    """(title, markdown, html) of the retrieval-augmented metrics: per model the judged
    faithfulness / answer relevancy (mean, 95% interval, rows scored and failed), the
    retrieval metrics once, and the failed judge calls by row."""
    from genops_assets.lib.rag_metrics import interval_text

    title = "Retrieval-augmented generation"
    metrics = sorted({m for s in judged.values() for m in s})
    names = list(judged)
    md = ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    md += [f"| {m} | " + " | ".join(interval_text(judged[n][m]) for n in names) + " |" for m in metrics]
    md += ["", "| retrieval metric (same for every model) | value |", "|---|---|"]
    md += [f"| {m} | {interval_text(s)}"
           + (f"; {s['without_reference']} example(s) without reference passages" if s.get("without_reference")
              else "") + " |" for m, s in retrieval.items()]
    note = ("Judge rubrics: " + ", ".join(f"{k}: {v}" for k, v in rubrics.items())
            + ". Scores are the judge's expected rating mapped onto [0, 1]; failed calls are left out of the means.")
    md += ["", note]
    failed = [(n, f) for n, fs in failures.items() for f in fs]
    if failed:
        md += ["", f"Failed judge calls ({len(failed)}):"]
        md += [f"- {n} `{f['example_id']}` {f['metric']}: {f['error'][:160]}" for n, f in failed[:max_failures]]
    esc = html.escape
    head = "".join(f"<th>{esc(n)}</th>" for n in names)
    body = "".join(f"<tr><td>{esc(m)}</td>" + "".join(f"<td>{esc(interval_text(judged[n][m]))}</td>" for n in names)
                   + "</tr>" for m in metrics)
    body += "".join(f'<tr><td>{esc(m)}</td><td colspan="{len(names)}">{esc(interval_text(s))} (same for every '
                    f"model; {s.get('without_reference', 0)} without reference passages)</td></tr>"
                    for m, s in retrieval.items())
    fail_html = ""
    if failed:
        fail_html = (f"<h3>Failed judge calls ({len(failed)})</h3><table><tr><th>model</th><th>id</th><th>metric</th>"
                     "<th>error</th></tr>" + "".join(
                         f"<tr><td>{esc(n)}</td><td>{esc(f['example_id'])}</td><td>{esc(f['metric'])}</td>"
                         f"<td>{esc(f['error'][:300])}</td></tr>" for n, f in failed[:max_failures]) + "</table>")
    page = f"<table><tr><th>metric</th>{head}</tr>{body}</table><p>{esc(note)}</p>{fail_html}"
    return title, "\n".join(md), page


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
