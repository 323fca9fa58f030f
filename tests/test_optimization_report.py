"""The optimization table: the quality floor on both sides of its threshold, "not computed" for
numbers that were not measured, the task settings, the asset with the tiny model (every variant
evaluated, benchmarked on its own server, logged to MLflow, its registry version tagged) and
deployed_variant, which never deploys a failed variant.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import dagster as dg
import pytest

from genops_assets.defs.optimization import build_optimization_assets
from genops_assets.defs.optimization.deploy import choose_variant
from genops_assets.lib.hashing import file_digests, sha256_dir, sha256_json
from genops_assets.lib.optimization_report import (
    FAILED,
    NOT_COMPUTED,
    PASSED,
    VariantMeasurement,
    build_rows,
    fastest_passing,
    mlflow_metrics,
    report_markdown,
)
from genops_assets.lib.prompts import PRODUCTION, prompt_registry_name
from genops_assets.lib.tasks import TaskConfigError, TaskRef, load_task
from genops_assets.serving import control
from resources import build_resources
from resources.tracking import CHAMPION

ROOT = Path(__file__).resolve().parents[1]
TASK = "support_triage"
PRIMARY = "mean_field_exact_match"
VARIANTS_MODEL = f"genops-{TASK}-variants"


def speed(c1: float | None, c16: float | None = None) -> dict:
    out = {}
    if c1 is not None:
        out["1"] = {"tokens_per_s": c1, "p50_s": 1.0}
    if c16 is not None:
        out["16"] = {"tokens_per_s": c16, "p50_s": 2.0}
    return out


ORIGINAL = VariantMeasurement("original", "adapter", "local", "3", size_bytes=1000, peak_rss_bytes=4000,
                              bench=speed(20.0, 80.0), metrics={PRIMARY: 0.5, "valid_json_rate": 1.0},
                              per_example={PRIMARY: [0.0, 1.0] * 10})


def gguf(name: str, primary: float, c1: float | None, version: str) -> VariantMeasurement:
    return VariantMeasurement(name, "gguf", "llamacpp", version, size_bytes=300, peak_rss_bytes=900,
                              bench=speed(c1, 100.0) if c1 is not None else None, metrics={PRIMARY: primary})


def table(*variants: VariantMeasurement) -> dict:
    rows = build_rows(ORIGINAL, list(variants), PRIMARY, 2.0)
    return {"rows": rows, "baseline": "original", "fastest_passing": fastest_passing(rows)}


def test_the_floor_passes_1_9_points_below_and_fails_2_1_below():
    report = table(gguf("q8_0", 0.481, 50.0, "1"), gguf("q4_k_m", 0.479, 70.0, "2"))
    rows = {r["variant"]: r for r in report["rows"]}
    assert rows["original"]["status"] == PASSED
    assert rows["q8_0"]["status"] == PASSED and rows["q8_0"]["delta_points"][PRIMARY] == pytest.approx(-1.9)
    assert rows["q4_k_m"]["status"] == FAILED and rows["q4_k_m"]["delta_points"][PRIMARY] == pytest.approx(-2.1)
    assert "2.10 points below" in rows["q4_k_m"]["reason"]
    # The faster variant failed: the fastest passing one is the slower q8_0 ...
    assert report["fastest_passing"] == "q8_0"
    assert rows["q8_0"]["ratios"]["tokens_per_s_c1"] == 2.5 and rows["q8_0"]["ratios"]["size"] == 0.3
    # ... and the failed one is never chosen, by name or as the fastest.
    assert choose_variant(report, "fastest")["variant"] == "q8_0"
    with pytest.raises(dg.Failure, match=r"q4_k_m.*failed the optimization report.*2\.10 points below"):
        choose_variant(report, "q4_k_m")
    assert choose_variant(report, "none") is None


def test_a_variant_that_fails_to_load_is_failed_with_its_reason():
    broken = VariantMeasurement("merged", "safetensors", "local", "4", error="OSError: no config.json in /x")
    rows = build_rows(ORIGINAL, [broken], PRIMARY, 2.0)
    assert rows[1]["status"] == FAILED and rows[1]["reason"] == "load failure: OSError: no config.json in /x"
    with pytest.raises(dg.Failure, match="failed the optimization report"):
        choose_variant({"rows": rows, "baseline": "original"}, "merged")
    with pytest.raises(ValueError, match="original has no"):
        build_rows(VariantMeasurement("original", "adapter", "local", error="boom"), [broken], PRIMARY, 2.0)


def test_missing_numbers_read_not_computed_and_are_never_zero():
    slowless = gguf("q4_k_m", 0.5, None, "2")
    slowless.bench_error = "RuntimeError: llama-cpp-python is not installed"
    rows = build_rows(ORIGINAL, [slowless], PRIMARY, 2.0)
    row = rows[1]
    assert row["speed"]["1"]["tokens_per_s"] is None and row["ratios"]["tokens_per_s_c1"] is None
    metrics = mlflow_metrics(rows)
    assert "q4_k_m.tokens_per_s_c1" not in metrics and "q4_k_m.ratio_tokens_per_s_c1" not in metrics
    assert metrics["original.tokens_per_s_c1"] == 20.0 and metrics["q4_k_m.size_bytes"] == 300.0
    markdown = report_markdown("t", rows, PRIMARY, 2.0, fastest_passing(rows))
    line = next(ln for ln in markdown.splitlines() if ln.startswith("| q4_k_m"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[4:9] == [NOT_COMPUTED] * 5  # tok/s and p50 at both levels, speed-up
    assert "llama-cpp-python is not installed" in markdown
    assert fastest_passing(rows) is None  # no measured speed: not "the fastest"
    # The original's interval comes from its per-example scores.
    assert rows[0]["intervals"][PRIMARY]["low"] < 0.5 < rows[0]["intervals"][PRIMARY]["high"]


def test_optimization_settings_default_and_a_bad_value_names_file_and_setting(tmp_path):
    spec = load_task(ROOT / "tasks", TASK)
    assert spec.optimization.quality_floor_points == 2.0 and spec.constrained is True
    assert spec.optimization.deploy == "fastest"  # the demo task serves its fastest passing variant
    assert load_task(tasks_with(tmp_path / "a").tasks_dir, TASK).optimization.deploy == "none"
    with pytest.raises(TaskConfigError, match=r"task.yaml: optimization.quality_floor_points: .*greater than or"):
        tasks_with(tmp_path / "b", quality_floor_points=-1).load()
    with pytest.raises(TaskConfigError, match=r"optimization.variants: unknown variant\(s\) \['q3'\]"):
        tasks_with(tmp_path / "c", variants=["merged", "q3"]).load()
    with pytest.raises(TaskConfigError, match="deploy: must be 'none', 'fastest' or one of the variants"):
        tasks_with(tmp_path / "d", variants=["merged"], deploy="q8_0").load()


# --- the assets, with the tiny model ------------------------------------------------------------


def tasks_with(tmp_path: Path, **optimization) -> TaskRef:
    """support_triage with ``optimization`` as its optimization settings."""
    import yaml

    shutil.copytree(ROOT / "tasks" / TASK, tmp_path / "tasks" / TASK)
    cfg = tmp_path / "tasks" / TASK / "task.yaml"
    cfg.write_text(yaml.safe_dump({**yaml.safe_load(cfg.read_text()), "optimization": optimization}))
    return TaskRef(TASK, str(tmp_path / "tasks"))


@pytest.fixture()
def res(tmp_path, home):
    resources = build_resources(home=home)
    spec = load_task(ROOT / "tasks", TASK)
    tracking = resources["mlflow"]
    ref, _ = tracking.register_prompt(prompt_registry_name(TASK), spec.prompt, "the task folder's prompt")
    tracking.set_prompt_alias(ref.name, PRODUCTION, ref.version)
    golden = [{"example_id": f"g{i}", "input_text": text, "output_json": json.dumps(out)}
              for i, (text, out) in enumerate([("My parcel is three weeks late.", {"category": "shipping"}),
                                                ("I was charged twice this month.", {"category": "billing"}),
                                                ("The app crashes on login.", {"category": "technical"})])]
    import duckdb

    con = duckdb.connect(resources["warehouse"].path)
    con.execute(f"create schema marts_{TASK}")
    con.execute(f"create table marts_{TASK}.golden_eval_dataset (example_id varchar, input_text varchar, "
                "output_json varchar)")
    con.executemany(f"insert into marts_{TASK}.golden_eval_dataset values (?, ?, ?)",
                    [[g["example_id"], g["input_text"], g["output_json"]] for g in golden])
    con.close()
    return {k: resources[k] for k in ("mlflow", "home", "endpoint", "warehouse")} | {
        "io_manager": dg.FilesystemIOManager(base_dir=str(tmp_path / "io"))}


def register_variant_folder(tracking, name: str, folder: Path, fmt: str, engine: str) -> dict:
    """A variant as the variants' assets give it (VariantFiles fields and its registry version)."""
    with tracking.run(f"genops/{TASK}", f"variant-{name}", {}) as run_id:
        mv = tracking.register(VARIANTS_MODEL, str(folder), run_id, {"genops.variant": name, "genops.format": fmt})
    return {"name": name, "path": str(folder), "format": fmt, "engine": engine, "parent": None,
            "size_bytes": sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()),
            "digest": sha256_dir(folder) if folder.is_dir() else "missing", "version": mv.version}


