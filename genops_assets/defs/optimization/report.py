"""The optimization table: every variant of the candidate (merged, quantized, distilled) evaluated
on the golden set through the evaluation service and benchmarked on its own server, beside the
original; failed variants are marked in the registry and never deployed."""

from __future__ import annotations

import contextlib
import functools
import json
import socket
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import dagster as dg
from pydantic import Field

from genops_assets.lib.hashing import atomic_write_text
from genops_assets.lib.optimization_report import (
    BASELINE,
    FAILED,
    TABLE_METRICS,
    VariantMeasurement,
    build_rows,
    fastest_passing,
    mlflow_metrics,
    quality_speed_png,
    report_markdown,
)
from genops_assets.lib.tasks import TaskRef
from resources.paths import GenopsHome
from resources.tracking import MlflowTracking, variant_model_name
from resources.warehouse import DuckDBWarehouse, mart_schema

ARTIFACT_DIR = "optimization"
CHART = "quality_vs_speed.png"
STATUS_TAG, REASON_TAG = "genops.status", "genops.failure_reason"
PARITY_EXAMPLES = 8  # greedy answers per variant that deployed_variant's endpoint must reproduce


class OptimizationConfig(dg.Config):
    max_examples: int = Field(0, ge=0, description="Golden examples each variant is evaluated on (0: all).")
    batch_size: int = Field(8, ge=1, description="Generation batch size of the genops engine.")
    bench: bool = Field(True, description="Run the serving benchmark (off: speed and memory read 'not computed').")
    bench_requests: int = Field(16, ge=1, description="Requests per concurrency level (at least the level).")
    bench_max_tokens: int = Field(48, ge=1, description="Completion tokens per benchmark request.")
    bench_port: int = Field(0, ge=0, description="Port of the benchmark servers (0: a free one).")


def free_port() -> int:
    """A port nobody listens on now (the benchmark servers take it in turn)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dir_size(path: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def collect_variants(upstream: Mapping[str, dict]) -> list[dict]:
    """Every variant of the upstream assets' values (``{"variants": [...]}``), in order."""
    out = []
    for asset, value in upstream.items():
        if not isinstance(value, dict) or not isinstance(value.get("variants"), list):
            raise dg.Failure(f"upstream asset {asset} has no 'variants' list in its value")
        out += value["variants"]
    return out


@contextlib.contextmanager
def variant_engine(variant: Mapping, tokenizer_dir: str, log) -> Iterator[tuple[object, Callable | None]]:
    """``(loaded, engine)`` for evaluate_model: the genops engine on a safetensors folder, or a
    llama.cpp server on a GGUF file (started here, stopped after)."""
    if variant["format"] == "gguf":
        from transformers import AutoTokenizer

        from genops_assets.lib.variants import gguf_file
        from genops_assets.serving.llamacpp import LlamaCppServer, llamacpp_generate

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        server = LlamaCppServer(gguf_file(variant["path"]))
        server.start()
        try:
            yield None, lambda batch, max_new_tokens, json_schema=None: llamacpp_generate(
                server, tokenizer, batch, max_new_tokens, json_schema=json_schema)
        finally:
            server.stop()
        return
    from genops_assets.serving.adapters import load_model

    @functools.cache
    def loaded():
        log(f"loading {variant['name']} from {variant['path']}")
        return load_model(variant["path"])

    yield loaded, None


def measure(name: str, fmt: str, engine: str, version, size: int | None, ev, bench: dict | None,
            primary: str) -> VariantMeasurement:
    """One variant's numbers: its evaluation (``ev``: a ModelEval) and its benchmark result."""
    from genops_assets.lib.metrics import per_example

    bench_ok = bench is not None and "error" not in bench
    # A server that cannot start or answer cannot serve the variant: a load failure.
    served_error = f"server: {bench['error']}" if bench is not None and "error" in bench else None
    return VariantMeasurement(
        name, fmt, engine, None if version is None else str(version), size,
        bench["peak_rss_bytes"] if bench_ok else None, bench["levels"] if bench_ok else None,
        {k: float(v) for k, v in ev.metrics.items()},
        {m: per_example(ev.scores, m) for m in dict.fromkeys((primary, *TABLE_METRICS))},
        error=served_error,
        bench_error=None if bench_ok else ("benchmark turned off" if bench is None else bench["error"]))


