"""Generation and the OpenAI-compatible endpoint, on the tiny model: a real server process,
queried over HTTP with the official openai client."""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.error
import urllib.request

import openai
import pytest
from graph_support import free_port
from openai import OpenAI

from genops_assets.serving import control
from resources.endpoint import LocalEndpoint

pytestmark = pytest.mark.server

MSG = [{"role": "user", "content": "My doorbell stopped ringing after the update."}]
TASK = "support_triage"  # the task whose champion the server fixture serves (model name = task name)


def test_generation_base_and_adapter_differ_and_respect_limits(tiny_model_dir, tiny_adapter_dir):
    from genops_assets.serving.adapters import load_model
    from genops_assets.serving.generation import generate

    loaded = load_model(tiny_model_dir, {"cand": tiny_adapter_dir})
    batch = [MSG, [{"role": "user", "content": "hi"}], [{"role": "system", "content": "Answer in JSON."}, *MSG]]
    base = generate(loaded, batch, adapter=None, max_new_tokens=6, batch_size=2)
    cand = generate(loaded, batch, adapter="cand", max_new_tokens=6, batch_size=2)
    assert len(base) == len(cand) == 3
    assert all(r.completion_tokens <= 6 and r.prompt_tokens > 0 for r in base + cand)
    assert all(r.finish_reason in ("stop", "length") for r in base + cand)
    assert [r.text for r in base] != [r.text for r in cand], "the adapter must change what the model says"
    # Greedy decoding is deterministic, and the base answer is the same once adapters are loaded.
    assert [r.text for r in generate(loaded, batch, adapter=None, max_new_tokens=6, batch_size=2)] == [
        r.text for r in base]
    with pytest.raises(KeyError, match="not loaded"):
        generate(loaded, batch, adapter="missing")


def test_token_sinks_stream_each_row_and_stop_one_while_the_batch_goes_on(tiny_model_dir, tiny_adapter_dir):
    from genops_assets.serving.adapters import load_model
    from genops_assets.serving.generation import generate

    loaded = load_model(tiny_model_dir, {"cand": tiny_adapter_dir})
    batch = [MSG, [{"role": "user", "content": "hi"}], [{"role": "user", "content": "Reset the camera, please."}]]
    plain = generate(loaded, batch, adapter="cand", max_new_tokens=8)
    seen: dict[int, list] = {0: [], 1: [], 2: []}

    def sink(row: int, stop_after: int | None = None):
        def on_token(token, finish):
            seen[row].append((token, finish))
            return stop_after is not None and len(seen[row]) >= stop_after
        return on_token

    hooked = generate(loaded, batch, adapter="cand", max_new_tokens=8, token_sinks=[sink(0), sink(1, 3), None])
    # Row 0 received its own tokens as they came, ending with the finish reason; they decode to its answer.
    assert len(seen[0]) == 8 and seen[0][-1][1] == "length" and all(f is None for _, f in seen[0][:-1])
    assert loaded.tokenizer.decode([t for t, _ in seen[0]], skip_special_tokens=True).strip() == plain[0].text
    # Row 1 asked to stop after 3 tokens: it stops there, while rows 0 and 2 decode to the end unchanged.
    assert len(seen[1]) == 3 and hooked[1].completion_tokens == 3 and hooked[1].finish_reason == "stop"
    assert [r.text for r in (hooked[0], hooked[2])] == [plain[0].text, plain[2].text]
    assert hooked[2].completion_tokens == plain[2].completion_tokens
    with pytest.raises(ValueError, match="token_sinks"):
        generate(loaded, batch, token_sinks=[None])


@pytest.fixture()
def server(tmp_path, tiny_model_dir, tiny_adapter_dir):
    port = free_port()
    # No API keys, whatever the environment holds: the local default is an open endpoint.
    state = control.start_server(str(tiny_model_dir), {TASK: str(tiny_adapter_dir)}, {TASK: "1"},
                                 tmp_path / "endpoint", port=port, ready_timeout_s=180, env={"GENOPS_API_KEYS": ""})
    yield state
    control.stop_server(tmp_path / "endpoint")


