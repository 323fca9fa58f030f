"""Prompt templates, the MLflow prompt registry (real SQLite store), and the enhancement
loop's selection logic with a scripted teacher."""

from __future__ import annotations

import json

import pytest

from genops_assets.lib.enhance import Candidate, build_candidate, failure_digest, propose_candidates, select_prompt
from genops_assets.lib.evaluation import ModelEval
from genops_assets.lib.metrics import aggregate, score_example
from genops_assets.lib.prompts import (
    CANDIDATE,
    PRODUCTION,
    PromptError,
    PromptTemplate,
    load_prompt_file,
    template_diff,
)
from resources.tracking import MlflowTracking

BASE = PromptTemplate("Reply with JSON {{\"a\": 1}}.\n{few_shot}", "Message: {message}", "message", 72)


def test_registry_syntax_round_trip_keeps_literal_braces_and_variables():
    chat, cfg = BASE.to_registry()
    assert chat[0]["content"] == 'Reply with JSON {"a": 1}.\n{{few_shot}}'
    assert chat[1]["content"] == "Message: {{message}}"
    assert cfg == {"max_tokens": 72, "temperature": 0.0}
    back = PromptTemplate.from_registry(chat, cfg, "message")
    assert back == BASE and back.digest == BASE.digest
    msgs = back.render({"message": "hello"})
    assert msgs == [{"role": "system", "content": 'Reply with JSON {"a": 1}.\n'},
                    {"role": "user", "content": "Message: hello"}]


@pytest.mark.parametrize("system,user,needle", [
    ("Use {category}.", "M: {message}", "unknown template variable(s) ['category']"),
    ("ok", "no input here", "must contain {message}"),
    ("broken {", "M: {message}", "malformed template"),
    ("ok", "", "user template is empty"),
])
def test_bad_templates_are_named(system, user, needle):
    with pytest.raises(PromptError, match="prompt") as err:
        PromptTemplate(system, user, "message").validate("prompt")
    assert needle in str(err.value)


def test_prompt_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("Classify the ticket.\n{few_shot}")
    assert load_prompt_file(txt, BASE).system == "Classify the ticket.\n{few_shot}"
    yml = tmp_path / "p.yaml"
    yml.write_text("user: 'Ticket: {message}'\ngeneration: {max_new_tokens: 40}\n")
    t = load_prompt_file(yml, BASE)
    assert t.user == "Ticket: {message}" and t.max_new_tokens == 40 and t.system == BASE.system
    bad = tmp_path / "bad.yaml"
    bad.write_text("system: 'Use {colour}'\n")
    with pytest.raises(PromptError, match=r"bad.yaml.*unknown template variable.*colour"):
        load_prompt_file(bad, BASE)
    with pytest.raises(PromptError, match="unknown key"):
        (tmp_path / "k.yaml").write_text("sytem: x\n")
        load_prompt_file(tmp_path / "k.yaml", BASE)


@pytest.fixture()
def tracking(tmp_path):
    return MlflowTracking(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_root=(tmp_path / "a").as_uri())


def test_registration_is_idempotent_and_aliases_resolve(tracking):
    name = "genops-t-prompt"
    v1, created = tracking.register_prompt(name, BASE, "first")
    assert created and v1.version == 1
    again, created = tracking.register_prompt(name, BASE, "same text again")
    assert not created and again.version == 1
    assert len(tracking.prompt_versions(name, "message")) == 1

    changed = BASE.with_system("Answer in JSON.")
    v2, created = tracking.register_prompt(name, changed, "second")
    assert created and v2.version == 2
    back, created = tracking.register_prompt(name, BASE, "the first text once more")
    assert not created and back.version == 1  # a version per distinct text, not per registration

    assert tracking.prompt_alias(name, PRODUCTION, "message") is None
    tracking.set_prompt_alias(name, PRODUCTION, 1)
    tracking.set_prompt_alias(name, CANDIDATE, 2)
    prod = tracking.require_prompt_alias(name, PRODUCTION, "message")
    assert prod.version == 1 and prod.template == BASE and PRODUCTION in prod.aliases
    assert tracking.require_prompt_alias(name, CANDIDATE, "message").template == changed
    tracking.set_prompt_alias(name, PRODUCTION, 2)  # promotion / rollback is an alias move
    assert tracking.require_prompt_alias(name, PRODUCTION, "message").version == 2

    with pytest.raises(PromptError, match="has no alias 'staging'"):
        tracking.require_prompt_alias(name, "staging", "message")
    with pytest.raises(PromptError, match=r"has no version 7 \(registered: \[1, 2\]\)"):
        tracking.set_prompt_alias(name, PRODUCTION, 7)
    assert tracking.prompt_alias("genops-missing-prompt", PRODUCTION, "message") is None


# -- enhancement ---------------------------------------------------------------------------

REFS = [{"category": c, "priority": "low", "product": "hub", "summary": "s"}
        for c in ("billing", "shipping", "billing", "returns_refunds", "billing", "shipping")]
IDS = [f"val_{i}" for i in range(len(REFS))]
FIELDS = ("category", "priority", "product", "summary")


def scripted_eval(right_if: str):
    """An evaluation double: a prompt containing ``right_if`` answers every example right, any
    other gets only the first two right. Scores go through the real metric code."""
    calls = []

    def evaluate(template: PromptTemplate, label: str) -> ModelEval:
        calls.append(label)
        good = right_if in template.system
        scores = []
        for i, (eid, ref) in enumerate(zip(IDS, REFS, strict=True)):
            answer = ref if good or i < 2 else {**ref, "category": "general_inquiry", "priority": "urgent"}
            scores.append(score_example(eid, json.dumps(answer), ref, FIELDS[:3], FIELDS[3:], FIELDS))
        return ModelEval(label, "d", aggregate(scores), scores=scores)

    return evaluate, calls


