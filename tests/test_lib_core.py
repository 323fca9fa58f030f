"""Unit tests of the pure core: task loading, formatting, parsing, metrics, hashing, the gate."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest

from genops_assets.lib.evaluation import gate_decision
from genops_assets.lib.formatting import build_messages, format_target, parse_prediction
from genops_assets.lib.hashing import atomic_dir, atomic_write_text, sha256_dir, sha256_json
from genops_assets.lib.metrics import ExampleScore, aggregate, rouge_l_f1, score_example, sentence_bleu
from genops_assets.lib.tasks import TaskConfigError, TaskDataError, TaskSettings, load_task, read_raw_file

REPO = Path(__file__).resolve().parents[1]
FIELDS = ("category", "priority", "product", "summary")


@pytest.fixture()
def task_copy(tmp_path: Path) -> Path:
    dst = tmp_path / "tasks" / "support_triage"
    shutil.copytree(REPO / "tasks" / "support_triage", dst, ignore=shutil.ignore_patterns("incoming"))
    return tmp_path / "tasks"


def test_demo_task_loads_with_schema_and_templates():
    spec = load_task(REPO / "tasks", "support_triage")
    assert spec.output_fields == FIELDS
    assert spec.schema["properties"]["priority"]["enum"] == ["low", "medium", "high", "urgent"]
    assert spec.splits.few_shot_label_field == "category" and spec.max_new_tokens == 72
    assert spec.label_fields == ("category", "priority", "product")
    assert "{message}" in spec.user_template


def test_unknown_task_names_the_missing_file(tmp_path):
    with pytest.raises(TaskConfigError, match=r"nope/task\.yaml"):
        load_task(tmp_path, "nope")


def test_unknown_template_variable_is_rejected(task_copy):
    (task_copy / "support_triage" / "prompts" / "user.txt").write_text("{message} {customer_name}")
    with pytest.raises(TaskConfigError, match=r"user.txt: unknown template variable\(s\) \['customer_name'\]"):
        load_task(task_copy, "support_triage")


def test_malformed_yaml_and_bad_setting_name_the_file(task_copy):
    cfg = task_copy / "support_triage" / "task.yaml"
    text = cfg.read_text()
    cfg.write_text(text.replace("label_fields: [category, priority, product]", "label_fields: [category, colour]"))
    with pytest.raises(TaskConfigError, match="field 'colour' is not a property"):
        load_task(task_copy, "support_triage")
    cfg.write_text("name: [unclosed")
    with pytest.raises(TaskConfigError, match=r"task\.yaml: not valid YAML"):
        load_task(task_copy, "support_triage")


@pytest.mark.parametrize(("old", "new", "message"), [
    ("golden_fraction: 0.08", "golden_fraction: 1.5", "splits.golden_fraction: Input should be less than 1"),
    ("input_length: {min: 10, max: 1200}", "input_length: {min: 10}", "input_length.max: Field required"),
    ("input_length: {min: 10, max: 1200}", "input_length: {min: 50, max: 20}",
     "input_length: needs min < max, got 50..20"),
    ("max_new_tokens: 72", "max_new_tokens: lots", "generation.max_new_tokens: Input should be a valid integer"),
    ("label_fields: [", "labels_fields: [", "label_fields: Field required"),
    ("label_fields: [", "labels_fields: [", "labels_fields: Extra inputs are not permitted"),
    ("data_files: [examples.jsonl]", "data_files: [examples.jsonl, more.txt]",
     r"data_files.1: 'more.txt' must be one of \('.jsonl', '.csv'\)"),
    ("data_files: [examples.jsonl]", "data_files: [missing.jsonl]", "data_files.0: 'missing.jsonl' does not exist"),
    ("prompts:\n  system: prompts/system.txt", "prompts:\n  system: prompts/nope.txt",
     "prompts.system: file 'prompts/nope.txt' does not exist"),
])
def test_bad_setting_names_the_file_and_the_setting(task_copy, old, new, message):
    cfg = task_copy / "support_triage" / "task.yaml"
    text = cfg.read_text()
    assert old in text
    cfg.write_text(text.replace(old, new))
    with pytest.raises(TaskConfigError, match=f"support_triage/task.yaml: {message}"):
        load_task(task_copy, "support_triage")


def test_defaults_are_those_of_the_settings_model(task_copy):
    cfg = task_copy / "support_triage" / "task.yaml"
    text = cfg.read_text()
    cut = text.index("primary_metric:")
    cfg.write_text(text[:cut])  # no metric, lengths, splits or generation settings
    spec = load_task(task_copy, "support_triage")
    defaults = TaskSettings.model_fields
    assert spec.splits == defaults["splits"].default.model_copy(update={"few_shot_label_field": "category"})
    assert spec.input_length == (1, 4000) and spec.text_length == (1, 1000)
    assert spec.max_new_tokens == 128 and spec.primary_metric == "mean_field_exact_match"


def test_output_schema_is_validated_with_its_draft(task_copy):
    schema = task_copy / "support_triage" / "output_schema.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"category": {"type": "colour"}}}))
    with pytest.raises(TaskConfigError, match=r"output_schema.json: not a valid JSON schema at properties/category"):
        load_task(task_copy, "support_triage")
    schema.write_text(json.dumps({"type": "object"}))
    with pytest.raises(TaskConfigError, match=r"output_schema.json: needs an object schema with 'properties'"):
        load_task(task_copy, "support_triage")


def test_one_validator_judges_an_answer_and_names_the_field():
    spec = load_task(REPO / "tasks", "support_triage")
    good = {"category": "billing", "priority": "low", "product": "hub", "summary": "Customer asks about a charge."}
    assert spec.output_schema.errors(good) == [] and spec.output_schema.is_valid(good)
    bad = {**good, "priority": "asap", "summary": "Short"}
    del bad["product"]
    assert [str(i) for i in spec.output_schema.errors(bad)] == [
        "'product' is a required property",
        "priority: 'asap' is not one of ['low', 'medium', 'high', 'urgent']",
        "summary: 'Short' is too short",
    ]
    assert spec.output_schema.errors({**good, "summary": 7})[0].field == "summary"
    # a loaded task is a value: equal when loaded twice, and it survives a trip to another process
    copy = pickle.loads(pickle.dumps(spec))
    assert copy == spec == load_task(REPO / "tasks", "support_triage")
    assert [str(i) for i in copy.output_schema.errors(bad)] == [str(i) for i in spec.output_schema.errors(bad)]


def test_raw_reader_names_file_and_row(task_copy):
    spec = load_task(task_copy, "support_triage")
    bad = spec.root / "incoming" / "bad.jsonl"
    bad.parent.mkdir(exist_ok=True)
    good = json.dumps({"message": "hello there", "category": "billing", "priority": "low",
                       "product": "none", "summary": "Customer says hello."})
    bad.write_text(good + "\n" + '{"message": "broken"' + "\n")
    with pytest.raises(TaskDataError, match=r"bad.jsonl, line 2: invalid JSON"):
        list(read_raw_file(bad, spec))
    bad.write_text(good + "\n" + json.dumps({"message": "no labels here"}) + "\n")
    with pytest.raises(TaskDataError, match=r"row 2: missing output field"):
        list(read_raw_file(bad, spec))
    bad.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(TaskDataError, match="not UTF-8"):
        list(read_raw_file(bad, spec))


def test_csv_rows_are_read_with_line_numbers(task_copy):
    spec = load_task(task_copy, "support_triage")
    f = spec.root / "incoming" / "new.csv"
    f.parent.mkdir(exist_ok=True)
    f.write_text("message,category,priority,product,summary\n"
                 "\"Where is my parcel, it is late\",shipping,medium,none,Customer asks about a late parcel.\n")
    rows = list(read_raw_file(f, spec))
    assert rows[0].source_row == 2 and rows[0].source_file == "incoming/new.csv"
    assert rows[0].output["category"] == "shipping"


def test_messages_and_target_are_canonical():
    spec = load_task(REPO / "tasks", "support_triage")
    out = {"summary": "Customer asks.", "product": "hub", "priority": "low", "category": "general_inquiry"}
    target = format_target(out, spec.output_fields)
    assert list(json.loads(target)) == list(FIELDS)  # schema order, not input order
    msgs = build_messages(spec, "Does the hub do Zigbee?", [("Is it waterproof?", out)])
    assert msgs[0]["role"] == "system" and msgs[1]["role"] == "user"
    assert "Does the hub do Zigbee?" in msgs[1]["content"] and "Examples:" in msgs[1]["content"]
    assert "Examples:" not in build_messages(spec, "x")[1]["content"]


@pytest.mark.parametrize(
    ("text", "valid"),
    [
        ('{"category": "billing", "priority": "low", "product": "none", "summary": "x"}', True),
        ('```json\n{"category": "billing"}\n```', True),
        ('{"category": "billing"} and some trailing words', True),
        ("Sure! Here is the JSON: {}", False),
        ('{"category": "billing",', False),
        ("[1, 2]", False),
        ("", False),
    ],
)
def test_parse_prediction(text, valid):
    assert (parse_prediction(text, FIELDS) is not None) is valid


def test_lenient_parse_finds_the_object_after_prose_and_scores_fields_but_not_validity():
    text = 'Here is the JSON:\n```json\n{"category": "billing", "priority": "low"}\n```\nHope it helps {'
    assert parse_prediction(text, FIELDS) is None
    assert parse_prediction(text, FIELDS, lenient=True)["category"] == "billing"
    ref = {"category": "billing", "priority": "high", "product": "none", "summary": "Customer asks."}
    s = score_example("x", text, ref, FIELDS[:3], FIELDS[3:], FIELDS)
    assert (s.valid_json, s.found) == (False, True)
    assert s.field_match == {"category": True, "priority": False, "product": False}
    agg = aggregate([s])
    assert agg["valid_json_rate"] == 0.0 and agg["json_found_rate"] == 1.0
    assert parse_prediction("no object at all", FIELDS, lenient=True) is None


def test_scores_and_aggregate_by_hand():
    ref = {"category": "billing", "priority": "high", "product": "cloud_plan", "summary": "Customer was charged twice."}
    perfect = score_example("a", json.dumps(ref), ref, FIELDS[:3], FIELDS[3:], FIELDS)
    half = score_example("b", json.dumps({**ref, "priority": "LOW ", "product": "Cloud_Plan"}), ref,
                         FIELDS[:3], FIELDS[3:], FIELDS)
    invalid = score_example("c", "I think billing", ref, FIELDS[:3], FIELDS[3:], FIELDS)
    assert perfect.all_labels_match and perfect.rouge_l["summary"] == pytest.approx(1.0)
    assert half.field_match == {"category": True, "priority": False, "product": True}  # case/space-insensitive
    assert not invalid.valid_json and not any(invalid.field_match.values())
    m = aggregate([perfect, half, invalid], [0.1, 0.2, 0.3])
    assert m["valid_json_rate"] == pytest.approx(2 / 3)
    assert m["exact_match_priority"] == pytest.approx(1 / 3)
    assert m["exact_match_category"] == pytest.approx(2 / 3)
    assert m["mean_field_exact_match"] == pytest.approx((2 / 3 + 1 / 3 + 2 / 3) / 3)
    assert m["overall_exact_match"] == pytest.approx(1 / 3)
    assert m["latency_p50_s"] == pytest.approx(0.2)
    # numpy's linear percentile, as online monitoring and the benchmarks: h = 2 * 0.95 = 1.9 -> 0.2 + 0.9 * 0.1
    assert m["latency_p95_s"] == pytest.approx(0.29)
    with pytest.raises(ValueError, match="zero examples"):
        aggregate([])


def test_text_metrics_known_values():
    assert rouge_l_f1("the cat sat", "the cat sat") == pytest.approx(1.0)
    # LCS "the cat" of 2 tokens: P = 2/2, R = 2/3 -> F = 0.8
    assert rouge_l_f1("the cat", "the cat sat") == pytest.approx(0.8)
    assert sentence_bleu("completely different words", "the customer was charged twice") < 0.1
    same = "the customer was charged twice today"
    assert sentence_bleu(same, same) == pytest.approx(1.0)


def test_gate_uses_margin_and_names_baseline():
    g = gate_decision({"m": 0.50}, {"m": 0.40}, "base model", "m", 0.05)
    assert g.passed and "beats base model" in g.reason
    g = gate_decision({"m": 0.44}, {"m": 0.40}, "champion v3", "m", 0.05)
    assert not g.passed and "does not beat champion v3" in g.reason
    with pytest.raises(KeyError):
        gate_decision({}, {"m": 1}, "b", "m", 0)


def scored(matches: list[list[bool]]) -> list[ExampleScore]:
    """Per-example scores of a two-field task: each inner list says which fields matched."""
    return [ExampleScore(f"e{i}", True, dict(zip(("category", "priority"), m, strict=True)), {}, {})
            for i, m in enumerate(matches)]


FEM = "mean_field_exact_match"


@pytest.mark.parametrize(("margin", "passed"), [(0.5 - 1e-9, True), (0.5, True), (0.5 + 1e-9, False)])
def test_interval_gate_compares_the_lower_bound_with_the_margin(margin, passed):
    # Every example gains one of its two fields: each paired difference is +0.5, so every
    # bootstrap resample has mean 0.5 and the interval is [0.5, 0.5].
    cand = scored([[True, True]] * 6)
    base = scored([[True, False]] * 6)
    g = gate_decision({FEM: 1.0}, {FEM: 0.5}, "base model", FEM, margin, cand, base)
    assert (g.improvement_low, g.improvement_high) == (0.5, 0.5)
    assert g.passed is passed
    assert ("beats base model" if passed else "does not beat base model") in g.reason
    assert "95% interval [+0.5000, +0.5000], lower bound vs margin" in g.reason


def test_interval_gate_with_no_improvement_passes_only_a_margin_of_at_most_zero():
    same = scored([[True, False], [False, False], [True, True]])
    assert gate_decision({FEM: 0.5}, {FEM: 0.5}, "champion v2", FEM, 0.0, same, same).passed
    g = gate_decision({FEM: 0.5}, {FEM: 0.5}, "champion v2", FEM, 0.01, same, same)
    assert not g.passed and (g.improvement_low, g.improvement_high) == (0.0, 0.0)
    assert "does not beat champion v2" in g.reason


def test_interval_gate_refuses_a_point_estimate_that_clears_the_margin_by_luck():
    # Ten examples: five gained both fields, five unchanged. The mean improvement (+0.5) clears
    # a margin of 0.3 but the interval's lower bound does not, so the gate holds.
    cand = scored([[True, True]] * 10)
    base = scored([[False, False]] * 5 + [[True, True]] * 5)
    point = gate_decision({FEM: 1.0}, {FEM: 0.5}, "base model", FEM, 0.3)
    interval = gate_decision({FEM: 1.0}, {FEM: 0.5}, "base model", FEM, 0.3, cand, base)
    assert point.passed and point.improvement_low is None
    assert not interval.passed
    assert interval.improvement_low < 0.3 and interval.improvement_high > 0.5
    # Below that lower bound the same evidence promotes.
    assert gate_decision({FEM: 1.0}, {FEM: 0.5}, "base model", FEM, interval.improvement_low - 0.01, cand, base).passed


def test_interval_gate_reads_the_primary_metric_per_example_and_needs_paired_scores():
    # The per-example scores decide, not the aggregate numbers passed beside them.
    cand = scored([[True, True]] * 4)
    base = scored([[False, False]] * 4)
    g = gate_decision({FEM: 0.0}, {FEM: 0.0}, "base model", FEM, 0.9, cand, base)
    assert g.passed and (g.improvement_low, g.improvement_high) == (1.0, 1.0)
    g = gate_decision({"overall_exact_match": 0.0}, {"overall_exact_match": 0.0}, "base model",
                      "overall_exact_match", 0.9, scored([[True, False]] * 4), base)
    assert not g.passed and g.improvement_low == 0.0  # no example has every field right
    with pytest.raises(ValueError, match="differ in length"):
        gate_decision({FEM: 1.0}, {FEM: 0.0}, "base model", FEM, 0.0, cand, base[:3])


def test_hashes_are_order_independent_and_atomic_writes_leave_nothing_behind(tmp_path):
    assert sha256_json({"a": 1, "b": 2}) == sha256_json({"b": 2, "a": 1})
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "x.txt").write_text("1")
    first = sha256_dir(target)
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "x.txt").write_text("2")
        raise RuntimeError("boom")
    assert sha256_dir(target) == first  # the failed write changed nothing
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp folders left
    atomic_write_text(tmp_path / "f.txt", "hello")
    assert (tmp_path / "f.txt").read_text() == "hello"
