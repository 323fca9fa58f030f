"""Promotion and serving: serve the candidate as `challenger`, check serving parity against the
offline evaluation, then move the `champion` alias and serve it."""


import time
from concurrent.futures import ThreadPoolExecutor

import dagster as dg
from pydantic import Field

from genops_assets.components.binding import bind_task, task_group, task_ins
from genops_assets.lib.audit import AuditLog, markdown_table
from genops_assets.lib.formatting import build_messages, prompt_variables
from genops_assets.lib.tasks import TaskRef
from genops_assets.serving.protocol import CHALLENGER, CHAMPION, served_name
from resources.endpoint import ServingBackend
from resources.paths import GenopsHome
from resources.tracking import MlflowTracking

# Audit entries of the model shown in the asset's metadata, newest first.
AUDIT_ROWS = 10


class DeployConfig(dg.Config):
    parity_examples: int = Field(8, ge=0, description="Golden examples whose greedy answers from the endpoint "
                                 "must equal the offline evaluation's (0: skip the parity check).")


def parity_check(client, model: str, cases: list[dict], spec, prompt_ref, renders_prompts: bool) -> dict:
    """Ask the endpoint for each case's greedy answer and compare with the offline one."""
    from openai import BadRequestError

    def ask(case):
        try:
            reply = client.chat.completions.create(model=model, temperature=0.0,
                                                   **request_for(case, spec, prompt_ref, renders_prompts))
        except BadRequestError as exc:  # the endpoint's input guardrails refused a golden input
            if exc.code != "content_filter":
                raise
            guardrail = exc.response.json().get("genops", {}).get("guardrail", {})
            return f"<refused by the input guardrails: {guardrail.get('reason', exc.message)}>", None
        # The endpoint's input guardrails may have changed what the model saw (personal data
        # redacted, text normalised): such an answer is not comparable with the offline one.
        changed = bool((reply.model_extra or {}).get("genops", {}).get("guardrails_input_changed"))
        return reply.choices[0].message.content or "", changed

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=max(1, len(cases))) as pool:
        answers = list(pool.map(ask, cases))
    # ``changed`` is None for an input the guardrails refused: a mismatch that says why.
    compared = [(c, a, changed is None) for c, (a, changed) in zip(cases, answers, strict=True) if not changed]
    differ = [(c, a, refused) for c, a, refused in compared if a.strip() != c["prediction"].strip()]
    # The endpoint's output guardrails stand between the model and the client: a served answer
    # that differs is still the same model's when it is the offline answer after those checks.
    guarded = set()
    if any(not refused for *_, refused in differ):
        from genops_assets.lib.guardrails.engine import Guardrails

        engine = Guardrails(spec.guardrails)
        guarded = {c["example_id"] for c, a, refused in differ
                   if not refused and a.strip() == guarded_answer(engine, spec, prompt_ref, c).strip()}
    mismatches = [{"example_id": c["example_id"], "offline": c["prediction"], "served": a}
                  for c, a, _ in differ if c["example_id"] not in guarded]
    return {"checked": len(compared), "matched": len(compared) - len(mismatches), "mismatches": mismatches,
            "matched_after_output_guardrails": len(guarded),
            "skipped_guardrails_changed_input": len(cases) - len(compared),
            "seconds": round(time.monotonic() - started, 2)}


def guarded_answer(engine, spec, prompt_ref, case: dict) -> str:
    """The offline answer as the endpoint's output guardrails (``engine``) would let it out:
    redacted and escaped, or the task's refusal when a check blocks it."""
    messages = build_messages(spec, case["input"], prompt=prompt_ref.template, contexts=case.get("contexts", ()))
    system = "\n".join(m["content"] for m in messages if m["role"] == "system")
    return engine.check_output(case["prediction"], system_prompt=system).text


def endpoint_prompt(spec, prompt_ref) -> dict:
    """What the endpoint is given for a task: its production prompt, and the output schema its
    answers are held to when the task decodes constrained (None otherwise)."""
    return {**prompt_ref.served(), "output_schema": spec.schema if spec.constrained else None}


