"""Serving an optimized variant: the one ``optimization.deploy`` names (or the fastest passing
one) as `challenger`, parity against its own offline answers, promotion on the variants'
registered model, then as `champion`, answered through the openai client."""

from __future__ import annotations

import time
from collections.abc import Mapping

import dagster as dg

from genops_assets.defs.deployment.assets import DeployConfig, endpoint_prompt, request_for, require_parity
from genops_assets.lib.audit import AuditLog, markdown_table
from genops_assets.lib.optimization_report import PASSED, fastest_passing
from genops_assets.lib.tasks import DEPLOY_FASTEST, DEPLOY_NONE, TaskRef
from genops_assets.serving.protocol import CHALLENGER, CHAMPION, served_name
from resources.endpoint import ServingBackend
from resources.paths import GenopsHome
from resources.tracking import MlflowTracking

AUDIT_ROWS = 10
# Variants an endpoint route can serve: GGUF files through llama.cpp (a safetensors variant
# would need a server of its own on that folder as base).
DEPLOYABLE_ENGINES = ("llamacpp",)


def choose_variant(report: Mapping, deploy: str) -> dict | None:
    """The row ``deploy`` selects (None for ``none``); a failed or unknown variant raises
    ``dg.Failure`` naming it and why: a failed variant is never deployed."""
    if deploy == DEPLOY_NONE:
        return None
    rows = {r["variant"]: r for r in report["rows"]}
    if deploy == DEPLOY_FASTEST:
        deployable = [n for n, r in rows.items() if r["engine"] in DEPLOYABLE_ENGINES]
        name = fastest_passing(report["rows"], deployable)
        if name is None:
            raise dg.Failure(f"not deploying: no passing variant with a measured single-stream speed among the "
                             f"deployable ones {deployable or '(none)'}")
    else:
        name = deploy
    if name not in rows or name == report["baseline"]:
        raise dg.Failure(f"not deploying '{name}': not a variant of the optimization report ({sorted(rows)})")
    row = rows[name]
    if row["status"] != PASSED:
        raise dg.Failure(f"not deploying '{name}': it failed the optimization report ({row['reason']})")
    if row["engine"] not in DEPLOYABLE_ENGINES:
        raise dg.Failure(f"not deploying '{name}': engine '{row['engine']}' has no endpoint route "
                         f"(deployable engines: {list(DEPLOYABLE_ENGINES)})")
    return row


def deployed_variant(
    context: dg.AssetExecutionContext,
    config: DeployConfig,
    optimization_report: dict,
    base_model: dict,
    task: TaskRef,
    mlflow: MlflowTracking,
    endpoint: ServingBackend,
    home: GenopsHome,
) -> dg.Output[dict]:
    """The variant ``optimization.deploy`` names (``fastest``: the fastest passing GGUF variant)
    served by the endpoint: as `challenger` first, its greedy answers on golden examples must
    equal its own offline evaluation's, then alias `champion` on ``genops-<task>-variants``
    moves (audit log: promote, deploy) and it is served as `champion`, checked by one answer
    through the openai client. A failed variant is never deployed; ``none`` deploys nothing.
    Cost: a llama.cpp server start (seconds) and a few answers."""
    from openai import OpenAI

    spec = task.load()
    row = choose_variant(optimization_report, spec.optimization.deploy)
    if row is None:
        context.log.info("optimization.deploy is 'none': nothing deployed")
        return dg.Output({"deployed": None}, metadata={"deployed": "none"})
    name, version = row["variant"], str(row["version"])
    registry = optimization_report["registered_model"]
    prompt_ref = mlflow.resolve_prompt(spec)
    endpoint.publish_prompt(spec.name, endpoint_prompt(spec, prompt_ref))
    endpoint.publish_guardrails(spec.name, spec.guardrails.canonical_json())
    path = mlflow.fetch_variant(home.registry_cache, spec.name, version)
    # source_version: the adapter it was made from, so the endpoint's registry watcher keeps it
    # serving while that adapter is the champion and replaces it when a newer one is promoted.
    variant = {**optimization_report["variants"][name], "path": str(path), "version": version,
               "source_version": str(optimization_report["candidate_version"])}
    challenger, champion = served_name(spec.name, CHALLENGER), served_name(spec.name, CHAMPION)
    staged = endpoint.deploy(base_model["path"], spec.name, CHALLENGER, str(path), version, variant=variant)
    context.log.info(f"endpoint {staged.action}: {staged.url} serving {name} v{version} as {challenger}")
    client = OpenAI(base_url=staged.url, api_key=endpoint.client_key(), timeout=300, max_retries=0)

    parity = require_parity(context, client, challenger,
                            optimization_report["parity_examples"][name][: config.parity_examples], spec, prompt_ref,
                            endpoint, f"{name} v{version}")

    previous = mlflow.promote(registry, version, {"genops.promoted_by_run": context.run.run_id,
                                                  "genops.variant": name})
    promoted = previous is None or previous.version != version
    audit = AuditLog(home.audit_path)
    actor, previous_version = f"dagster-run:{context.run.run_id}", previous.version if previous else None
    if promoted:
        audit.record("promote", registry, version, previous_version, actor=actor, run_id=context.run.run_id,
                     reason=f"variant {name} passed the optimization report: {row['reason']}")
    outcome = endpoint.deploy(base_model["path"], spec.name, CHAMPION, str(path), version, variant=variant)
    started = time.monotonic()
    first = optimization_report["parity_examples"][name][0]
    reply = client.chat.completions.create(model=champion, temperature=0.0,
                                           **request_for(first, spec, prompt_ref, endpoint.renders_prompts))
    latency = time.monotonic() - started
    answer = reply.choices[0].message.content or ""
    engine = (reply.model_extra or {}).get("genops", {}).get("engine")
    if promoted or outcome.action != "unchanged":
        audit.record("deploy", registry, version, previous_version, actor=actor, run_id=context.run.run_id,
                     reason=f"endpoint {outcome.action}: {outcome.url} serving {name} v{version} as {champion}",
                     details={"url": outcome.url, "variant": name, "parity_checked": parity["checked"],
                              "parity_matched": parity["matched"]})
    value = {"deployed": name, "version": version, "registered_model": registry, "url": outcome.url,
             "model": champion, "action": outcome.action, "previous_champion": previous_version,
             "verified_answer": answer, "engine": engine, "parity": parity}
    return dg.Output(value, metadata={
        "variant": name, "version": version, "promoted": promoted, "action": outcome.action,
        "url": dg.MetadataValue.url(outcome.url.removesuffix("/v1") + "/health"),
        "engine": str(engine), "verification_answer": answer, "verification_latency_s": round(latency, 2),
        "parity_checked": parity["checked"], "parity_matched": parity["matched"],
        "audit_log": dg.MetadataValue.md(markdown_table(audit.entries(registry, limit=AUDIT_ROWS))),
    })
