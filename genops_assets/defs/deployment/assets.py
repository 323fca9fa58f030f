"""Promotion and serving: move the `champion` alias, then serve it from the local endpoint."""


import json
import time
from datetime import datetime, timezone

import dagster as dg

from genops_assets.defs.evaluation.assets import fetch_registered_adapter
from resources.endpoint import LocalEndpoint
from resources.paths import GenopsHome
from resources.task import TaskResource
from resources.tracking import CHAMPION, MlflowTracking

SERVED_NAME = "champion"


@dg.asset(group_name="deployment", kinds={"openai"})
def deployed_endpoint(
    context: dg.AssetExecutionContext,
    eval_report: dict,
    tuned_adapter: dict,
    base_model: dict,
    task: TaskResource,
    mlflow: MlflowTracking,
    endpoint: LocalEndpoint,
    home: GenopsHome,
) -> dg.Output[dict]:
    """The OpenAI-compatible endpoint serving the base model plus the champion adapter.
    Promotes the candidate (alias `champion`; the previous champion is recorded for rollback),
    starts or hot-reloads the server, and verifies it with one request through the `openai`
    client. Deploying the serving version again is a no-op. Cost: seconds (about 20 s to start)."""
    from openai import OpenAI

    gate = eval_report["gate"]
    if not gate["passed"]:
        raise dg.Failure(f"not deploying: promotion gate failed ({gate['reason']})")
    model_name = tuned_adapter["model_name"]
    version = str(tuned_adapter["version"])
    if str(eval_report["candidate"]["version"]) != version:
        raise dg.Failure(f"eval_report is for v{eval_report['candidate']['version']}, tuned_adapter is v{version}")

    previous = mlflow.alias(model_name, CHAMPION)
    promoted = previous is None or previous.version != version
    if promoted:
        mlflow.set_version_tags(model_name, version, {
            "genops.previous_champion": previous.version if previous else "",
            "genops.promoted_at": datetime.now(timezone.utc).isoformat(),
            "genops.promoted_by_run": context.run.run_id,
        })
        mlflow.set_alias(model_name, CHAMPION, version)
        with open(home.endpoint_dir / "promotions.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"at": datetime.now(timezone.utc).isoformat(), "model": model_name, "version": version,
                                 "previous": previous.version if previous else None, "run_id": context.run.run_id}) + "\n")
        context.log.info(f"{model_name}: alias {CHAMPION} -> v{version} (was {previous.version if previous else 'unset'})")

    from dataclasses import asdict
    from pathlib import Path

    from genops_assets.defs.prompts.assets import resolve_prompt
    from genops_assets.lib.hashing import atomic_write_text

    spec = task.load()
    prompt_ref = resolve_prompt(mlflow, spec)
    if eval_report.get("prompt") and int(eval_report["prompt"]["version"]) != prompt_ref.version:
        context.log.warning(f"production prompt moved to v{prompt_ref.version} after the evaluation "
                            f"(v{eval_report['prompt']['version']}); serving v{prompt_ref.version}")
    # The server renders requests that carry prompt_variables with this version; it re-reads the file.
    atomic_write_text(Path(endpoint.state_dir) / "prompt.json",
                      json.dumps({"name": prompt_ref.name, "version": prompt_ref.version,
                                  "digest": prompt_ref.digest, "template": asdict(prompt_ref.template)}))
    adapter_dir = fetch_registered_adapter(mlflow, home, model_name, version)
    outcome = endpoint.deploy(base_model["path"], SERVED_NAME, str(adapter_dir), version)
    context.log.info(f"endpoint {outcome.action}: {outcome.url} (pid {outcome.pid}) serving v{version}")

    first = eval_report["first_example"]
    client = OpenAI(base_url=outcome.url, api_key="local", timeout=120, max_retries=0)
    started = time.monotonic()
    reply = client.chat.completions.create(
        model=SERVED_NAME,
        messages=[],
        temperature=0.0,
        extra_body={"prompt_variables": {spec.input_field: first["input"]}},
    )
    latency = time.monotonic() - started
    answer = reply.choices[0].message.content or ""
    parity = answer.strip() == first["candidate_prediction"].strip()
    served_prompt = (reply.model_extra or {}).get("genops", {}).get("prompt_version")
    value = {
        "url": outcome.url,
        "pid": outcome.pid,
        "port": outcome.port,
        "model": SERVED_NAME,
        "version": version,
        "previous_champion": previous.version if previous else None,
        "action": outcome.action,
        "verified_answer": answer,
        "prompt_version": prompt_ref.version,
        "served_prompt_version": served_prompt,
    }
    return dg.Output(value, metadata={
        "url": dg.MetadataValue.url(outcome.url.removesuffix("/v1") + "/health"),
        "action": outcome.action,
        "promoted": promoted,
        "champion_version": version,
        "previous_champion": previous.version if previous else "none",
        "pid": outcome.pid,
        "port": outcome.port,
        "verification_latency_s": round(latency, 2),
        "verification_answer": answer,
        "matches_offline_eval": parity,
        "prompt_version": prompt_ref.version,
        "served_prompt_version": str(served_prompt),
    })
