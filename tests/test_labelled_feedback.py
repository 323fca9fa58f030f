"""Reviewed live answers become training examples: labels from <home>/feedback/labels/<task>/ join the
task's raw examples, a label naming only a request id takes the question from the feedback store,
and labels that cannot be placed are left out and reported."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest

from genops_assets.defs.datasets.assets import build_raw_examples
from genops_assets.defs.feedback.assets import request_log
from genops_assets.lib.tasks import TaskRef
from resources.feedback_store import DuckDBFeedbackStore
from resources.paths import GenopsHome
from resources.warehouse import DuckDBWarehouse

REPO = Path(__file__).resolve().parents[1]
TASK = TaskRef("support_triage", str(REPO / "tasks"))
raw_task_examples = build_raw_examples(TASK)
OUT = {"category": "technical_issue", "priority": "high", "product": "hub",
       "summary": "Customer reports the hub blinking orange after a move."}


def test_labels_on_a_fresh_warehouse_without_requests(tmp_path):
    labels = tmp_path / "feedback" / "labels" / "support_triage"
    labels.mkdir(parents=True)
    (labels / "a.jsonl").write_text(json.dumps({"request_id": "req-1", "output": OUT}) + "\n")
    res = {"warehouse": DuckDBWarehouse(path=str(tmp_path / "w.duckdb")), "home": GenopsHome(root=str(tmp_path))}
    res["feedback_store"] = DuckDBFeedbackStore(warehouse=res["warehouse"])
    result = dg.materialize([raw_task_examples], resources=res)
    assert result.success
    mat = result.asset_materializations_for_node(TASK.step("raw_task_examples"))[0]
    assert mat.metadata["labelled_feedback_rows"].value == 0


def test_labels_join_the_raw_examples(tmp_path):
    log = tmp_path / "endpoint" / "requests.jsonl"
    log.parent.mkdir(parents=True)
    log.write_text(json.dumps({"ts": 1_790_000_000, "request_id": "req-1", "status": 200, "model": "champion",
                               "prompt_variables": {"message": "the hub blinks orange since I moved house"},
                               "response": "{}"}) + "\n")
    labels = tmp_path / "feedback" / "labels" / "support_triage"
    labels.mkdir(parents=True)
    (labels / "review.jsonl").write_text("\n".join([
        json.dumps({"request_id": "req-1", "output": OUT}),                     # question from the store
        json.dumps({"input": "my hub light is orange and it never connects", "output": OUT}),
        json.dumps({"request_id": "req-unknown", "output": OUT}),               # cannot be placed
        json.dumps({"input": "camera offline", "output": {**OUT, "priority": "whenever"}}),  # not in the schema
    ]) + "\n")
    res = {"warehouse": DuckDBWarehouse(path=str(tmp_path / "w.duckdb")), "home": GenopsHome(root=str(tmp_path))}
    res["feedback_store"] = DuckDBFeedbackStore(warehouse=res["warehouse"])
    assert dg.materialize([request_log], resources=res).success
    result = dg.materialize([raw_task_examples], resources=res)
    assert result.success
    mat = result.asset_materializations_for_node(TASK.step("raw_task_examples"))[0]
    assert mat.metadata["labelled_feedback_rows"].value == 2
    df = res["warehouse"].query_df("select source_file, source_row, input_text, output_json from raw.task_examples "
                                   "where source_file like 'feedback/%' order by source_row")
    assert list(df["input_text"]) == ["the hub blinks orange since I moved house",
                                      "my hub light is orange and it never connects"]
    assert list(df["source_row"]) == [1, 2]
    assert set(df["source_file"]) == {"feedback/labels/support_triage/review.jsonl"}
    assert json.loads(df.loc[0, "output_json"]) == OUT
    files = mat.metadata["files"].value["feedback/labels"]
    assert files["issues"] == 1 and files["missing"] == 1


def test_a_label_is_judged_by_the_task_schema_naming_the_field():
    from genops_assets.lib.labels import LabelError, validate_label
    from genops_assets.lib.tasks import load_task

    spec = load_task(REPO / "tasks", "support_triage")
    text = "the hub blinks orange since I moved house"
    assert validate_label({"input": text, "output": OUT}, spec)[2] == OUT
    for output, needle in [({**OUT, "priority": "asap"}, "output field 'priority': 'asap' is not one of"),
                           ({**OUT, "summary": "Short"}, "output field 'summary': 'Short' is too short"),
                           ({**OUT, "product": None}, "output field 'product': None is not of type 'string'")]:
        with pytest.raises(LabelError, match=needle):
            validate_label({"input": text, "output": output}, spec)