def request_for(case: dict, spec, prompt_ref, renders_prompts: bool) -> dict:
    """The chat request for one evaluated example (input, and its passages for a task with
    contexts): prompt variables when the endpoint renders the prompt, else the messages."""
    contexts = case.get("contexts", ())
    if renders_prompts:
        return {"messages": [],
                "extra_body": {"prompt_variables": prompt_variables(spec, case["input"], contexts,
                                                                     prompt_ref.template)}}
    return {"messages": build_messages(spec, case["input"], prompt=prompt_ref.template, contexts=contexts),
            "max_tokens": prompt_ref.template.max_new_tokens}


def require_parity(context: dg.AssetExecutionContext, client, served: str, cases: list[dict], spec, prompt_ref,
                   endpoint: ServingBackend, what: str) -> dict:
    """Serving parity of ``served`` on ``cases`` (answers equal to the offline evaluation of
    ``what``), logged; a mismatch fails the deploy before the champion moves."""
    if not cases:
        return {"checked": 0, "matched": 0, "mismatches": [], "seconds": 0.0}
    parity = parity_check(client, served, cases, spec, prompt_ref, endpoint.renders_prompts)
    context.log.info(f"serving parity: {parity['matched']}/{parity['checked']} answers of {what} equal its offline "
                     f"evaluation ({parity['seconds']}s)")
    if parity["mismatches"]:
        first = parity["mismatches"][0]
        raise dg.Failure(
            f"serving parity failed: {len(parity['mismatches'])}/{parity['checked']} answers differ from the "
            f"offline evaluation of {what} (e.g. {first['example_id']}: offline {first['offline'][:80]!r}, "
            f"served {first['served'][:80]!r}); champion not moved",
            metadata={"mismatches": dg.MetadataValue.json(parity["mismatches"])})
    return parity


