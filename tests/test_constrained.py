"""Schema-constrained decoding: the matcher and its mask, the compile cache, both engines on the
tiny model (every answer parses and validates), and the endpoint's structured-output fields
(OpenAI ``response_format``, vLLM ``guided_json``) through a real server process."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

TRIAGE = {
    "type": "object",
    "additionalProperties": False,
    "required": ["category", "priority", "urgent"],
    "properties": {
        "category": {"type": "string", "enum": ["billing", "technical_issue", "shipping"]},
        "priority": {"type": "string", "enum": ["low", "medium", "high"]},
        "urgent": {"type": "boolean"},
    },
}
FLAG = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}
MSGS = [
    [{"role": "user", "content": "My doorbell stopped ringing after the update."}],
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": "Where is my parcel?"}],
]


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def _allowed(compiled_matcher, vocab: int):
    import torch

    from genops_assets.lib.constrained import mask_logits

    logits = torch.zeros(1, vocab + 7)  # the model's padding columns past the vocabulary too
    mask_logits(logits, [compiled_matcher])
    return logits[0] == 0


def test_mask_allows_exactly_the_schema_and_then_only_the_end_of_turn(tok):
    from genops_assets.lib.constrained import compile_schema

    compiled = compile_schema(tok, TRIAGE, "TRIAGE")
    matcher = compiled.matcher()
    answer = '\n{"category": "shipping", "priority": "low", "urgent": true}'
    ids = tok(answer, add_special_tokens=False)["input_ids"]
    for i, token in enumerate(ids):
        allowed = _allowed(matcher, len(tok))
        assert allowed[token], f"token {i} ({tok.decode([token])!r}) of a valid answer was masked"
        assert not allowed[len(tok):].any(), "padding columns past the vocabulary must stay masked"
        assert not allowed[tok.eos_token_id], "the end of turn is allowed only once the JSON is complete"
        assert not matcher.complete
        matcher.advance(token)
    assert matcher.complete
    allowed = _allowed(matcher, len(tok))
    assert allowed.nonzero().flatten().tolist() == [tok.eos_token_id]

    # Off-schema continuations are masked: an unknown key, a value outside the enum.
    for bad in ('{"colour', '{"category": "refund'):
        m = compiled.matcher()
        prefix = tok(bad, add_special_tokens=False)["input_ids"]
        blocked = False
        for token in prefix:
            if not _allowed(m, len(tok))[token]:
                blocked = True
                break
            m.advance(token)
        assert blocked, f"{bad!r} must leave the schema's grammar"
    with pytest.raises(RuntimeError, match="outside the schema"):
        compiled.matcher().advance(tok("hello", add_special_tokens=False)["input_ids"][0])


def test_compiled_once_per_tokenizer_and_schema(tok, tokenizer_dir):
    from transformers import AutoTokenizer

    from genops_assets.lib.constrained import ANY_JSON_OBJECT, compile_schema, llg_tokenizer

    first = compile_schema(tok, TRIAGE)
    assert compile_schema(tok, json.loads(json.dumps(TRIAGE))) is first  # by content, not identity
    other = compile_schema(tok, ANY_JSON_OBJECT)
    assert other is not first and other.digest != first.digest
    assert llg_tokenizer(tok) is first.llg_tokenizer
    tok2 = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert compile_schema(tok2, TRIAGE) is not first and llg_tokenizer(tok2) is not llg_tokenizer(tok)


@pytest.mark.parametrize("schema, message", [
    ({"type": "objectx"}, "Invalid type"),
    ({"type": "object", "properties": {"a": {"$ref": "#/definitions/missing"}}}, "does not exist"),
    (["not", "a", "schema"], "must be an object"),
])
def test_a_schema_llguidance_refuses_names_its_source(tok, schema, message):
    from genops_assets.lib.constrained import SchemaError, compile_schema

    with pytest.raises(SchemaError, match=rf"^tasks/x/output_schema\.json: .*{message}"):
        compile_schema(tok, schema, "tasks/x/output_schema.json")


def _valid(text: str, schema) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


@pytest.fixture(scope="module")
def loaded(tiny_model_dir, tiny_adapter_dir):
    from genops_assets.serving.adapters import load_model

    return load_model(tiny_model_dir, {"cand": tiny_adapter_dir})


def test_static_engine_answers_valid_json_per_row_and_leaves_free_rows_alone(loaded):
    from genops_assets.serving.generation import generate

    free = generate(loaded, MSGS, adapter="cand", max_new_tokens=160, batch_size=3)
    assert not any(_valid(r.text, TRIAGE) for r in free), "the random model must not answer the schema by itself"
    held = generate(loaded, MSGS, adapter="cand", max_new_tokens=160, batch_size=3, json_schema=TRIAGE)
    for r in held:
        assert _valid(r.text, TRIAGE), r.text
        assert r.finish_reason == "stop"
    # Per row: the middle row is free and answers exactly as without any schema.
    mixed = generate(loaded, MSGS, adapter="cand", max_new_tokens=160, batch_size=3,
                     json_schema=[TRIAGE, None, FLAG])
    assert mixed[0].text == held[0].text
    assert mixed[1].text == free[1].text and not _valid(mixed[1].text, {"type": "object"})
    assert _valid(mixed[2].text, FLAG)
    with pytest.raises(ValueError, match="2 entries for 3 conversations"):
        generate(loaded, MSGS, max_new_tokens=4, json_schema=[TRIAGE, None])


def test_continuous_engine_holds_each_row_to_its_schema_as_the_static_one(loaded):
    from genops_assets.serving.decode import DecodeBatch
    from genops_assets.serving.generation import generate

    static = generate(loaded, MSGS, adapter="cand", max_new_tokens=160, batch_size=3,
                      json_schema=[TRIAGE, None, TRIAGE])
    batch = DecodeBatch(loaded, "cand")
    n = len(MSGS)
    done = dict(batch.admit(list(range(n)), MSGS, max_new_tokens=[160] * n, temperature=[0.0] * n, top_p=[1.0] * n,
                            stop=[()] * n, seeds=[None] * n, sinks=[None] * n,
                            json_schemas=[TRIAGE, None, TRIAGE]))
    while len(batch):
        done.update(dict(batch.step()))
    batch.close()
    assert [done[i].text for i in range(n)] == [r.text for r in static]
    assert _valid(done[0].text, TRIAGE) and _valid(done[2].text, TRIAGE)


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory, tiny_model_dir, tiny_adapter_dir):
    """A real server on the tiny model serving task ``support_triage`` (prompt published with an
    output schema: the task decodes constrained) and task ``free`` (prompt without one)."""
    from dataclasses import asdict

    from graph_support import free_port

    from genops_assets.lib.prompts import PromptTemplate
    from resources.endpoint import LocalEndpoint

    root = tmp_path_factory.mktemp("constrained-endpoint")
    ep = LocalEndpoint(state_dir=str(root / "endpoint"), port=free_port(), ready_timeout_s=240)
    template = asdict(PromptTemplate("Triage the message.", "Message: {message}", "message", 160))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("GENOPS_API_KEYS", "")
        ep.publish_prompt("support_triage", {"name": "p", "version": 1, "template": template, "output_schema": TRIAGE})
        ep.publish_prompt("free", {"name": "q", "version": 1, "template": template, "output_schema": None})
        ep.deploy(str(tiny_model_dir), "support_triage", "champion", str(tiny_adapter_dir), "1")
        ep.deploy(str(tiny_model_dir), "free", "champion", str(tiny_adapter_dir), "1")
    try:
        yield ep
    finally:
        ep.stop()


def _client(ep):
    from openai import OpenAI

    return OpenAI(base_url=ep.url, api_key="none", max_retries=0, timeout=120)


ASK = [{"role": "user", "content": "My doorbell stopped ringing after the update."}]


@pytest.mark.server
def test_response_format_and_guided_json_through_the_endpoint(endpoint):
    client = _client(endpoint)
    named = {"type": "json_schema", "json_schema": {"name": "triage", "schema": TRIAGE, "strict": True}}
    free = client.chat.completions.create(model="free", messages=ASK, max_tokens=160)
    assert not free.choices[0].message.content.lstrip().startswith("{"), "the free answer must not be JSON already"
    for kwargs in ({"response_format": named}, {"extra_body": {"guided_json": TRIAGE}},
                   {"extra_body": {"guided_json": json.dumps(TRIAGE)}}):
        r = client.chat.completions.create(model="free", messages=ASK, max_tokens=160, **kwargs)
        assert _valid(r.choices[0].message.content, TRIAGE), (kwargs, r.choices[0].message.content)
        assert r.choices[0].finish_reason == "stop"
    # json_object: any object (the random model rarely closes free-form keys, so the opening is checked)
    r = client.chat.completions.create(model="free", messages=ASK, max_tokens=8,
                                       response_format={"type": "json_object"})
    assert r.choices[0].message.content.lstrip().startswith("{")
    # streaming goes through the same mask
    chunks = client.chat.completions.create(model="free", messages=ASK, max_tokens=160, response_format=named,
                                            stream=True)
    assert _valid("".join(c.choices[0].delta.content or "" for c in chunks if c.choices), TRIAGE)


@pytest.mark.server
def test_a_task_that_decodes_constrained_gets_its_schema_unless_the_request_asks_otherwise(endpoint):
    client = _client(endpoint)
    r = client.chat.completions.create(model="support_triage", messages=[], max_tokens=160,
                                       extra_body={"prompt_variables": {"message": "Where is my parcel?"}})
    assert _valid(r.choices[0].message.content, TRIAGE)
    r = client.chat.completions.create(model="support_triage", messages=ASK, max_tokens=160)
    assert _valid(r.choices[0].message.content, TRIAGE)
    r = client.chat.completions.create(model="support_triage", messages=ASK, max_tokens=160,
                                       response_format={"type": "text"})
    assert not _valid(r.choices[0].message.content, TRIAGE)
    r = client.chat.completions.create(model="support_triage", messages=ASK, max_tokens=160,
                                       extra_body={"guided_json": FLAG})
    assert _valid(r.choices[0].message.content, FLAG)
    log = [json.loads(line) for line in (Path(endpoint.state_dir) / "requests.jsonl").read_text().splitlines()]
    assert [e["constrained"] for e in log if e.get("task") == "support_triage"][-4:] == [True, True, False, True]


@pytest.mark.server
@pytest.mark.parametrize("body, param, message", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
     "response_format.json_schema.schema", "Invalid type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema", "is required"),
    ({"response_format": {"type": "xml"}}, "response_format.type", "json_schema"),
    ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
    ({"guided_json": {"type": "object", "properties": {"a": {"$ref": "#/nope"}}}}, "guided_json", "does not exist"),
    ({"guided_json": TRIAGE, "response_format": {"type": "json_object"}}, "guided_json", "not both"),
    ({"guided_choice": ["a", "b"], "response_format": {"type": "json_object"}}, "response_format", "guided_choice"),
])
def test_a_bad_structured_output_request_is_a_400_naming_the_field(endpoint, body, param, message):
    import httpx

    resp = httpx.post(f"{endpoint.url}/chat/completions", timeout=60,
                      json={"model": "free", "messages": ASK, "max_tokens": 4, **body})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and message in error["message"], error


def test_evaluation_follows_the_task_setting_and_caches_each_way_apart(tmp_path):
    import dataclasses

    from genops_assets.lib.cache import CallCache
    from genops_assets.lib.evaluation import EvalExample, evaluate_model
    from genops_assets.lib.tasks import load_task
    from genops_assets.serving.generation import GenerationResult

    spec = load_task("tasks", "support_triage")
    assert spec.constrained is True  # the default
    answer = {"category": "shipping", "priority": "low", "product": "none", "summary": "Where is my parcel now?"}
    examples = [EvalExample(f"e{i}", f"Where is my parcel {i}?", answer) for i in range(3)]
    asked = []

    def engine(batch, max_new_tokens, json_schema):
        asked.append(json_schema)
        text = json.dumps(answer) if json_schema is not None else "parcel?"
        return [GenerationResult(text, 10, 5, 0.25, "stop") for _ in batch]

    cache = CallCache(tmp_path / "calls.sqlite")
    held = evaluate_model(None, None, "m", "digest", spec, examples, [], cache, log=lambda _: None, engine=engine)
    assert asked == [spec.schema] and held.constrained and held.metrics["valid_json_rate"] == 1.0
    free = evaluate_model(None, None, "m", "digest", spec, examples, [], cache, log=lambda _: None, engine=engine,
                          constrained=False)
    assert asked == [spec.schema, None] and not free.constrained and free.metrics["valid_json_rate"] == 0.0
    again = evaluate_model(None, None, "m", "digest", spec, examples, [], cache, log=lambda _: None, engine=engine)
    assert again.cached and again.metrics == held.metrics and len(asked) == 2
    off = dataclasses.replace(spec, constrained=False)  # generation.constrained: false
    assert evaluate_model(None, None, "m", "digest", off, examples, [], cache, log=lambda _: None,
                          engine=engine).metrics == free.metrics and len(asked) == 2


def test_decoding_comparison_shows_both_ways_and_never_invents_a_metric():
    from genops_assets.lib.eval_report import DecodingComparison
    from genops_assets.lib.evaluation import ModelEval

    metrics = {"valid_json_rate": 1.0, "mean_field_exact_match": 0.5, "overall_exact_match": 0.25,
               "latency_p50_s": 1.5}
    comp = DecodingComparison(True, {"constrained": ModelEval("a", "d", metrics),
                                     "unconstrained": ModelEval("b", "d", {**metrics, "valid_json_rate": 0.75})},
                              "overall_exact_match")
    assert comp.metrics == ("valid_json_rate", "mean_field_exact_match", "overall_exact_match", "latency_p50_s")
    assert comp.mlflow_metrics()["unconstrained/valid_json_rate"] == 0.75
    assert comp.mlflow_metrics()["constrained/latency_p50_s"] == 1.5
    assert [(r["decoding"], r["task_setting"]) for r in comp.rows()] == [("constrained", True),
                                                                         ("unconstrained", False)]
    _title, md, html = comp.section()
    assert "| constrained (task setting) | 1.000 | 0.500 | 0.250 | 1.500 |" in md and "<table>" in html
    broken = DecodingComparison(True, {"constrained": ModelEval("a", "d", {"valid_json_rate": 1.0})},
                                "mean_field_exact_match")
    with pytest.raises(KeyError, match="constrained evaluation has no 'mean_field_exact_match'"):
        broken.rows()
