"""Model and dataset cards: rendered content, and the model_card asset logging them to the
candidate's MLflow training run with the card's digest on the version."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import duckdb
import pandas as pd
import pytest

from genops_assets.cli.demo import _metadata_values, card_line
from genops_assets.lib.cards import MartSummary, dataset_card, model_card, summarize_mart
from genops_assets.lib.tasks import TaskRef, load_task

REPO = Path(__file__).resolve().parents[1]
TASK = "support_triage"
SAFETY = {
    "candidate": {"model_name": "genops-support_triage", "version": "2"}, "champion": None,
    "suite": {"version": "rt-3", "sha256": "ab" * 32, "cases": 60}, "guardrails_version": "0123456789ab",
    "by_class": {"jailbreak": {"cases": 10, "attack_success_rate": 0.1, "ci": [0.02, 0.4]},
                 "encoded": {"cases": 10, "attack_success_rate": 0.0, "ci": [0.0, 0.28]}},
    "harmful_refusal_rate": 0.9, "over_blocking_rate": 0.02, "guardrail_latency_ms": {"p50": 3.2, "p95": 7.9},
    "gate": {"passed": True, "reason": "no class regressed"}, "mlflow_run_id": "s1",
}


def adapter(version: str = "2", **extra) -> dict:
    return {"model_name": "genops-support_triage", "version": version, "version_key": "vk" * 8,
            "adapter_dir": "/x", "adapter_digest": "ad" * 32,
            "adapter_files": {"adapter_model.safetensors": "f1" * 32, "adapter_config.json": "f2" * 32},
            "run_id": "run-1", "base_model_digest": "bb" * 32, "base_model_path": "/m",
            "dataset_digests": {"train": "tt" * 32, "validation": "vv" * 32},
            "prompt": {"name": "support_triage", "version": 3, "digest": "pp" * 8}, "steps": 64,
            "final_train_loss": 0.5, "final_eval_loss": None, **extra}


def eval_report(version: str = "2") -> dict:
    return {"candidate": {"version": version, "golden_examples": 104,
                          "metrics": {"mean_field_exact_match": 0.81, "valid_json_rate": 1.0},
                          "intervals": {"mean_field_exact_match": {"estimate": 0.81, "low": 0.74, "high": 0.87,
                                                                   "level": 0.95}}},
            "base": {"metrics": {"mean_field_exact_match": 0.42, "valid_json_rate": 0.9}},
            "champion": {"version": "1", "metrics": {"mean_field_exact_match": 0.78, "valid_json_rate": 1.0}},
            "previous_champion": None,
            "gate": {"passed": True, "primary_metric": "mean_field_exact_match", "candidate": 0.81, "baseline": 0.78,
                     "baseline_name": "champion v1", "margin": 0.0, "reason": "beats the champion",
                     "improvement_low": 0.01, "improvement_high": 0.05},
            "mlflow_run_id": "eval-run"}


BASE = {"name": "SmolLM2-135M-Instruct", "folder_digest": "bb" * 32, "path": "/m"}


def test_model_card_content_with_and_without_a_safety_report():
    spec = load_task(REPO / "tasks", TASK)
    golden = MartSummary("golden_eval_dataset", "t.golden", 104, "gg" * 32, origin="golden split")
    pairs = MartSummary("preference_pairs", "t.pairs", None, None, origin="ratings")
    card = model_card(spec=spec, tuned_adapter=adapter(), base_model=BASE, eval_report=eval_report(),
                      training_params={"rank": "8", "learning_rate": "0.0002"}, data=[golden, pairs], safety=SAFETY)
    assert card.startswith("# Model card: genops-support_triage v2")
    for expected in ("| Base model digest | `" + "bb" * 32 + "` |", "| `adapter_model.safetensors` | `" + "f1" * 32,
                     "| `learning_rate` | 0.0002 |", "| golden_eval_dataset | `t.golden` | 104 |",
                     "| preference_pairs | `t.pairs` | not built |",
                     "| mean_field_exact_match | 0.810 | [0.740, 0.870] | 0.780 |", "**Promotion gate: passed**",
                     "| jailbreak | 10 | 0.100 | [0.020, 0.400] |", "Refusal rate on harmful requests: 0.900",
                     "Over-blocking rate on the golden set: 0.020", "guardrails version `0123456789ab`",
                     "p50 3.2 ms, p95 7.9 ms", "Triage inbound support messages", "Names and street addresses are "
                     "not detected", "Marts not built when the card was written: preference_pairs",
                     "Compared with the champion at evaluation time: v1", "SFT (LoRA), 64 steps"):
        assert expected in card, expected
    assert "DPO" not in card and "parent version" not in card

    dpo = model_card(spec=spec, tuned_adapter=adapter("3", tuning="dpo", parent_version="2"), base_model=BASE,
                     eval_report=eval_report("3"), training_params={}, data=[golden], safety=None)
    assert "tuned by DPO from the parent version **v2**" in dpo and "DPO (preference tuning)" in dpo
    assert "No safety report for this version: not measured." in dpo and "not measured for this version" in dpo
    # Same inputs, same card (no timestamps): its digest identifies it.
    assert dpo == model_card(spec=spec, tuned_adapter=adapter("3", tuning="dpo", parent_version="2"),
                             base_model=BASE, eval_report=eval_report("3"), training_params={}, data=[golden])
    with pytest.raises(ValueError, match="eval_report is for v2, tuned_adapter is v3"):
        model_card(spec=spec, tuned_adapter=adapter("3"), base_model=BASE, eval_report=eval_report("2"),
                   training_params={}, data=[])


def test_dataset_card_content():
    df = pd.DataFrame({"example_id": ["a", "b", "c"], "split": ["train", "train", "validation"]})
    mart = summarize_mart("sft_dataset", "support_triage.sft_dataset", df, origin="train split of the examples",
                          sources={"examples.jsonl": "ee" * 32}, pii_findings=[])
    card = dataset_card(mart, TASK)
    for expected in ("# Dataset card: support_triage / sft_dataset", "| Rows | 3 |", "| train | 2 |",
                     "| validation | 1 |", "| `examples.jsonl` | `" + "ee" * 32 + "` |", "No PII found",
                     "| Licence | not declared"):
        assert expected in card, expected
    assert mart.digest == summarize_mart("x", "y", df.copy(), origin="o").digest
    assert mart.digest != summarize_mart("x", "y", df.iloc[:2], origin="o").digest
    dirty = MartSummary("preference_pairs", "t.p", 2, "d", pii_findings=[
        {"row": "p2", "column": "chosen_json", "entity": "EMAIL_ADDRESS"}])
    assert "| p2 | chosen_json | EMAIL_ADDRESS |" in dataset_card(dirty, TASK)


def test_model_card_asset_logs_the_cards_to_the_training_run(tmp_path):
    from genops_assets.defs.governance.assets import CARD_TAG, build_governance_assets
    from resources import build_resources
    from resources.warehouse import mart_schema

    res = build_resources(home=tmp_path / "home")
    tracking = res["mlflow"]
    run_id = tracking.start_run(f"genops/{TASK}", "sft", {})
    tracking.log_params(run_id, {"rank": 8, "learning_rate": 0.0002})
    tracking.end_run(run_id)
    adapter_dir = tmp_path / "adapter"
    adapter_dir.mkdir()
    (adapter_dir / "adapter_config.json").write_text("{}")
    tracking.register("genops-support_triage", tracking.artifact_uri(run_id), run_id, {})

    con = duckdb.connect(res["warehouse"].path)
    schema = mart_schema(TASK)
    con.execute(f"create schema {schema}")
    con.execute(f"create table {schema}.golden_eval_dataset (example_id varchar, input_text varchar, "
                "output_json varchar)")
    con.execute(f"insert into {schema}.golden_eval_dataset values ('g1', 'my thermostat is offline', '{{}}'), "
                "('g2', 'reach me at ana@example.org', '{}')")
    con.close()

    task = TaskRef(TASK, str(REPO / "tasks"))

    @dg.asset(key=[TASK, "eval_report"])
    def eval_stand_in() -> dict:
        return eval_report("1")

    @dg.asset(key=[TASK, "tuned_adapter"])
    def adapter_stand_in() -> dict:
        return adapter("1", run_id=run_id)

    @dg.asset(key="base_model")
    def base_stand_in() -> dict:
        return BASE

    @dg.asset(key=[TASK, "safety_report"])
    def safety_stand_in() -> dict:
        return {**SAFETY, "candidate": {"model_name": "genops-support_triage", "version": "1"}}

    keys = {dg.AssetKey([TASK, n]) for n in ("eval_report", "tuned_adapter", "safety_report")}
    [card_asset] = build_governance_assets(task, keys)
    assert [a.key for a in build_governance_assets(task, keys - {dg.AssetKey([TASK, "tuned_adapter"])})] == []
    result = dg.materialize([eval_stand_in, adapter_stand_in, base_stand_in, safety_stand_in, card_asset],
                            resources={k: res[k] for k in ("mlflow", "warehouse", "home")})
    assert result.success
    value = result.output_for_node("support_triage__model_card")
    assert value["safety_report"] is True and value["pii_findings"]["golden_eval_dataset"] == 1
    assert value["pii_findings"]["preference_pairs"] is None  # not built

    client = tracking.client()
    names = {a.path for a in client.list_artifacts(run_id, "cards")} | {
        a.path for a in client.list_artifacts(run_id, "cards/datasets")}
    assert {"cards/model_card.md", "cards/datasets/golden_eval_dataset.md", "cards/datasets/sft_dataset.md",
            "cards/datasets/few_shot_examples.md", "cards/datasets/preference_pairs.md"} <= names
    local = Path(client.download_artifacts(run_id, "cards", str(tmp_path / "dl")))
    card = (local / "model_card.md").read_text()
    assert "| jailbreak | 10 | 0.100 |" in card and "| `rank` | 8 |" in card
    from genops_assets.lib.hashing import sha256_text

    assert tracking.get_version("genops-support_triage", "1").tags[CARD_TAG] == sha256_text(card) == value["sha256"]
    golden = (local / "datasets" / "golden_eval_dataset.md").read_text()
    assert "| g2 | input_text | EMAIL_ADDRESS |" in golden and "ana@example.org" not in golden
    assert "| Rows | 2 |" in golden and "| `examples.jsonl` |" in golden
    meta = result.asset_materializations_for_node("support_triage__model_card")[0].metadata
    assert meta["model_card_sha256"].value == value["sha256"] and meta["safety_report_included"].value is True
    line = card_line(_metadata_values(result.asset_materializations_for_node("support_triage__model_card")[0]))
    cards = len(value["dataset_cards"])
    assert f"model_card.md and {cards} dataset cards (MLflow run {run_id}, sha256 {value['sha256'][:12]})" in line
    assert json.loads(json.dumps(value))  # the value is plain data