def upstream(base_dir: Path, adapter_dir: Path, variants: list[dict]) -> list:
    @dg.asset(name="base_model")
    def base_model_value() -> dict:
        return {"name": "tiny", "path": str(base_dir), "folder_digest": sha256_dir(base_dir),
                "size_bytes": sum(f.stat().st_size for f in base_dir.rglob("*") if f.is_file())}

    @dg.asset(key=[TASK, "tuned_adapter"])
    def tuned_adapter_value() -> dict:
        return {"model_name": f"genops-{TASK}", "version": "1", "adapter_dir": str(adapter_dir),
                "adapter_digest": sha256_json(file_digests(adapter_dir))}

    @dg.asset(key=[TASK, "eval_report"])
    def eval_report_value() -> dict:
        return {"candidate": {"version": "1"}}

    @dg.asset(key=[TASK, "merged_model"])
    def merged_model_value() -> dict:
        return {"variants": variants}

    @dg.asset(key=[TASK, "golden_eval_dataset"])
    def golden_eval_dataset() -> None:
        return None

    return [base_model_value, tuned_adapter_value, eval_report_value, merged_model_value, golden_eval_dataset]


def report_asset(task: TaskRef, *variant_assets: str) -> dg.AssetsDefinition:
    """optimization_report with ``variant_assets`` as its variants' inputs, as the graph wires it
    once their builders are listed in ``variant_builders``."""
    from genops_assets.components.binding import bind_task, task_ins, task_key
    from genops_assets.defs.optimization.report import optimization_report

    return dg.asset(name="optimization_report", key_prefix=[TASK], group_name=f"{TASK}_optimization",
                    ins=task_ins(task, "tuned_adapter", "eval_report", *variant_assets),
                    deps=[task_key(task, "golden_eval_dataset")])(bind_task(optimization_report, task))


