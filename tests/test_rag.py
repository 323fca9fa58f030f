"""Tasks whose examples carry retrieved contexts: the `contexts:` setting and the data it
names, the passages in the prompt, and the RAG metrics of an evaluation (non-LLM
context precision / recall by string similarity; faithfulness and answer relevancy through a scripted judge)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from graph_support import free_port
from judge_standin import StandInJudge, completion

from genops_assets.lib.cache import CallCache
from genops_assets.lib.evaluation import EvalExample, ModelEval, examples_from_frame
from genops_assets.lib.formatting import build_messages, prompt_variables
from genops_assets.lib.judging import BUILTIN_RUBRICS, ChatJudge, load_rubrics
from genops_assets.lib.prompts import PromptError
from genops_assets.lib.rag_metrics import evaluate_rag
from genops_assets.lib.report import metrics_table_md, write_eval_report
from genops_assets.lib.tasks import TaskConfigError, TaskDataError, load_task, read_raw_file

REPO = Path(__file__).resolve().parents[1]
PARIS = "Paris is the capital and largest city of France."
BANANA = "Bananas are yellow when they are ripe."
TIDE = "Tides are caused by the gravity of the moon."


@pytest.fixture()
def tasks_dir(tmp_path: Path) -> Path:
    for name in ("product_qa", "support_triage"):
        shutil.copytree(REPO / "tasks" / name, tmp_path / name, ignore=shutil.ignore_patterns("incoming", "ct_demo"))
    return tmp_path


def _set_contexts(tasks_dir: Path, section: str) -> None:
    cfg = tasks_dir / "product_qa" / "task.yaml"
    text = cfg.read_text()
    start = text.index("contexts:\n")
    end = text.index("label_fields:")
    cfg.write_text(text[:start] + section + "\n" + text[end:])


@pytest.mark.parametrize("section,needle", [
    ("contexts: retrieved_contexts", "contexts: Input should be a valid dictionary"),
    ("contexts: {reference_field: reference_contexts}", "contexts.retrieved_field: Field required"),
    ("contexts: {retrieved_field: question}", "contexts.retrieved_field: 'question' is already the input field"),
    ("contexts: {retrieved_field: answer}",
     "contexts.retrieved_field: 'answer' is already the input field or an output"),
    ("contexts: {retrieved_field: a, reference_field: a}", "both 'a'"),
    ("contexts: {retrieved_field: a, ranking: b}", "contexts.ranking: Extra inputs are not permitted"),
    ("contexts: {retrieved_field: [a, b]}", "contexts.retrieved_field: Input should be a valid string"),
])
def test_bad_contexts_setting_names_the_file_and_key(tasks_dir, section, needle):
    _set_contexts(tasks_dir, section)
    with pytest.raises(TaskConfigError, match=needle) as err:
        load_task(tasks_dir, "product_qa")
    assert "product_qa/task.yaml" in str(err.value)


def test_templates_and_the_contexts_slot(tasks_dir):
    spec = load_task(tasks_dir, "product_qa")
    assert spec.contexts.retrieved == "retrieved_contexts" and spec.contexts.reference == "reference_contexts"
    user = tasks_dir / "product_qa" / "prompts" / "user.txt"
    user.write_text("Question: {question}")
    with pytest.raises(TaskConfigError, match=r"user.txt: the task has retrieved contexts .* \{contexts\}"):
        load_task(tasks_dir, "product_qa")
    # A task without contexts has no {contexts} slot to fill.
    (tasks_dir / "support_triage" / "prompts" / "user.txt").write_text("{contexts}\nMessage: {message}")
    with pytest.raises(TaskConfigError, match=r"unknown template variable\(s\) \['contexts'\]"):
        load_task(tasks_dir, "support_triage")


def test_passages_are_numbered_in_the_prompt_and_required_by_it(tasks_dir):
    spec = load_task(tasks_dir, "product_qa")
    messages = build_messages(spec, "How heavy is it?", contexts=[PARIS, BANANA])
    assert messages[-1]["content"] == (f"Documentation passages:\n[1] {PARIS}\n\n[2] {BANANA}\n\n"
                                       "Question: How heavy is it?")
    # The endpoint renders the same text from the passages as a list.
    assert spec.prompt.render(prompt_variables(spec, "How heavy is it?", [PARIS, BANANA])) == messages
    with pytest.raises(PromptError, match=r"needs the variable\(s\) \['contexts'\]"):
        build_messages(spec, "How heavy is it?")
    with pytest.raises(PromptError, match="'contexts' is an empty list"):
        spec.prompt.render({"question": "How heavy is it?", "contexts": []})


def _write_rows(tasks_dir: Path, rows: list[dict], suffix: str = ".jsonl") -> Path:
    path = tasks_dir / "product_qa" / "incoming" / f"new{suffix}"
    path.parent.mkdir(exist_ok=True)
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        keys = list(rows[0])
        path.write_text(",".join(keys) + "\n" + "".join(",".join(r[k] for k in keys) + "\n" for r in rows))
    return path


GOOD = {"question": "How heavy is the purifier?", "retrieved_contexts": ["It weighs 5.2 kg.", "It is 52 cm tall."],
        "reference_contexts": ["It weighs 5.2 kg."], "answerable": "yes", "answer": "It weighs 5.2 kg."}


@pytest.mark.parametrize("change,needle", [
    ({"retrieved_contexts": None}, "field 'retrieved_contexts' (the retrieved contexts) is missing"),
    ({"retrieved_contexts": "It weighs 5.2 kg."}, "field 'retrieved_contexts' must be a list of strings, got str"),
    ({"retrieved_contexts": []}, "field 'retrieved_contexts' is an empty list"),
    ({"retrieved_contexts": ["It weighs 5.2 kg.", 52]}, "field 'retrieved_contexts' item 2 must be a string, got int"),
    ({"retrieved_contexts": ["  "]}, "field 'retrieved_contexts' item 1 is empty"),
    ({"reference_contexts": []}, "field 'reference_contexts' is an empty list"),
    ({"reference_contexts": {"text": "x"}}, "field 'reference_contexts' must be a list of strings, got dict"),
])
def test_bad_passages_name_the_file_row_and_field(tasks_dir, change, needle):
    spec = load_task(tasks_dir, "product_qa")
    path = _write_rows(tasks_dir, [GOOD, {**GOOD, **change}])
    with pytest.raises(TaskDataError) as err:
        list(read_raw_file(path, spec))
    assert f"{path}, row 2: {needle}" in str(err.value)


def test_reference_passages_are_optional_per_row_and_csv_cells_hold_json(tasks_dir):
    spec = load_task(tasks_dir, "product_qa")
    no_ref = {k: v for k, v in GOOD.items() if k != "reference_contexts"}
    rows = list(read_raw_file(_write_rows(tasks_dir, [GOOD, no_ref, {**GOOD, "reference_contexts": None}]), spec))
    assert rows[0].contexts == ("It weighs 5.2 kg.", "It is 52 cm tall.")
    assert rows[0].reference_contexts == ("It weighs 5.2 kg.",)
    assert rows[1].reference_contexts is None and rows[2].reference_contexts is None

    cell = {"question": "How heavy is the purifier?", "retrieved_contexts": '"[""It weighs 5.2 kg.""]"',
            "answerable": "yes", "answer": "It weighs 5.2 kg."}
    csv_path = _write_rows(tasks_dir, [cell], ".csv")
    [row] = list(read_raw_file(csv_path, spec))
    assert row.contexts == ("It weighs 5.2 kg.",) and row.reference_contexts is None
    csv_path.write_text("question,retrieved_contexts,answerable,answer\nHow heavy is it?,[oops,yes,It weighs 5.2 kg.\n")
    with pytest.raises(TaskDataError, match=rf"{csv_path.name}, row 2: field 'retrieved_contexts' must be a JSON list"):
        list(read_raw_file(csv_path, spec))


def test_demo_task_loads_and_every_example_has_passages():
    spec = load_task(REPO / "tasks", "product_qa")
    rows = [r for p in spec.raw_files() for r in read_raw_file(p, spec)]
    assert len(rows) >= 60 and all(2 <= len(r.contexts) <= 3 for r in rows)
    assert {r.output["answerable"] for r in rows} == {"yes", "no"}
    assert sum(r.reference_contexts is None for r in rows) >= 5, "some questions the documentation does not answer"


def test_support_triage_is_untouched_by_contexts():
    spec = load_task(REPO / "tasks", "support_triage")
    assert spec.contexts is None
    messages = build_messages(spec, "My camera is offline.")
    assert messages[-1] == {"role": "user", "content": "Message: My camera is offline."}
    ex = EvalExample("ex_1", "My camera is offline.", {"category": "technical_issue"})
    assert ex.identity() == ("ex_1", "My camera is offline.", {"category": "technical_issue"})
    # Metrics without intervals read as they always have.
    assert metrics_table_md({"m": {"valid_json_rate": 0.5}}, ["valid_json_rate"]).splitlines()[-1] == \
        "| valid_json_rate | 0.500 |"


# -- the metrics ---------------------------------------------------------------------------

EXAMPLES = [
    # relevant passage first, the one reference retrieved: precision 1, recall 1
    EvalExample("ex_a", "What is the capital of France?", {"answer": "Paris"}, (PARIS, BANANA), (PARIS,)),
    # relevant passage second (AP = 1/2), one of two references retrieved: precision 0.5, recall 0.5
    EvalExample("ex_b", "Where is Paris?", {"answer": "France"}, (BANANA, PARIS), (PARIS, TIDE)),
    # no reference passages: left out of precision / recall, still judged
    EvalExample("ex_c", "What causes tides?", {"answer": "The moon"}, (TIDE,)),
]


def _model(name: str, answers: list[str]) -> ModelEval:
    return ModelEval(name, "digest", {"valid_json_rate": 1.0},
                     [{"example_id": e.example_id, "prediction": a} for e, a in zip(EXAMPLES, answers, strict=True)])


def rag_judge(n, body):
    """groundedness: 4 or 5 with equal probability (expected 4.5 -> 0.875); answer relevancy: 2
    (-> 0.25); an answer containing 'garbage' gets an answer outside the scale."""
    system, user = body["messages"][0]["content"], body["messages"][-1]["content"]
    assert body["guided_choice"] == ["1", "2", "3", "4", "5"]
    if "garbage" in user and "groundedness" in system:
        return 200, completion("maybe")
    if "groundedness" in system:
        return 200, completion("5", {"5": 0.5, "4": 0.5})
    return 200, completion("2", {"2": 1.0})


def test_rag_metrics_by_hand_with_a_scripted_judge_then_from_the_cache(tmp_path):
    rubrics = load_rubrics(BUILTIN_RUBRICS)
    with StandInJudge(rag_judge, free_port()) as judge:
        evals = {"base": _model("base", ["Paris.", "In France.", "The moon."]),
                 "candidate": _model("candidate", ["It is Paris.", "garbage", "The moon's gravity."])}
        client = ChatJudge(judge.url, "judge", cache=CallCache(tmp_path / "calls.sqlite"), max_retries=0)
        rag = evaluate_rag(client, rubrics, EXAMPLES, evals, log=lambda m: None)
        assert judge.calls == 12

        retrieval = rag["retrieval"]
        assert retrieval["context_precision"]["estimate"] == pytest.approx(0.75)  # (1 + 0.5) / 2
        assert retrieval["context_recall"]["estimate"] == pytest.approx(0.75)  # (1 + 0.5) / 2
        assert retrieval["context_precision"]["n"] == 2 and retrieval["context_precision"]["without_reference"] == 1
        # two values, 1 and 0.5: the bootstrap interval spans them
        assert ((retrieval["context_precision"]["low"], retrieval["context_precision"]["high"])
                == pytest.approx((0.5, 1.0)))

        base, cand = evals["base"], evals["candidate"]
        assert base.metrics["faithfulness"] == pytest.approx(0.875) and base.metrics["answer_relevancy"] == 0.25
        assert base.intervals["faithfulness"]["low"] == pytest.approx(0.875)
        # The failed verdict is a recorded failure of its row, not a score.
        assert rag["models"]["candidate"]["faithfulness"]["n"] == 2
        assert rag["models"]["candidate"]["faithfulness"]["failures"] == 1
        assert cand.metrics["faithfulness"] == pytest.approx(0.875)
        [failure] = rag["failures"]["candidate"]
        assert failure["example_id"] == "ex_b" and failure["metric"] == "faithfulness" and "maybe" in failure["error"]
        row_b = cand.predictions[1]
        assert row_b["faithfulness"] is None and "maybe" in row_b["faithfulness_error"]
        assert row_b["answer_relevancy"] == 0.25
        assert rag["rubrics"]["faithfulness"].startswith("groundedness@")

        # Faithfulness is judged against the numbered passages, relevancy against the question alone.
        asked = [b["messages"][-1]["content"] for b in judge.bodies]
        grounded = [a for a in asked if "Reference (may be absent):" in a]
        assert len(grounded) == 6 and sum(f"[1] {BANANA}\n\n[2] {PARIS}" in a for a in grounded) == 2
        assert all(PARIS not in a for a in asked if a not in grounded)

        # Unchanged answers: every verdict from the cache; only the failed call is asked again.
        again = {"base": _model("base", ["Paris.", "In France.", "The moon."]),
                 "candidate": _model("candidate", ["It is Paris.", "garbage", "The moon's gravity."])}
        client2 = ChatJudge(judge.url, "judge", cache=CallCache(tmp_path / "calls.sqlite"), max_retries=0)
        rag2 = evaluate_rag(client2, rubrics, EXAMPLES, again, log=lambda m: None)
        assert judge.calls == 13 and client2.usage.cached == 11
        assert rag2["models"] == rag["models"]


def test_retrieval_only_without_a_judge_and_examples_without_passages_refused():
    evals = {"base": _model("base", ["a", "b", "c"])}
    rag = evaluate_rag(None, {}, EXAMPLES, evals, log=lambda m: None)
    assert rag["models"] == {} and rag["retrieval"]["context_recall"]["estimate"] == pytest.approx(0.75)
    assert "faithfulness" not in evals["base"].metrics
    bare = [*EXAMPLES[:2], EvalExample("ex_z", "q", {})]
    with pytest.raises(ValueError, match=r"have no retrieved contexts, e.g. \['ex_z'\]"):
        evaluate_rag(None, {}, bare, evals)
    with pytest.raises(ValueError, match=r"need the rubric\(s\) \['answer_relevancy'\]"):
        evaluate_rag(object(), {"groundedness": load_rubrics(BUILTIN_RUBRICS)["groundedness"]}, EXAMPLES, evals)


def test_examples_from_a_mart_frame_read_the_passages():
    import pandas as pd

    df = pd.DataFrame({"example_id": ["a", "b"], "input_text": ["q1", "q2"], "output_json": ["{}", "{}"],
                       "contexts_json": [json.dumps([PARIS]), None], "reference_contexts_json": [None, None]})
    a, b = examples_from_frame(df)
    assert a.contexts == (PARIS,) and a.reference_contexts == () and b.contexts == ()
    assert examples_from_frame(df.drop(columns=["contexts_json", "reference_contexts_json"]))[0].contexts == ()


def test_report_table_shows_intervals_and_shared_retrieval_rows(tmp_path):
    models = {"base": {"valid_json_rate": 1.0, "faithfulness": 0.875}, "cand": {"valid_json_rate": 0.5}}
    intervals = {"base": {"faithfulness": {"estimate": 0.875, "low": 0.8, "high": 0.95, "level": 0.95}}}
    shared = {"context_precision": {"estimate": 0.75, "low": 0.5, "high": 1.0, "n": 2}}
    paths = write_eval_report(tmp_path, "t", models, ["valid_json_rate", "faithfulness"], {"passed": True}, [],
                              intervals=intervals, shared=shared)
    md = paths["markdown"].read_text()
    assert "| faithfulness | 0.875 [0.800, 0.950] | - |" in md
    assert "| context_precision | 0.750 [0.500, 1.000] (n=2, every model) |" in md
    page = paths["html"].read_text()
    assert "<td>0.875 [0.800, 0.950]</td>" in page
    assert '<td colspan="2">0.750 [0.500, 1.000] (n=2, every model)</td>' in page


def test_raw_table_holds_the_passages_and_labels_without_them_are_left_out(tmp_path):
    import dagster as dg

    from genops_assets.defs.datasets.assets import build_raw_examples
    from genops_assets.lib.tasks import TaskRef
    from resources.feedback_store import DuckDBFeedbackStore
    from resources.paths import GenopsHome
    from resources.warehouse import DuckDBWarehouse

    task = TaskRef("product_qa", str(REPO / "tasks"))
    raw_task_examples = build_raw_examples(task)

    labels = tmp_path / "feedback" / "labels" / "product_qa"
    labels.mkdir(parents=True)
    (labels / "a.jsonl").write_text(json.dumps({"input": "Can I wash the HEPA filter at all?",
                                                "output": {"answerable": "no", "answer": "Not covered here."}}) + "\n")
    warehouse = DuckDBWarehouse(path=str(tmp_path / "w.duckdb"))
    res = {"warehouse": warehouse, "feedback_store": DuckDBFeedbackStore(warehouse=warehouse),
           "home": GenopsHome(root=str(tmp_path))}
    result = dg.materialize([raw_task_examples], resources=res)
    assert result.success
    mat = result.asset_materializations_for_node(task.step("raw_task_examples"))[0]
    assert mat.metadata["labelled_feedback_rows"].value == 0
    df = warehouse.query_df("select * from raw.task_examples where task = 'product_qa' order by source_row")
    spec = load_task(REPO / "tasks", "product_qa")
    raw = [r for p in spec.raw_files() for r in read_raw_file(p, spec)]
    assert len(df) == len(raw)
    for row, ex in zip(df.itertuples(), raw, strict=True):
        assert tuple(json.loads(row.contexts_json)) == ex.contexts
        assert (ex.reference_contexts is None and row.reference_contexts_json is None) or \
            tuple(json.loads(row.reference_contexts_json)) == ex.reference_contexts