def test_endpoint_speaks_openai_and_hot_reloads(server, tmp_path, tiny_adapter_dir):
    state_dir = tmp_path / "endpoint"
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    assert {m.id for m in client.models.list().data} == {"base", TASK}

    reply = client.chat.completions.create(model=TASK, messages=MSG, max_tokens=5, temperature=0)
    assert reply.object == "chat.completion" and reply.model == TASK
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert 0 < reply.usage.completion_tokens <= 5
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens

    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="nope", messages=MSG)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="base", messages=MSG, temperature=7)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="base", messages=[])

    # Hot reload: same process, new version served, a bad folder refused with the reason.
    pid = server.pid
    new = control.reload_adapter(state_dir, TASK, str(tiny_adapter_dir), "2")
    assert new.pid == pid and new.versions == {TASK: "2"}
    health = json.loads(urllib.request.urlopen(f"{server.url}/health").read())
    assert health["adapters"] == {TASK: "2"} and health["tasks"][TASK]["versions"] == {TASK: "2"}
    assert client.chat.completions.create(model=TASK, messages=MSG, max_tokens=3).choices[0].message
    with pytest.raises(control.EndpointError, match=r"adapter_config.json"):
        control.reload_adapter(state_dir, TASK, str(tmp_path), "3")
    with pytest.raises(control.EndpointError, match="base model"):
        control.reload_adapter(state_dir, "base", str(tiny_adapter_dir), "3")
    assert control.read_state(state_dir).versions == {TASK: "2"}

    # The admin route needs the token.
    req = urllib.request.Request(f"{server.url}/admin/reload", method="POST",
                                 data=json.dumps({"name": "x", "adapter_dir": "/", "version": "1"}).encode(),
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req)
    assert err.value.code == 401

    log = [json.loads(line) for line in (state_dir / "requests.jsonl").read_text().splitlines()]
    served = [e for e in log if e.get("status") == 200]
    assert len(served) == 2 and served[0]["completion_tokens"] == reply.usage.completion_tokens
    assert any(e.get("event") == "reload" and e["version"] == "2" for e in log)
    assert "GENOPS_API_KEYS is not set" in (state_dir / "server.log").read_text(), "an open endpoint says so"