@pytest.mark.graph
@pytest.mark.server
def test_optimization_report_evaluates_benchmarks_logs_and_tags_every_variant(
        res, tmp_path, tiny_model_dir, tiny_adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tracking = res["mlflow"]
    merged = tmp_path / "merged"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tiny_adapter_dir)
    model.merge_and_unload().save_pretrained(merged)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(merged)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    variants = [register_variant_folder(tracking, "merged", merged, "safetensors", "local"),
                register_variant_folder(tracking, "distilled", broken, "safetensors", "local")]
    task = tasks_with(tmp_path, variants=["merged", "distilled"])
    report = report_asset(task, "merged_model")
    config = {"max_examples": 3, "bench_requests": 2, "bench_max_tokens": 4}
    result = dg.materialize([*upstream(tiny_model_dir, tiny_adapter_dir, variants), report], resources=res,
                            run_config={"ops": {task.step("optimization_report"): {"config": config}}})
    value = result.output_for_node(task.step("optimization_report"))
    rows = {r["variant"]: r for r in value["rows"]}
    assert list(rows) == ["original", "merged", "distilled"]
    assert rows["distilled"]["status"] == FAILED and rows["distilled"]["reason"].startswith("load failure: ")
    assert rows["distilled"]["speed"]["1"]["tokens_per_s"] is None  # a failed load is not benchmarked
    for name in ("original", "merged"):
        assert rows[name]["speed"]["1"]["tokens_per_s"] > 0 and rows[name]["speed"]["16"]["p50_s"] > 0
        assert rows[name]["peak_rss_bytes"] > 10 * 2**20
        assert rows[name]["metrics"]["n_examples"] == 3.0 and PRIMARY in rows[name]["intervals"]
    # The merged weights answer as the adapter on its base: same quality, so the floor passes.
    assert rows["merged"]["status"] == PASSED

    (mat,) = result.asset_materializations_for_node(task.step("optimization_report"))
    assert "| merged (v1) |" in mat.metadata["table"].value and "data:image/png;base64," in mat.metadata["table"].value
    run = tracking.client().get_run(value["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.params["quality_floor_points"] == "2.0"
    assert {"merged.tokens_per_s_c1", f"original.{PRIMARY}", "distilled.passed"} <= set(run.data.metrics)
    logged = {a.path for a in tracking.client().list_artifacts(run.info.run_id, "optimization")}
    assert {"optimization/report.md", "optimization/rows.json", "optimization/quality_vs_speed.png"} <= logged
    tags = {v["name"]: tracking.get_version(VARIANTS_MODEL, v["version"]).tags for v in variants}
    assert tags["merged"]["genops.status"] == "passed" and tags["merged"]["genops.failure_reason"] == ""
    assert tags["distilled"]["genops.status"] == "failed"
    assert tags["distilled"]["genops.failure_reason"].startswith("load failure")


def failed_report() -> dict:
    report = table(gguf("q8_0", 0.481, 50.0, "1"), gguf("q4_k_m", 0.479, 70.0, "2"))
    return {**report, "registered_model": VARIANTS_MODEL, "variants": {}, "parity_examples": {}}


def deploy_assets(task: TaskRef, report_value: dict, base_dir: Path) -> list:
    @dg.asset(key=[TASK, "optimization_report"])
    def optimization_report_value() -> dict:
        return report_value

    @dg.asset(name="base_model")
    def base_model_value() -> dict:
        return {"path": str(base_dir)}

    deploy = next(a for a in build_optimization_assets(task) if a.key.path[-1] == "deployed_variant")
    return [optimization_report_value, base_model_value, deploy]


@pytest.mark.graph
def test_deployed_variant_never_deploys_a_failed_variant(res, tmp_path, tiny_model_dir, home):
    task = tasks_with(tmp_path, deploy="q4_k_m")
    result = dg.materialize(deploy_assets(task, failed_report(), tiny_model_dir), resources=res,
                            raise_on_error=False)
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    assert failure.step_key == task.step("deployed_variant")
    assert "not deploying 'q4_k_m': it failed the optimization report" in failure.event_specific_data.error.message
    assert res["mlflow"].alias(VARIANTS_MODEL, CHAMPION) is None  # nothing promoted
    assert control.read_state(home / "endpoint") is None  # no server was started


def test_the_optimization_job_is_its_own_and_the_loop_never_runs_it():
    from genops_assets.definitions import defs

    graph = defs.resolve_asset_graph()
    job = {k.to_user_string() for k in defs.resolve_job_def(f"{TASK}_optimization").asset_layer.selected_asset_keys}
    assert {f"{TASK}/optimization_report", f"{TASK}/deployed_variant"} <= job
    loop = {k.to_user_string() for k in defs.resolve_job_def(f"{TASK}_genops_loop").asset_layer.selected_asset_keys}
    assert not {k for k in loop if k.split("/")[-1] in ("optimization_report", "deployed_variant")}
    report = graph.get(dg.AssetKey([TASK, "optimization_report"]))
    assert {f"{TASK}/tuned_adapter", f"{TASK}/eval_report", "base_model"} <= {
        k.to_user_string() for k in report.parent_keys}
    assert dg.AssetKey([TASK, "optimization_report"]) in graph.get(dg.AssetKey([TASK, "deployed_variant"])).parent_keys


@pytest.mark.server
def test_a_gguf_variant_is_benchmarked_on_llama_cpp_with_its_peak_memory(tmp_path):
    """The embedded GGUF as a GGUF variant: llama.cpp's server answers at both levels and its
    resident memory (the weights at least) is sampled."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is installed by make install-llamacpp")
    from graph_support import free_port

    from genops_assets.bench.variants import bench_variant
    from genops_assets.lib.base_model import find_embedded_gguf

    gguf = find_embedded_gguf()
    folder = tmp_path / "q8_0"
    folder.mkdir()
    (folder / gguf.name).symlink_to(gguf)
    prompts = [[{"role": "user", "content": "Where is my parcel?"}]]
    result = bench_variant({"name": "q8_0", "format": "gguf", "path": str(folder)}, "", prompts, tmp_path / "work",
                           free_port(), requests=2, max_tokens=4)
    assert result["served_by"] == "llama.cpp server"
    assert result["levels"]["1"]["tokens_per_s"] > 0 and result["levels"]["16"]["requests"] == 16
    assert result["peak_rss_bytes"] > gguf.stat().st_size * 0.5


def test_a_long_failure_reason_stays_in_its_table_cell():
    broken = VariantMeasurement("merged", "safetensors", "local", "4", error="ValueError: first line\nsecond | line")
    markdown = report_markdown("t", build_rows(ORIGINAL, [broken], PRIMARY, 2.0), PRIMARY, 2.0, None)
    line = next(ln for ln in markdown.splitlines() if ln.startswith("| merged"))
    assert line.endswith("failed: load failure: ValueError: first line second \\| line |")


def llama_cpp_route_missing() -> str | None:
    """What the GGUF path of the table and the deploy needs that this checkout lacks, if anything."""
    import importlib.util
    import inspect

    from genops_assets.lib.evaluation import evaluate_model
    from resources.endpoint import ServingBackend
    from resources.tracking import MlflowTracking

    needs = {"llama-cpp-python": importlib.util.find_spec("llama_cpp") is not None,
             "genops_assets.serving.llamacpp": importlib.util.find_spec("genops_assets.serving.llamacpp") is not None,
             "genops_assets.lib.variants": importlib.util.find_spec("genops_assets.lib.variants") is not None,
             "evaluate_model(engine=)": "engine" in inspect.signature(evaluate_model).parameters,
             "ServingBackend.deploy(variant=)": "variant" in inspect.signature(ServingBackend.deploy).parameters,
             "MlflowTracking.register_variant": hasattr(MlflowTracking, "register_variant")}
    missing = [k for k, ok in needs.items() if not ok]
    return ", ".join(missing) or None


@pytest.mark.graph
@pytest.mark.server
def test_a_passing_gguf_variant_is_evaluated_on_llama_cpp_deployed_promoted_and_answers(
        res, tmp_path, tiny_model_dir, tiny_adapter_dir):
    """The embedded GGUF as variant q4_k_m: evaluated through llama.cpp, it passes the floor (the
    tiny original scores nothing), is served as challenger, matches its own offline answers,
    becomes champion of genops-<task>-variants and answers through the openai client."""
    missing = llama_cpp_route_missing()
    if missing:
        pytest.skip(f"the llama.cpp path needs {missing}")
    from genops_assets.lib.audit import AuditLog
    from genops_assets.lib.base_model import find_embedded_gguf
    from genops_assets.lib.integrity import write_manifest
    from genops_assets.lib.variants import VariantFiles

    tracking = res["mlflow"]
    folder = tmp_path / "q4_k_m"
    folder.mkdir()
    shutil.copy(find_embedded_gguf(), folder / "model.gguf")
    write_manifest(folder)
    files = VariantFiles("q4_k_m", str(folder), "gguf", "llamacpp", "merged", (folder / "model.gguf").stat().st_size,
                         sha256_dir(folder))
    with tracking.run(f"genops/{TASK}", "variant-q4_k_m", {}) as run_id:
        mv = tracking.register_variant(TASK, files, run_id, "1", "test-q4_k_m", {})
    variant = {**files.__dict__, "version": mv.version}
    task = tasks_with(tmp_path, variants=["q4_k_m"], deploy="q4_k_m")
    deploy = next(a for a in build_optimization_assets(task) if a.key.path[-1] == "deployed_variant")
    inputs = [a for a in upstream(tiny_model_dir, tiny_adapter_dir, [variant])
              if a.key.path[-1] != "merged_model"]

    @dg.asset(key=[TASK, "quantized_models"])
    def quantized_models_value() -> dict:
        return {"variants": [variant]}

    result = dg.materialize([*inputs, quantized_models_value, report_asset(task, "quantized_models"), deploy],
                            resources=res,
                            run_config={"ops": {task.step("optimization_report"): {"config": {
                                "max_examples": 3, "bench": False}}}})
    value = result.output_for_node(task.step("optimization_report"))
    row = {r["variant"]: r for r in value["rows"]}["q4_k_m"]
    assert row["status"] == PASSED and row["speed"]["1"]["tokens_per_s"] is None  # bench off: not computed
    deployed = result.output_for_node(task.step("deployed_variant"))
    assert deployed["deployed"] == "q4_k_m" and deployed["engine"] == "llamacpp" and deployed["verified_answer"]
    assert deployed["parity"]["checked"] == 3 and deployed["parity"]["matched"] == 3
    # the route names the adapter it was made from: the registry watcher keeps it while v1 is champion
    assert control.read_state(Path(res["endpoint"].state_dir)).variants[TASK]["source_version"] == "1"
    assert tracking.alias(VARIANTS_MODEL, CHAMPION).version == mv.version
    assert tracking.get_version(VARIANTS_MODEL, mv.version).tags["genops.status"] == "passed"
    actions = [e["action"] for e in AuditLog(res["home"].audit_path).entries(VARIANTS_MODEL)]
    assert actions[:2] == ["deploy", "promote"]


def test_genops_optimize_records_the_variants_numbers_beside_the_bench_results(tmp_path):
    from genops_assets.cli.optimize import record_bench

    results = tmp_path / "bench" / "results.json"
    results.parent.mkdir()
    results.write_text(json.dumps({"serving": {"ratios": {"x": 1}}}))
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"q4_k_m": {"levels": {"1": {"tokens_per_s": 70.0}}, "peak_rss_bytes": 5}}))
    record_bench(results, TASK, bench)
    data = json.loads(results.read_text())
    assert data["serving"] == {"ratios": {"x": 1}}  # the rest of make bench's results is kept
    assert data["variants"][TASK]["q4_k_m"]["levels"]["1"]["tokens_per_s"] == 70.0