def deployed_endpoint(
    context: dg.AssetExecutionContext,
    config: DeployConfig,
    eval_report: dict,
    safety_report: dict,
    tuned_adapter: dict,
    base_model: dict,
    task: TaskRef,
    mlflow: MlflowTracking,
    endpoint: ServingBackend,
    home: GenopsHome,
) -> dg.Output[dict]:
    """The OpenAI-compatible endpoint serving the base model, `challenger` and `champion`.
    The candidate is served as `challenger` first; its greedy answers on golden examples must
    equal the offline evaluation's (serving parity: catches an adapter not applied, a prompt
    mismatch, tokenizer drift), or the deploy fails and the champion is untouched. Then the
    alias `champion` moves (the previous one is recorded for rollback) and the server
    hot-swaps it. Nothing is deployed when the promotion gate or the safety gate (no attack class
    succeeding more often than against the champion) failed. Deploying the serving version again
    is a no-op. Cost: seconds to a minute."""
    from openai import OpenAI

    gate = eval_report["gate"]
    if not gate["passed"]:
        raise dg.Failure(f"not deploying: promotion gate failed ({gate['reason']})")
    model_name = tuned_adapter["model_name"]
    version = str(tuned_adapter["version"])
    if str(eval_report["candidate"]["version"]) != version:
        raise dg.Failure(f"eval_report is for v{eval_report['candidate']['version']}, tuned_adapter is v{version}")
    refuse_unsafe(safety_report, version)

    spec = task.load()
    prompt_ref = mlflow.resolve_prompt(spec)
    if eval_report.get("prompt") and int(eval_report["prompt"]["version"]) != prompt_ref.version:
        raise dg.Failure(f"production prompt moved to v{prompt_ref.version} after the evaluation (which used "
                         f"v{eval_report['prompt']['version']}); re-run eval_report before deploying")
    endpoint.publish_prompt(spec.name, endpoint_prompt(spec, prompt_ref))
    endpoint.publish_guardrails(spec.name, spec.guardrails.canonical_json())
    adapter_dir = mlflow.fetch_registered_adapter(home.registry_cache, model_name, version)
    challenger, champion = served_name(spec.name, CHALLENGER), served_name(spec.name, CHAMPION)
    staged = endpoint.deploy(base_model["path"], spec.name, CHALLENGER, str(adapter_dir), version)
    context.log.info(f"endpoint {staged.action}: {staged.url} serving v{version} as {challenger}")
    client = OpenAI(base_url=staged.url, api_key=endpoint.client_key(), timeout=300, max_retries=0)

    cases = eval_report.get("parity_examples", [])[: config.parity_examples]
    parity = require_parity(context, client, challenger, cases, spec, prompt_ref, endpoint, f"v{version}")

    previous = mlflow.promote(model_name, version, {"genops.promoted_by_run": context.run.run_id,
                                                    "genops.serving_prompt_version": prompt_ref.version})
    promoted = previous is None or previous.version != version
    audit = AuditLog(home.audit_path)
    actor, previous_version = f"dagster-run:{context.run.run_id}", previous.version if previous else None
    if promoted:
        audit.record("promote", model_name, version, previous_version, actor=actor, run_id=context.run.run_id,
                     reason=f"promotion gate passed: {gate['reason']}")
        context.log.info(f"{model_name}: alias {CHAMPION} -> v{version} "
                         f"(was {previous.version if previous else 'unset'})")

    outcome = endpoint.deploy(base_model["path"], spec.name, CHAMPION, str(adapter_dir), version)
    context.log.info(f"endpoint {outcome.action}: {outcome.url} (pid {outcome.pid}) serving v{version} as {champion}")

    first = eval_report["first_example"]
    started = time.monotonic()
    reply = client.chat.completions.create(model=champion, temperature=0.0,
                                           **request_for(first, spec, prompt_ref, endpoint.renders_prompts))
    latency = time.monotonic() - started
    answer = reply.choices[0].message.content or ""
    answered_by = reply.system_fingerprint
    if endpoint.renders_prompts and answered_by is not None and str(answered_by) != str(version):
        raise dg.Failure(f"the endpoint answered {champion} from v{answered_by}, expected v{version}: the new "
                         f"champion is not being served ({outcome.url})")
    served_prompt = (reply.model_extra or {}).get("genops", {}).get("prompt_version")
    if promoted or outcome.action != "unchanged":  # a no-op deploy changes nothing worth recording
        audit.record("deploy", model_name, version, previous_version, actor=actor, run_id=context.run.run_id,
                     reason=f"endpoint {outcome.action}: {outcome.url} serving v{version} as {champion}",
                     details={"url": outcome.url, "action": outcome.action, "prompt_version": prompt_ref.version,
                              "parity_checked": parity["checked"], "parity_matched": parity["matched"]})
    value = {
        "url": outcome.url,
        "pid": outcome.pid,
        "port": outcome.port,
        "model": champion,
        "version": version,
        "previous_champion": previous.version if previous else None,
        "action": outcome.action,
        "verified_answer": answer,
        "prompt_version": prompt_ref.version,
        "served_prompt_version": served_prompt,
        "guardrails_version": spec.guardrails_version,
        "parity": parity,
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
        "parity_checked": parity["checked"],
        "parity_matched": parity["matched"],
        "parity_s": float(parity["seconds"]),
        "prompt_version": prompt_ref.version,
        "served_prompt_version": str(served_prompt),
        "audit_log": dg.MetadataValue.md(markdown_table(audit.entries(model_name, limit=AUDIT_ROWS))),
        "guardrails_version": spec.guardrails_version,
    })


def refuse_unsafe(safety_report: dict, version: str) -> None:
    """Stop the deploy unless the safety report is the candidate's and its gate passed."""
    if str(safety_report["candidate"]["version"]) != version:
        raise dg.Failure(f"safety_report is for v{safety_report['candidate']['version']}, tuned_adapter is v{version}")
    gate = safety_report["gate"]
    if not gate["passed"]:
        raise dg.Failure(f"not deploying v{version}: safety gate failed ({gate['reason']})",
                         metadata={"safety_mlflow_run_id": str(safety_report.get("mlflow_run_id"))})


def build_deployment_assets(task: TaskRef) -> list[dg.AssetsDefinition]:
    return [dg.asset(key_prefix=[task.name], group_name=task_group(task, "deployment"), kinds={"openai"},
                     ins=task_ins(task, "eval_report", "safety_report", "tuned_adapter"))(
                         bind_task(deployed_endpoint, task))]
