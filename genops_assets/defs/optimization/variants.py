"""The merged and quantized variants of a task's tuned adapter, each built, load-checked and
registered in ``genops-<task>-variants`` with its lineage (adapter version, parent variant)."""

from __future__ import annotations

import time
from pathlib import Path

import dagster as dg

from genops_assets.components.binding import bind_task, task_group, task_ins
from genops_assets.lib.hashing import sha256_json
from genops_assets.lib.tasks import TaskRef
from genops_assets.lib.variants import BUILT_HERE, DISTILLED, MERGED, Q4_K_M, Q8_0, VariantFiles, describe
from resources.paths import GenopsHome
from resources.tracking import MlflowTracking, variant_model_name

STAGE = "optimization"
CODE_VERSION = "variants-1"
QUANTIZED = (Q8_0, Q4_K_M)
CHECK_PROMPT = "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"


def wanted_variants(task: TaskRef) -> tuple[str, ...]:
    """The variants the task's ``optimization.variants`` setting asks for (all when unset)."""
    optimization = getattr(task.load(), "optimization", None)
    names = getattr(optimization, "variants", None)
    return tuple(names) if names is not None else (*BUILT_HERE, DISTILLED)


def variant_key(name: str, **inputs) -> str:
    """Same variant of the same inputs by the same code -> same key -> no second registration."""
    return sha256_json({"variant": name, "code_version": CODE_VERSION, **inputs})


def variant_dir(home: GenopsHome, task: str, key: str) -> Path:
    return home.models_dir / "variants" / task / key[:16]


def reuse_variant(context, mlflow: MlflowTracking, home: GenopsHome, task: str, key: str, name: str,
                  fmt: str, engine: str, parent: str | None) -> tuple[VariantFiles, str] | None:
    """The variant registered under ``key`` (fetched and digest-checked), or None."""
    existing = mlflow.find_version(variant_model_name(task), key)
    if existing is None:
        return None
    context.log.info(f"{name}: {variant_model_name(task)} v{existing.version} has version key {key[:12]}: reused")
    folder = mlflow.fetch_variant(home.registry_cache, task, existing.version)
    return describe(folder, name, fmt, engine, parent), existing.version


def entry(files: VariantFiles, version: str, key: str, load_check: dict, build_s: float | None) -> dict:
    return {**files.as_dict(), "version": version, "version_key": key, "load_check": load_check,
            "build_s": None if build_s is None else round(build_s, 2)}


def variants_metadata(rows: list[dict]) -> dict:
    out: dict = {"variants": dg.MetadataValue.json(rows)}
    for row in rows:
        n = row["name"]
        out.update({f"{n}_size_mb": round(row["size_bytes"] / 2**20, 1), f"{n}_digest": row["digest"],
                    f"{n}_version": row["version"], f"{n}_load_check": dg.MetadataValue.json(row["load_check"])})
        if row["build_s"] is not None:
            out[f"{n}_build_s"] = row["build_s"]
    return out


def merged_model(
    context: dg.AssetExecutionContext,
    base_model: dict,
    tuned_adapter: dict,
    task: TaskRef,
    mlflow: MlflowTracking,
    home: GenopsHome,
) -> dg.Output[dict]:
    """The tuned adapter merged into the base weights (PEFT merge_and_unload): an fp32
    safetensors folder any engine without LoRA serves, load-checked and registered as variant
    `merged` of the adapter's version. Built when a merged or quantized variant is wanted.
    Cost: seconds for the embedded model (about 0.5 GB on disk)."""
    from genops_assets.lib.variants import check_merged_loads, merge_adapter

    spec = task.load()
    wanted = wanted_variants(task)
    if not set(wanted) & {MERGED, *QUANTIZED}:
        context.log.info(f"optimization.variants {list(wanted)} asks for no merged or quantized variant")
        return dg.Output({"variants": [], "skipped": True}, metadata={"skipped": True})
    source_version = str(tuned_adapter["version"])
    key = variant_key(MERGED, adapter_digest=tuned_adapter["adapter_digest"],
                      base_digest=base_model["folder_digest"])
    tags = {"genops.task": spec.name, "genops.variant": MERGED, "genops.source_version": source_version,
            "genops.dagster_run_id": context.run.run_id}
    with mlflow.run(f"genops/{spec.name}", f"merged-v{source_version}", tags) as run_id:
        t0 = time.perf_counter()
        reused = reuse_variant(context, mlflow, home, spec.name, key, MERGED, "safetensors", "local", None)
        if reused is None:
            files = merge_adapter(base_model["path"], tuned_adapter["adapter_dir"],
                                  variant_dir(home, spec.name, key) / MERGED, log=context.log.info)
        else:
            files = reused[0]
        build_s = None if reused else time.perf_counter() - t0
        load_check = check_merged_loads(files.path, CHECK_PROMPT)
        version = (reused[1] if reused
                   else mlflow.register_variant(spec.name, files, run_id, source_version, key).version)
        mlflow.log_params(run_id, {"variant": MERGED, "source_version": source_version, "version_key": key,
                                   "registered_version": version, "reused": reused is not None})
        mlflow.log_metrics(run_id, {"size_bytes": files.size_bytes, **({"build_s": build_s} if build_s else {})})
    rows = [entry(files, version, key, load_check, build_s)]
    context.log.info(f"merged: {variant_model_name(spec.name)} v{version}, {files.size_bytes / 2**20:.0f} MB")
    return dg.Output({"variants": rows, "source_version": source_version, "mlflow_run_id": run_id},
                     metadata={**variants_metadata(rows), "mlflow_run_id": run_id, "source_version": source_version})