def test_second_server_on_a_busy_port_is_refused(tmp_path, tiny_model_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(control.PortInUseError, match=str(port)):
            control.start_server(str(tiny_model_dir), {}, {}, tmp_path / "ep", port=port)
    assert control.read_state(tmp_path / "ep") is None
    assert control.stop_server(tmp_path / "ep") is False


def test_server_that_cannot_start_reports_its_log(tmp_path):
    with pytest.raises(control.EndpointError, match=r"config.json"):
        control.start_server(str(tmp_path / "no-model"), {}, {}, tmp_path / "ep", port=free_port(),
                             ready_timeout_s=120)
    assert control.read_state(tmp_path / "ep") is None


def test_shared_prefix_choice_scoring_matches_one_by_one(tiny_model_dir, tiny_adapter_dir):
    """Judge prompts share a long rubric prefix: scoring them together (prefix computed once)
    gives the same probabilities as scoring each alone."""
    from genops_assets.serving.adapters import load_model
    from genops_assets.serving.scoring import score_choices

    loaded = load_model(tiny_model_dir, {"cand": tiny_adapter_dir})
    rubric = "You grade answers on a 1-5 scale. " * 12
    batch = [[{"role": "system", "content": rubric}, {"role": "user", "content": f"Answer {i}: " + "ok " * i}]
             for i in range(1, 6)]
    choices = [("1", "2", "3", "4", "5")] * len(batch)
    for adapter in (None, "cand"):
        together = score_choices(loaded, batch, choices, adapter=adapter)
        alone = [score_choices(loaded, [m], [c], adapter=adapter)[0] for m, c in zip(batch, choices, strict=True)]
        for (t, tn), (a, an) in zip(together, alone, strict=True):
            assert tn == an
            assert t == pytest.approx(a, abs=1e-4)


def _tokens_computed(loaded):
    """A list that grows by the number of tokens each forward pass computes."""
    seen: list[int] = []
    loaded.model.get_input_embeddings().register_forward_hook(lambda _m, args, _out: seen.append(args[0].numel()))
    return seen


def test_choice_scoring_reuses_cached_prompts(tiny_model_dir, tiny_adapter_dir):
    """Judge prompts reuse the prefix cache: a rubric seen before is not computed again, a
    batch computes the rest of its common start once, and a judge's follow-up question
    (verdict, then "why?") computes only its own tail. Probabilities equal those computed
    from scratch; the cache is kept per adapter."""
    from genops_assets.serving import kv_cache
    from genops_assets.serving.adapters import load_model
    from genops_assets.serving.decode import DecodeBatch
    from genops_assets.serving.scoring import score_choices

    loaded = load_model(tiny_model_dir, {"cand": tiny_adapter_dir})
    tok = loaded.tokenizer
    rubric = "You grade answers on a 1-5 scale. " * 12
    convs = [[{"role": "system", "content": rubric}, {"role": "user", "content": f"{i}. " + "ok " * i}]
             for i in range(1, 6)]
    choices = [("1", "2", "3", "4", "5")] * len(convs)
    seen = _tokens_computed(loaded)
    for adapter in (None, "cand"):
        scratch = []
        for m, c in zip(convs, choices, strict=True):
            loaded.prefixes.clear()
            scratch.append(score_choices(loaded, [m], [c], adapter=adapter)[0])
        loaded.prefixes.clear()
        del seen[:]
        lens = [len(kv_cache.encode(tok, m)) for m in convs]
        rubric_len = len(os.path.commonprefix([kv_cache.encode(tok, m) for m in convs]))
        first, n = score_choices(loaded, convs[:1], choices[:1], adapter=adapter)[0]
        assert n == scratch[0][1] and first == pytest.approx(scratch[0][0], abs=1e-4)
        assert seen == [lens[0]]
        # the next ones begin with the cached rubric: only their own tails are computed
        together = score_choices(loaded, convs[1:], choices[1:], adapter=adapter)
        assert seen[1:] == [4 * (max(lens[1:]) - rubric_len)], seen
        for (t, tn), (a, an) in zip(together, scratch[1:], strict=True):
            assert tn == an and t == pytest.approx(a, abs=1e-4)
        # the follow-up for an explanation continues a scored prompt
        follow = [*convs[2], {"role": "assistant", "content": "4"},
                  {"role": "user", "content": "In one sentence, why?"}]
        del seen[:]
        batch = DecodeBatch(loaded, adapter)
        _admit(batch, 0, follow, 1)
        batch.close()
        assert seen == [len(kv_cache.encode(tok, follow)) - lens[2]], "only the follow-up's own tokens"
    assert {o for o, _, _ in loaded.prefixes} == {loaded.internal["cand"]}
    del seen[:]
    score_choices(loaded, convs[3:4], choices[3:4])  # the base does not use the adapter's cache
    assert seen == [lens[3]]


def test_prefix_cache_is_bounded_in_bytes(tiny_model_dir, monkeypatch):
    """The least recently used prompts leave the cache beyond its byte budget; a prompt that
    starts a kept one adds no entry."""
    from genops_assets.serving import kv_cache
    from genops_assets.serving.adapters import load_model
    from genops_assets.serving.scoring import score_choices

    loaded = load_model(tiny_model_dir)
    convs = [[{"role": "user", "content": f"{i} " + "grade this answer please " * 10}] for i in range(4)]
    score_choices(loaded, convs[:1], [("1", "2")])
    one = kv_cache.kv_bytes(loaded.prefixes[0][2])
    monkeypatch.setattr(kv_cache, "PREFIX_CACHE_BYTES", int(2.5 * one))
    for c in convs[1:]:
        score_choices(loaded, [c], [("1", "2")])
    kept = [t for _, t, _ in loaded.prefixes]
    assert kept == [tuple(kv_cache.encode(loaded.tokenizer, c)) for c in convs[2:]]
    score_choices(loaded, convs[2:3], [("1", "2")])  # a hit makes it the most recent
    assert [t for _, t, _ in loaded.prefixes] == [kept[1], kept[0]]


def test_shared_prefix_generation_matches_one_by_one(tiny_model_dir, tiny_adapter_dir):
    """Requests that share a system prompt compute it once per batch (prefix laid out at the
    same columns, padding between prefix and tail): greedy answers, token counts and streamed
    tokens are those of each request generated alone, with and without an adapter."""
    from genops_assets.serving import kv_cache
    from genops_assets.serving.adapters import load_model
    from genops_assets.serving.generation import generate

    loaded = load_model(tiny_model_dir, {"cand": tiny_adapter_dir})
    system = "You triage support tickets into JSON with category and priority. " * 6
    batch = [[{"role": "system", "content": system}, {"role": "user", "content": "ticket " + "broken " * i}]
             for i in (1, 7, 3, 12)]
    tok = loaded.tokenizer
    ids = [tok(tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True), add_special_tokens=False)
           ["input_ids"] for m in batch]
    assert kv_cache.shared_prefix_len(ids) >= kv_cache.MIN_SHARED_PREFIX, "the batch must take the prefix path"
    for adapter in (None, "cand"):
        streamed: dict[int, list] = {r: [] for r in range(len(batch))}

        def sink(out: list):
            def on_token(token, finish):
                out.append(token)
                return False
            return on_token

        together = generate(loaded, batch, adapter=adapter, max_new_tokens=10, batch_size=len(batch),
                            token_sinks=[sink(streamed[r]) for r in range(len(batch))])
        alone = [generate(loaded, [m], adapter=adapter, max_new_tokens=10)[0] for m in batch]
        assert [r.text for r in together] == [r.text for r in alone]
        assert [(r.prompt_tokens, r.completion_tokens, r.finish_reason) for r in together] == [
            (r.prompt_tokens, r.completion_tokens, r.finish_reason) for r in alone]
        for r, res in enumerate(alone):
            assert tok.decode([t for t in streamed[r] if t is not None], skip_special_tokens=True).strip() == res.text