def test_candidates_from_a_scripted_teacher_are_built_or_skipped_with_reasons():
    answers = iter([
        "Here are the rules:\n- Refund questions are returns_refunds.\n- Outages are urgent.",
        "",
        "Use the {category} field carefully and always answer in JSON.",
        "ok",
        "Here are the rules:\n- Refund questions are returns_refunds.\n- Outages are urgent.",
    ])
    seen = []

    def teacher(messages, seed):
        seen.append((messages, seed))
        return next(answers)

    cands = propose_candidates(teacher, BASE, "Message: x\nExpected: {}", 5, log=lambda m: None)
    assert [c.skip_reason is None for c in cands] == [True, False, False, False, False]
    assert cands[0].mode == "append" and "Refund questions are returns_refunds." in cands[0].template.system
    assert cands[0].template.system.endswith("{few_shot}")  # the few-shot slot stays last
    assert "Here are" not in cands[0].template.system
    assert cands[1].skip_reason.startswith("empty candidate")
    assert "unknown template variable" in cands[2].skip_reason and "category" in cands[2].skip_reason
    assert cands[3].skip_reason.startswith("candidate too short")
    assert cands[4].skip_reason == "duplicate of an earlier candidate"
    assert [s for _, s in seen] == [0, 1, 2, 3, 4]
    assert "Mistakes made with them" in seen[0][0][1]["content"]


def test_rewrite_mode_keeps_the_few_shot_slot_and_identical_text_is_skipped():
    t, reason = build_candidate(BASE, "Classify the support message and reply with JSON only.", "rewrite")
    assert reason is None and t.system.endswith("{few_shot}") and t.user == BASE.user
    same, reason = build_candidate(PromptTemplate("Reply in JSON only, please.", "M: {message}", "message"),
                                   "Reply in JSON only, please.", "rewrite")
    assert same is None and reason == "identical to production"


def test_selection_promotes_only_a_candidate_that_clears_the_gate():
    evaluate, calls = scripted_eval("RULE")
    good = Candidate(0, "append", "d", "raw", BASE.with_system("RULE: refunds"))
    meh = Candidate(1, "rewrite", "d", "raw", BASE.with_system("Be careful."))
    skipped = Candidate(2, "append", "d", "", None, "empty candidate")
    sel = select_prompt(BASE, "production v1", [meh, good, skipped], evaluate, IDS, {"gold_1"},
                        "mean_field_exact_match", margin=0.01)
    assert calls == ["production v1", "candidate 2", "candidate 1"]  # skipped ones are not evaluated
    assert sel.best is good and sel.promoted
    assert sel.gate.improvement_low > 0.01
    assert good.metrics["mean_field_exact_match"] == pytest.approx(1.0)
    assert meh.metrics["mean_field_exact_match"] == pytest.approx(sel.production.metrics["mean_field_exact_match"])

    # No better candidate: nothing moves.
    evaluate, _ = scripted_eval("NOTHING MATCHES")
    sel = select_prompt(BASE, "production v1", [meh], evaluate, IDS, set(), "mean_field_exact_match", 0.01)
    assert sel.best is meh and not sel.promoted
    # Every candidate skipped: production only, no gate.
    sel = select_prompt(BASE, "production v1", [skipped], evaluate, IDS, set(), "mean_field_exact_match", 0.01)
    assert sel.best is None and sel.gate is None and not sel.promoted


def test_selection_refuses_golden_examples():
    evaluate, calls = scripted_eval("RULE")
    with pytest.raises(ValueError, match="must not use golden examples"):
        select_prompt(BASE, "p", [], evaluate, IDS, {IDS[3]}, "mean_field_exact_match", 0.0)
    assert calls == []


def test_failure_digest_lists_wrong_fields_only():
    preds = [{"input": "a", "prediction": "{}", "reference": {"category": "billing"},
              "field_match": {"category": True, "priority": True}},
             {"input": "b", "prediction": "x", "reference": {"category": "shipping", "priority": "low"},
              "field_match": {"category": False, "priority": True}}]
    text = failure_digest(preds, ["category", "priority"])
    assert "Message: b" in text and "Wrong fields: category" in text and "Message: a" not in text


def test_template_diff_shows_the_change():
    diff = template_diff(BASE, BASE.with_system("Other."), "v1", "v2")
    assert "--- v1" in diff and "+Other." in diff


@pytest.mark.graph
def test_prompt_try_prints_outputs_and_metrics_then_answers_from_the_cache(tmp_path, tiny_model_dir, monkeypatch,
                                                                           capsys):
    from genops_assets import cli

    monkeypatch.setenv("GENOPS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home" / "dagster"))
    prompt = tmp_path / "mine.txt"
    prompt.write_text("Answer with one JSON object.\n{few_shot}")
    args = ["prompt", "try", "--prompt", str(prompt), "-n", "3", "--base-model", str(tiny_model_dir)]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "on 3 examples from raw task files" in out and "mean_field_exact_match" in out
    assert "1 model calls" in out
    assert cli.main(args) == 0
    assert "0 model calls" in capsys.readouterr().out  # the same prompt again: from the cache

    bad = tmp_path / "bad.yaml"
    bad.write_text("user: 'Ticket without the input variable'\n")
    assert cli.main(["prompt", "try", "--prompt", str(bad), "--base-model", str(tiny_model_dir)]) == 2
    assert "bad.yaml (user): must contain {message}" in capsys.readouterr().err