def quantized_models(
    context: dg.AssetExecutionContext,
    merged_model: dict,
    task: TaskRef,
    mlflow: MlflowTracking,
    home: GenopsHome,
) -> dg.Output[dict]:
    """GGUF files of the merged model quantized by llama.cpp (`q8_0`, `q4_k_m`, as
    optimization.variants asks), each loaded by llama.cpp once and registered with its parent
    `merged` version. The f16 GGUF they are quantized from takes the tokenizer and chat
    template from the embedded GGUF. Cost: seconds for the embedded model."""
    from genops_assets.lib.base_model import find_embedded_gguf
    from genops_assets.lib.gguf_export import check_gguf_loads, export_gguf, quantize_gguf

    spec = task.load()
    qtypes = [q for q in QUANTIZED if q in wanted_variants(task)]
    merged = next((v for v in merged_model["variants"] if v["name"] == MERGED), None)
    if not qtypes or merged is None:
        context.log.info(f"no quantized variant to build (asked: {qtypes}, merged built: {merged is not None})")
        return dg.Output({"variants": [], "skipped": True}, metadata={"skipped": True})
    source_version = str(merged_model["source_version"])
    tags = {"genops.task": spec.name, "genops.variant": ",".join(qtypes), "genops.source_version": source_version,
            "genops.dagster_run_id": context.run.run_id}
    rows = []
    with mlflow.run(f"genops/{spec.name}", f"quantize-v{source_version}", tags) as run_id:
        f16 = None
        for qtype in qtypes:
            key = variant_key(qtype, parent_key=merged["version_key"])
            t0 = time.perf_counter()
            reused = reuse_variant(context, mlflow, home, spec.name, key, qtype, "gguf", "llamacpp", MERGED)
            if reused is None:
                if f16 is None:
                    f16 = export_gguf(merged["path"], find_embedded_gguf(),
                                      variant_dir(home, spec.name, merged["version_key"]) / "gguf_f16",
                                      log=context.log.info)
                files = quantize_gguf(f16, variant_dir(home, spec.name, key) / qtype, qtype, log=context.log.info)
            else:
                files = reused[0]
            build_s = None if reused else time.perf_counter() - t0
            load_check = check_gguf_loads(files.path, CHECK_PROMPT)
            version = reused[1] if reused else mlflow.register_variant(
                spec.name, files, run_id, source_version, key, {"genops.parent_version": merged["version"]}).version
            rows.append(entry(files, version, key, load_check, build_s))
            context.log.info(f"{qtype}: {variant_model_name(spec.name)} v{version}, {files.size_bytes / 2**20:.0f} MB")
        mlflow.log_params(run_id, {"variants": ",".join(qtypes), "source_version": source_version,
                                   "parent_version": merged["version"]})
        mlflow.log_metrics(run_id, {f"{r['name']}.{m}": r[m] for r in rows for m in ("size_bytes", "build_s")
                                    if r[m] is not None})
    return dg.Output({"variants": rows, "source_version": source_version, "mlflow_run_id": run_id},
                     metadata={**variants_metadata(rows), "mlflow_run_id": run_id, "source_version": source_version})


def build_variant_assets(task: TaskRef) -> list[dg.AssetsDefinition]:
    """``<task>/merged_model`` and ``<task>/quantized_models``."""
    group = task_group(task, STAGE)
    return [
        dg.asset(key_prefix=[task.name], group_name=group, kinds={"safetensors", "mlflow"},
                 ins=task_ins(task, "tuned_adapter"))(bind_task(merged_model, task)),
        dg.asset(key_prefix=[task.name], group_name=group, kinds={"gguf", "llamacpp", "mlflow"},
                 ins=task_ins(task, "merged_model"))(bind_task(quantized_models, task)),
    ]