def test_server_renders_the_deployed_prompt_and_picks_up_a_new_version(server, tmp_path):
    from dataclasses import asdict

    from genops_assets.lib.guardrails.config import GuardrailConfig, guardrails_version
    from genops_assets.lib.prompts import PromptTemplate

    state_dir = tmp_path / "endpoint"
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError, match="no prompt is deployed for task"):
        client.chat.completions.create(model=TASK, messages=[], extra_body={"prompt_variables": {"message": "x"}})
    with pytest.raises(openai.BadRequestError, match="no prompt is deployed for 'base'"):
        client.chat.completions.create(model="base", messages=[], extra_body={"prompt_variables": {"message": "x"}})

    def deploy(version: int, system: str) -> None:
        t = PromptTemplate(system, "Message: {message}", "message", max_new_tokens=4)
        LocalEndpoint(state_dir=str(state_dir)).publish_prompt(TASK, {"version": version, "template": asdict(t)})

    deploy(1, "Triage the message.")
    r1 = client.chat.completions.create(model=TASK, messages=[], temperature=0,
                                        extra_body={"prompt_variables": {"message": "my camera is offline"}})
    assert r1.model_extra["genops"] == {"task": TASK, "served_by": TASK, "model_version": "1", "engine": "local",
                                       "prompt_version": "1",
                                       "prompt_source": "prompt_variables", "guardrails_input_changed": False,
                                       "guardrails_version": guardrails_version(GuardrailConfig())}
    assert 0 < r1.usage.completion_tokens <= 4  # the prompt's own generation limit
    # The same prompt rendered by the client gives the same prompt tokens; a request with a
    # system message of its own is sent as it is.
    manual = client.chat.completions.create(model=TASK, max_tokens=4, temperature=0, messages=[
        {"role": "system", "content": "Triage the message."},
        {"role": "user", "content": "Message: my camera is offline"}])
    assert manual.usage.prompt_tokens == r1.usage.prompt_tokens
    assert manual.choices[0].message.content == r1.choices[0].message.content
    assert manual.model_extra["genops"]["prompt_version"] is None
    # A bare chat request gets the deployed prompt: its user message is the template's input.
    bare = client.chat.completions.with_raw_response.create(
        model=TASK, temperature=0, messages=[{"role": "user", "content": "my camera is offline"}])
    assert bare.headers["x-genops-prompt-version"] == "1" and bare.headers["x-genops-task"] == TASK
    assert bare.headers["x-genops-model-version"] == "1"
    bare = bare.parse()
    assert (bare.choices[0].message.content, bare.usage.prompt_tokens) == (r1.choices[0].message.content,
                                                                           r1.usage.prompt_tokens)
    assert bare.model_extra["genops"]["prompt_source"] == "bare_chat"

    time.sleep(0.01)
    deploy(2, "Triage the customer message into JSON, please, with every field.")
    r2 = client.chat.completions.create(model=TASK, messages=[], temperature=0,
                                        extra_body={"prompt_variables": {"message": "my camera is offline"}})
    assert r2.model_extra["genops"]["prompt_version"] == "2" and r2.usage.prompt_tokens > r1.usage.prompt_tokens

    with pytest.raises(openai.BadRequestError, match="either messages or prompt_variables"):
        client.chat.completions.create(model=TASK, messages=MSG,
                                       extra_body={"prompt_variables": {"message": "x"}})
    with pytest.raises(openai.BadRequestError, match="needs the variable 'message'"):
        client.chat.completions.create(model=TASK, messages=[], extra_body={"prompt_variables": {"msg": "x"}})
    log = [json.loads(line) for line in (state_dir / "requests.jsonl").read_text().splitlines()]
    answered = [e for e in log if e.get("status") == 200]
    assert [(e["task"], e["prompt_version"], e["prompt_source"]) for e in answered] == [
        (TASK, "1", "prompt_variables"), (TASK, None, None), (TASK, "1", "bare_chat"), (TASK, "2", "prompt_variables")]
    # The bare request is recorded with the input it gave the prompt, as monitoring reads it.
    assert answered[2]["prompt_variables"] == {"message": "my camera is offline"}