def evaluate_variants(variants: list[dict], tokenizer_dir: str, evaluate, log) -> tuple[dict, dict[str, str]]:
    """Each variant's ModelEval through ``evaluate(label, loaded, adapter, digest, engine)``, and the
    error of each variant that could not be loaded or answer (never a made-up score)."""
    evals, errors = {}, {}
    for v in variants:
        try:
            with variant_engine(v, tokenizer_dir, log.info) as (loaded, engine):
                evals[v["name"]] = evaluate(v["name"], loaded, None, v["digest"], engine)
        except Exception as exc:  # a variant that cannot load or answer is failed with the reason
            errors[v["name"]] = f"{type(exc).__name__}: {exc}"
            log.warning(f"{v['name']}: {errors[v['name']]}")
    return evals, errors


def optimization_report(
    context: dg.AssetExecutionContext,
    config: OptimizationConfig,
    base_model: dict,
    tuned_adapter: dict,
    eval_report: dict,
    task: TaskRef,
    warehouse: DuckDBWarehouse,
    mlflow: MlflowTracking,
    home: GenopsHome,
    **variant_assets: dict,
) -> dg.Output[dict]:
    """One row per variant (the original first): size on disk, peak serving memory, tokens/s and
    p50 latency at concurrency 1 and 16, the golden-set metrics with 95% intervals and their
    delta in points against the original, passed/failed with the reason. Each variant is
    evaluated through the evaluation service (genops engine for safetensors, llama.cpp for GGUF;
    answers cached by content, so the original's come from eval_report's run) and benchmarked on
    its own server, one at a time. Sets ``genops.status`` / ``genops.failure_reason`` on each
    variant's registry version. Cost: the golden set once per variant plus about a minute of
    benchmark per variant on CPU."""
    from genops_assets.bench.variants import bench_variants
    from genops_assets.lib.cache import CallCache
    from genops_assets.lib.eval_report import adapter_on_base, parity_examples
    from genops_assets.lib.evaluation import evaluate_model, examples_from_frame
    from genops_assets.lib.formatting import build_messages
    from genops_assets.serving.adapters import load_model

    spec = task.load()
    settings = spec.optimization
    version = str(tuned_adapter["version"])
    if str(eval_report["candidate"]["version"]) != version:
        raise dg.Failure(f"eval_report is for v{eval_report['candidate']['version']}, tuned_adapter is v{version}")
    variants = [v for v in collect_variants(variant_assets) if v["name"] in settings.variants]
    missing = [n for n in settings.variants if n not in {v["name"] for v in variants}]
    if missing:
        context.log.warning(f"optimization.variants lists {missing}, which no upstream asset built")
    production = mlflow.resolve_prompt(spec)
    golden = warehouse.query_df(f"select * from {mart_schema(spec.name)}.golden_eval_dataset order by example_id")
    examples = examples_from_frame(golden.head(config.max_examples) if config.max_examples else golden)
    cache = CallCache(home.cache_dir / "calls.sqlite")
    log, primary = context.log.info, spec.primary_metric

    def evaluate(label, loaded, adapter, digest, engine=None):
        kwargs = {"engine": engine} if engine is not None else {}
        return evaluate_model(loaded, adapter, label, digest, spec, examples, [], cache, config.batch_size, log,
                              prompt=production.template, **kwargs)

    original_digest = adapter_on_base(base_model["folder_digest"], tuned_adapter["adapter_digest"])
    original_ev = evaluate(BASELINE, functools.cache(lambda: load_model(
        base_model["path"], {"candidate": tuned_adapter["adapter_dir"]})), "candidate", original_digest)
    evals, errors = evaluate_variants(variants, base_model["path"], evaluate, context.log)
    evals = {BASELINE: original_ev, **evals}

    benches: dict[str, dict] = {}
    if config.bench:
        prompts = [build_messages(spec, ex.input_text, prompt=production.template) for ex in examples[:16]]
        port = config.bench_port or free_port()
        served = [{"name": BASELINE, "format": "adapter", "adapter_dir": tuned_adapter["adapter_dir"]},
                  *(v for v in variants if v["name"] not in errors)]
        benches = bench_variants(served, base_model["path"], prompts, home.runs_dir / "bench-variants", port,
                                 config.bench_requests, config.bench_max_tokens, log)

    original = measure(BASELINE, "adapter", "local", version,
                       base_model["size_bytes"] + dir_size(tuned_adapter["adapter_dir"]), original_ev,
                       benches.get(BASELINE) if config.bench else None, primary)
    measured = [VariantMeasurement(v["name"], v["format"], v["engine"], str(v["version"]), v["size_bytes"],
                                   error=errors[v["name"]]) if v["name"] in errors else
                measure(v["name"], v["format"], v["engine"], v["version"], v["size_bytes"], evals[v["name"]],
                        benches.get(v["name"]) if config.bench else None, primary) for v in variants]
    rows = build_rows(original, measured, primary, settings.quality_floor_points)
    fastest = fastest_passing(rows)
    for r in rows:
        context.log.info(f"{r['variant']}: {r['status']} ({r['reason']})")

    registry = variant_model_name(spec.name)
    title = f"{spec.name}: variants of v{version} on {len(examples)} golden examples"
    run_tags = {"genops.dagster_run_id": context.run.run_id, "genops.candidate_version": version}
    with mlflow.run(f"genops/{spec.name}", f"optimization-v{version}", run_tags) as run_id:
        out_dir = home.runs_dir / "optimization" / run_id
        out_dir.mkdir(parents=True, exist_ok=True)
        chart = out_dir / CHART
        chart.write_bytes(quality_speed_png(rows, primary))
        markdown = report_markdown(title, rows, primary, settings.quality_floor_points, fastest, CHART)
        atomic_write_text(out_dir / "report.md", markdown)
        atomic_write_text(out_dir / "rows.json", json.dumps(rows, indent=2))
        atomic_write_text(out_dir / "bench.json", json.dumps(benches, indent=2))
        mlflow.log_params(run_id, {"candidate_version": version, "primary_metric": primary,
                                   "quality_floor_points": settings.quality_floor_points,
                                   "golden_examples": len(examples), "variants": ",".join(r["variant"] for r in rows),
                                   "bench_requests": config.bench_requests if config.bench else 0,
                                   "bench_max_tokens": config.bench_max_tokens})
        mlflow.log_metrics(run_id, mlflow_metrics(rows))
        mlflow.log_artifacts(run_id, out_dir, ARTIFACT_DIR)
        for r in rows[1:]:
            mlflow.set_version_tags(registry, r["version"], {
                STATUS_TAG: r["status"], REASON_TAG: r["reason"][:1000] if r["status"] == FAILED else "",
                "genops.optimization.run_id": run_id})

    value = {"rows": rows, "baseline": BASELINE, "fastest_passing": fastest, "mlflow_run_id": run_id,
             "registered_model": registry, "candidate_version": version, "primary_metric": primary,
             "variants": {v["name"]: v for v in variants},
             "parity_examples": {n: parity_examples(ev, PARITY_EXAMPLES) for n, ev in evals.items()},
             "report_markdown": str(out_dir / "report.md")}
    from genops_assets.lib.report import png_markdown

    return dg.Output(value, metadata={
        "table": dg.MetadataValue.md(markdown.replace(f"![quality vs speed]({CHART})",
                                                      png_markdown("quality vs speed", chart.read_bytes()))),
        "report_path": dg.MetadataValue.path(str(out_dir / "report.md")),
        "fastest_passing": str(fastest),
        "failed": ", ".join(r["variant"] for r in rows if r["status"] == FAILED) or "none",
        "mlflow_run_id": run_id,
        "golden_examples": len(examples),
        "not_built": ", ".join(missing) or "none",
    })