def test_an_adapter_trained_on_another_base_is_refused(tmp_path, tiny_model_dir, tiny_adapter_dir):
    import shutil

    from genops_assets.lib.integrity import write_manifest
    from genops_assets.serving.adapters import add_adapter, load_model

    loaded = load_model(str(tiny_model_dir), {})
    foreign = tmp_path / "foreign"
    shutil.copytree(tiny_adapter_dir, foreign)
    cfg = json.loads((foreign / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "some-org/other-model"
    (foreign / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"trained on 'some-org/other-model'.*refusing"):
        add_adapter(loaded, "champion", foreign)
    assert "champion" not in loaded.adapters
    cfg["base_model_name_or_path"] = str(tiny_model_dir)  # the same base, wherever it lives: accepted
    (foreign / "adapter_config.json").write_text(json.dumps(cfg))
    write_manifest(foreign)  # a new adapter: its files recorded again
    add_adapter(loaded, "champion", foreign)
    assert "champion" in loaded.adapters


def _alone(loaded, messages, adapter, max_new_tokens):
    from genops_assets.serving.generation import generate

    return generate(loaded, [messages], adapter=adapter, max_new_tokens=max_new_tokens)[0]


def _admit(batch, key, messages, max_new_tokens, sink=None, temperature=0.0, seed=None):
    return batch.admit([key], [messages], max_new_tokens=[max_new_tokens], temperature=[temperature], top_p=[1.0],
                       stop=[()], seeds=[seed], sinks=[sink])


def test_continuous_batch_rows_join_and_leave_mid_way_with_their_solo_answers(tiny_model_dir, tiny_adapter_dir):
    """Conversations join a running decode batch at different steps, with different limits,
    and leave when they end: each gets exactly the greedy answer it gets alone. A prompt whose
    start was seen before reuses that start's KV cache (the prefix cache) with the same result."""
    from genops_assets.serving import kv_cache
    from genops_assets.serving.adapters import load_model
    from genops_assets.serving.decode import DecodeBatch

    loaded = load_model(tiny_model_dir, {"cand": tiny_adapter_dir})
    system = "You triage support tickets into JSON with category and priority. " * 6
    convs = [[{"role": "system", "content": system}, {"role": "user", "content": "ticket " + "broken " * i}]
             for i in (1, 7, 3, 12, 5)] + [[{"role": "user", "content": "hi"}]]
    limits = [12, 5, 9, 12, 3, 7]
    for adapter in (None, "cand"):
        loaded.prefixes.clear()
        solo = [_alone(loaded, m, adapter, n) for m, n in zip(convs, limits, strict=True)]
        batch = DecodeBatch(loaded, adapter)
        done = dict(batch.admit([0, 1], convs[:2], max_new_tokens=limits[:2], temperature=[0, 0], top_p=[1, 1],
                                stop=[(), ()], seeds=[None, None], sinks=[None, None]))
        assert [len(t) for _, t, _ in loaded.prefixes] == [len(kv_cache.encode(loaded.tokenizer, c))
                                                           for c in convs[:2]], "each admitted prompt is kept"
        steps_seen = set()
        for step in range(40):
            if step in (2, 4, 6, 8):  # one more joins every other step; the cached start is reused
                k = {2: 2, 4: 3, 6: 4, 8: 5}[step]
                done.update(_admit(batch, k, convs[k], limits[k]))
            done.update(batch.step())
            steps_seen.add(len(batch))
            if len(done) == len(convs):
                break
        assert len(batch) == 0 and sorted(done) == list(range(len(convs)))
        assert max(steps_seen) >= 3, "rows decoded together"
        for k, res in done.items():
            assert (res.text, res.completion_tokens, res.finish_reason, res.prompt_tokens) == (
                solo[k].text, solo[k].completion_tokens, solo[k].finish_reason, solo[k].prompt_tokens), k
        batch.close()
    assert len(loaded.prefixes[0][1]) >= kv_cache.MIN_SHARED_PREFIX


def test_continuous_batch_keeps_its_adapter_version_through_a_reload(tiny_model_dir, tiny_adapter_dir, tmp_path):
    """A reload replaces the adapter under its served name while a batch decodes: the batch
    finishes on the version it started with (whose weights are freed afterwards), and a new
    batch uses the new version."""
    import shutil

    from safetensors.torch import load_file, save_file

    from genops_assets.lib.integrity import write_manifest
    from genops_assets.serving.adapters import add_adapter, load_model
    from genops_assets.serving.decode import DecodeBatch

    other = tmp_path / "other"
    shutil.copytree(tiny_adapter_dir, other)
    weights = load_file(other / "adapter_model.safetensors")
    save_file({k: v * -3.0 for k, v in weights.items()}, other / "adapter_model.safetensors")
    write_manifest(other)  # a new adapter: its files recorded again
    loaded = load_model(tiny_model_dir, {"cand": tiny_adapter_dir})
    before = _alone(loaded, MSG, "cand", 10)
    old_internal = loaded.internal["cand"]
    batch = DecodeBatch(loaded, "cand")
    done = dict(_admit(batch, "old", MSG, 10))
    done.update(batch.step())
    add_adapter(loaded, "cand", other)  # the hot reload
    assert not batch.current() and old_internal in loaded.retired
    while len(batch):
        done.update(batch.step())
    assert done["old"].text == before.text
    batch.close()
    assert old_internal not in loaded.retired and old_internal not in loaded.model.peft_config
    after = _alone(loaded, MSG, "cand", 10)
    fresh = DecodeBatch(loaded, "cand")
    got = dict(_admit(fresh, "new", MSG, 10))
    while len(fresh):
        got.update(fresh.step())
    fresh.close()
    assert got["new"].text == after.text


def test_continuous_batch_streams_stops_a_row_on_request_and_samples_reproducibly(tiny_model_dir):
    from genops_assets.serving.adapters import load_model
    from genops_assets.serving.decode import DecodeBatch

    loaded = load_model(tiny_model_dir)
    seen = []

    def stop_after_three(token, finish):
        seen.append((token, finish))
        return len(seen) >= 3

    batch = DecodeBatch(loaded, None)
    done = dict(_admit(batch, "cut", MSG, 10, sink=stop_after_three))
    done.update(_admit(batch, "full", [{"role": "user", "content": "hi"}], 6))
    while len(batch):
        done.update(batch.step())
    assert len(seen) == 3 and done["cut"].completion_tokens == 3 and done["cut"].finish_reason == "stop"
    assert done["full"].text == _alone(loaded, [{"role": "user", "content": "hi"}], None, 6).text

    def sampled(seed):
        b = DecodeBatch(loaded, None)
        out = dict(_admit(b, "s", MSG, 12, temperature=1.3, seed=seed))
        while len(b):
            out.update(b.step())
        return out["s"].text

    assert sampled(7) == sampled(7)
    assert len({sampled(s) for s in range(6)}) > 1, "different seeds draw different answers"


@pytest.mark.parametrize("scheduler", ["continuous", "static"])
def test_a_request_joins_the_running_batch_only_with_continuous_scheduling(tiny_model_dir, scheduler):
    """A short request sent while a long one decodes: continuous scheduling answers it while the
    long one is still decoding; static scheduling makes it wait for the whole batch."""
    from genops_assets.serving.adapters import load_model
    from genops_assets.serving.batching import Batcher, Job

    loaded = load_model(tiny_model_dir)
    batcher = Batcher(loaded, max_batch=4, scheduler=scheduler)
    try:
        long = Job("generate", MSG, None, max_new_tokens=400)
        long_future = batcher.submit(long)
        deadline = time.monotonic() + 60
        while len(long.token_times) < 5 and time.monotonic() < deadline:
            time.sleep(0.005)
        short = Job("generate", [{"role": "user", "content": "hi"}], None, max_new_tokens=2)
        short_result, timing = batcher.submit(short).result(timeout=120)
        long_done = long_future.done()
        long_future.result(timeout=120)
    finally:
        batcher.close()
    assert short_result.completion_tokens <= 2
    if scheduler == "continuous":
        assert not long_done, "the short request was answered while the long one decoded"
        assert timing["batch"] == 2
    else:
        assert long_done, "static scheduling waits for the running batch"
