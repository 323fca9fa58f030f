"""The distilled student on the tiny Llama: layer pruning (all layers kept = the original's
logits; a pruned model loads and generates), teacher labels (cached, invalid answers dropped and
counted), and the distilled_student asset in process from the teacher to a registered variant."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import duckdb
import pytest

from genops_assets.lib.cache import CallCache
from genops_assets.lib.distill import (
    PRUNING_FILE,
    DistillError,
    EngineTeacher,
    Teacher,
    UnlabelledPrompt,
    evenly_kept_layers,
    label_key,
    prune_layers,
    teacher_labels,
)
from genops_assets.lib.formatting import build_messages, format_target
from genops_assets.lib.hashing import sha256_dir
from genops_assets.lib.integrity import files_digest, folder_files, verify_folder
from genops_assets.lib.prompts import PRODUCTION, prompt_registry_name
from genops_assets.lib.tasks import TaskRef, load_task
from resources.feedback_store import DuckDBFeedbackStore
from resources.paths import GenopsHome
from resources.tracking import MlflowTracking
from resources.warehouse import DuckDBWarehouse, mart_schema

ROOT = Path(__file__).resolve().parents[1]
TASK = "support_triage"
TASK_REF = TaskRef(TASK, str(ROOT / "tasks"))


@pytest.fixture(scope="module")
def spec():
    return load_task(ROOT / "tasks", TASK)


@pytest.fixture(scope="module")
def four_layer_dir(tmp_path_factory, tokenizer_dir) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    out = tmp_path_factory.mktemp("four-layers")
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _logits(folder: Path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([[1, 5, 42, 700, 9, 13]])).logits


# -- pruning ---------------------------------------------------------------------------------


def test_layers_are_kept_evenly_with_first_and_last():
    kept = evenly_kept_layers(30, 20)
    assert len(kept) == 20 and kept[0] == 0 and kept[-1] == 29
    assert max(b - a for a, b in itertools.pairwise(kept)) == 2
    assert evenly_kept_layers(4, 4) == [0, 1, 2, 3]
    with pytest.raises(DistillError, match="cannot keep 31 of 30"):
        evenly_kept_layers(30, 31)


def test_pruning_nothing_gives_the_original_logits(four_layer_dir, tmp_path):
    import torch

    pruned = prune_layers(four_layer_dir, 4, tmp_path / "all")
    assert pruned.kept_layers == [0, 1, 2, 3]
    verify_folder(pruned.path)  # its manifest matches what was written
    assert torch.equal(_logits(four_layer_dir), _logits(Path(pruned.path)))


def test_a_pruned_model_has_the_kept_layers_renumbered_and_generates(four_layer_dir, tmp_path, spec):
    import torch
    from safetensors.torch import load_file

    from genops_assets.serving.adapters import load_model
    from genops_assets.serving.generation import generate

    pruned = prune_layers(four_layer_dir, [0, 2, 3], tmp_path / "three")
    out = Path(pruned.path)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 3
    assert json.loads((out / PRUNING_FILE).read_text())["kept_layers"] == [0, 2, 3]
    src, dst = load_file(str(four_layer_dir / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert torch.equal(dst["model.layers.1.self_attn.q_proj.weight"], src["model.layers.2.self_attn.q_proj.weight"])
    assert not any(k.startswith("model.layers.3.") for k in dst)
    assert not torch.equal(_logits(four_layer_dir), _logits(out))
    loaded = load_model(out)
    (result,) = generate(loaded, [build_messages(spec, "my camera is broken")], max_new_tokens=5)
    assert result.completion_tokens > 0


def test_pruning_refuses_layers_the_model_does_not_have(four_layer_dir, tmp_path):
    with pytest.raises(DistillError, match=r"\[7\] are not within the model's 4 layers"):
        prune_layers(four_layer_dir, [0, 7], tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


# -- teacher labels --------------------------------------------------------------------------


class Counting(Teacher):
    """Counts the conversations a real teacher is asked."""

    def __init__(self, inner: Teacher):
        self.inner, self.identity, self.asked = inner, inner.identity, 0

    def answer(self, messages_batch, max_new_tokens):
        self.asked += len(messages_batch)
        return self.inner.answer(messages_batch, max_new_tokens)


def test_teacher_labels_are_cached_so_a_rerun_asks_nothing(tiny_model_dir, tiny_adapter_dir, tmp_path, spec):
    teacher = Counting(EngineTeacher(tiny_model_dir, tiny_adapter_dir, sha256_dir(tiny_model_dir),
                                     files_digest(folder_files(tiny_adapter_dir)), batch_size=3))
    prompts = [UnlabelledPrompt(f"p{i}", text) for i, text in
               enumerate(["refund please", "app crashes", "where is my doorbell", "billing twice"])]
    cache = CallCache(tmp_path / "calls.sqlite")
    first = teacher_labels(prompts, spec, teacher, cache, max_new_tokens=6, batch_size=3)
    assert teacher.asked == 4 and first.teacher_calls == 4 and first.cached == 0
    again = teacher_labels(prompts, spec, teacher, cache, max_new_tokens=6, batch_size=3)
    assert teacher.asked == 4 and again.teacher_calls == 0 and again.cached == 4
    assert again.texts == first.texts
    # Another teacher (the base without the adapter) is a different identity: asked again.
    base = Counting(EngineTeacher(tiny_model_dir, None, sha256_dir(tiny_model_dir), None))
    teacher_labels(prompts[:1], spec, base, cache, max_new_tokens=6)
    assert base.asked == 1


@dataclass
class Scripted(Teacher):
    """A teacher whose answers are given: for testing how answers are judged, not how they are made."""

    replies: dict[str, str]

    @property
    def identity(self):
        return {"scripted": 1}

    def answer(self, messages_batch, max_new_tokens):
        return [self.replies[m[-1]["content"].split("\n")[-1]] for m in messages_batch]


def test_invalid_teacher_answers_are_dropped_and_counted(tmp_path, spec):
    good = {"category": "billing", "priority": "high", "product": "cloud_plan",
            "summary": "Customer was charged twice and wants a refund."}
    prompts = [UnlabelledPrompt("ok", "charged twice"), UnlabelledPrompt("prose", "hello"),
               UnlabelledPrompt("label", "camera"), UnlabelledPrompt("short", "hub")]
    messages = {p.prompt_id: build_messages(spec, p.input_text) for p in prompts}
    replies = {"ok": json.dumps(good), "prose": "Sure! The category is billing.",
               "label": json.dumps(good | {"category": "complaint"}), "short": json.dumps(good | {"summary": "x"})}
    teacher = Scripted({messages[k][-1]["content"].split("\n")[-1]: v for k, v in replies.items()})
    labels = teacher_labels(prompts, spec, teacher, CallCache(tmp_path / "c.sqlite"))
    assert [e.example_id for e in labels.examples] == ["ok"]
    assert labels.examples[0].target == format_target(good, spec.output_fields)
    assert labels.examples[0].messages == messages["ok"]
    reasons = dict(labels.invalid)
    assert set(reasons) == {"prose", "label", "short"}
    assert reasons["prose"] == "not a JSON object"
    assert "category" in reasons["label"] and "summary" in reasons["short"]
    assert labels.counts() == {"labels_valid": 1, "labels_invalid": 3, "teacher_calls": 4, "labels_cached": 0}


# -- the asset -------------------------------------------------------------------------------


def _write_marts(warehouse: DuckDBWarehouse, spec) -> list[dict]:
    rows = [json.loads(line) for line in (spec.root / "examples.jsonl").read_text().splitlines() if line.strip()]
    frame = [{"example_id": f"ex{i:03d}", "input_text": r["message"],
              "output_json": json.dumps({f: r[f] for f in spec.output_fields}),
              "split": "train" if i < 16 else ("validation" if i < 18 else "golden")} for i, r in enumerate(rows[:22])]
    import pandas as pd

    df = pd.DataFrame(frame)
    schema = mart_schema(spec.name)
    con = duckdb.connect(warehouse.path)
    con.execute(f"create schema if not exists {schema}")
    con.register("f", df)
    con.execute(f"create table {schema}.sft_dataset as select example_id, input_text, output_json, split from f "
                "where split <> 'golden'")
    con.execute(f"create table {schema}.golden_eval_dataset as select example_id, input_text, output_json from f "
                "where split = 'golden'")
    con.execute("create schema if not exists feedback")
    con.execute("create table feedback.requests (request_id varchar, ts timestamp, event varchar, task varchar, "
                "input_text varchar)")
    con.execute("insert into feedback.requests values ('r1', now(), 'request', ?, 'my hub is offline since today'), "
                "('r2', now(), 'request', 'other_task', 'not this task'), "
                "('r3', now(), 'request', null, ?)", [spec.name, rows[0]["message"]])
    con.close()
    return frame


@dataclass
class Graph:
    assets: list
    resources: dict
    run_config: dict
    tracking: MlflowTracking

    def materialize(self, **kwargs):
        return dg.materialize(self.assets, resources=self.resources, run_config=self.run_config, **kwargs)


@pytest.fixture()
def graph(tmp_path, tiny_model_dir, tiny_adapter_dir, spec) -> Graph:
    """distilled_student over marts, a request log and a prompt registry in ``tmp_path``, its
    upstream values (the tiny base and adapter as tuned_adapter) given by stand-in assets."""
    from genops_assets.defs.optimization.distill import build_distill_assets

    home = GenopsHome(root=str(tmp_path / "home"))
    warehouse = DuckDBWarehouse(path=str(tmp_path / "warehouse.duckdb"))
    frame = _write_marts(warehouse, spec)
    tracking = MlflowTracking(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                              artifact_root=(tmp_path / "artifacts").as_uri())
    ref, _ = tracking.register_prompt(prompt_registry_name(TASK), spec.prompt, "the task folder's prompt")
    tracking.set_prompt_alias(ref.name, PRODUCTION, ref.version)
    base = {"name": "tiny", "path": str(tiny_model_dir), "folder_digest": sha256_dir(tiny_model_dir)}
    adapter = {"adapter_dir": str(tiny_adapter_dir), "adapter_digest": files_digest(folder_files(tiny_adapter_dir)),
               "version": "7", "model_name": f"genops-{TASK}"}
    # The random tiny teacher never answers JSON; the cache holds good answers for most prompts
    # (as an earlier run of a capable teacher would have left them); the rest it answers itself.
    teacher_id = EngineTeacher(base["path"], adapter["adapter_dir"], base["folder_digest"],
                               adapter["adapter_digest"]).identity
    cache = CallCache(home.cache_dir / "calls.sqlite")
    template = tracking.resolve_prompt(spec).template
    for i, row in enumerate(frame):
        if row["split"] == "validation":
            continue  # answered by the tiny teacher itself: invalid, dropped and counted
        if row["split"] == "golden" and i % 2:
            continue
        m = build_messages(spec, row["input_text"], prompt=template)
        cache.put(label_key(teacher_id, m, spec.max_new_tokens), "distill_label", {"text": row["output_json"]})

    @dg.asset(name="base_model")
    def base_model_value() -> dict:
        return base

    @dg.asset(key=[TASK, "tuned_adapter"])
    def tuned_value() -> dict:
        return adapter

    (asset,) = build_distill_assets(TASK_REF)
    assert asset.group_names_by_key[asset.key] == f"{TASK}_optimization"
    resources = {"warehouse": warehouse, "feedback_store": DuckDBFeedbackStore(warehouse=warehouse), "home": home,
                 "mlflow": tracking,
                 "io_manager": dg.FilesystemIOManager(base_dir=str(tmp_path / "io"))}
    run_config = {"ops": {TASK_REF.step("distilled_student"): {"config": {"student_layers": 1, "student_steps": 2}}}}
    return Graph([base_model_value, tuned_value, asset], resources, run_config, tracking)


def test_distilled_student_materializes_and_is_registered_with_its_lineage(graph):
    tracking = graph.tracking
    result = graph.materialize()
    assert result.success
    value = result.output_for_node(TASK_REF.step("distilled_student"))
    (variant,) = value["variants"]
    assert variant["name"] == "distilled" and variant["format"] == "safetensors"
    student = Path(variant["path"])
    verify_folder(student)
    assert json.loads((student / "config.json").read_text())["num_hidden_layers"] == 1
    assert variant["digest"] == sha256_dir(student)
    # 16 train + 2 validation inputs and 1 logged request of this task (the one with no task repeats
    # ex000, the other task's is not read); the validation inputs and the request were not cached
    assert value["prompts_unique"] == 19 and value["prompts_requests"] == 2
    assert value["labels_valid"] == 16 and value["labels_invalid"] == 3
    assert 0.0 <= value["student_vs_teacher_mean_field_exact_match"] <= 1.0
    # Half the golden inputs have cached answers (the references); the tiny teacher's own are not JSON.
    assert value["teacher_vs_reference_mean_field_exact_match"] == 0.5
    assert value["golden_teacher_invalid"] == 2.0
    assert value["speedup"] > 0

    run = tracking.client().get_run(value["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["layers_kept"] == "1" and run.data.params["steps"] == "2"
    assert run.data.params["labels_invalid"] == "3" and run.data.params["prompts_requests"] == "2"
    assert "student_vs_teacher_mean_field_exact_match" in run.data.metrics
    version = tracking.get_version(f"genops-{TASK}-variants", variant["version"])
    assert version.tags["genops.variant"] == "distilled"
    assert version.tags["genops.source_version"] == "7"
    assert version.run_id == value["mlflow_run_id"]

    # Same inputs: nothing is trained or registered again, and the teacher is not asked again.
    again = graph.materialize()
    value2 = again.output_for_node(TASK_REF.step("distilled_student"))
    assert value2["variants"][0]["version"] == variant["version"]
    assert value2["teacher_calls"] == 0
    mat = again.asset_materializations_for_node(TASK_REF.step("distilled_student"))[0]
    assert mat.metadata["reused"].value is True


def test_a_failed_training_ends_the_mlflow_run_failed(graph, monkeypatch):
    import genops_assets.defs.optimization.distill as distill

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory in the student's training")

    monkeypatch.setattr(distill, "train_student", broken)
    result = graph.materialize(raise_on_error=False)
    assert not result.success
    (run,) = graph.tracking.client().search_runs([graph.tracking.experiment_id(f"genops/{TASK}")])
    assert run.info.status == "FAILED" and run.data.tags["genops.variant"] == "distilled"
    assert graph.tracking.client().search_model_versions(f"name = 'genops-{TASK}-variants'") == []


def test_an_openai_compatible_endpoint_can_be_the_teacher(tmp_path, spec):
    """The endpoint teacher speaks the chat-completions protocol over HTTP (a local server that
    answers every request with one fixed JSON object and records what it was sent)."""
    import http.server
    import threading

    from genops_assets.lib.distill import EndpointTeacher

    answer = {"category": "shipping", "priority": "medium", "product": "doorbell",
              "summary": "Customer's doorbell order has not moved since the label was created."}
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.path, body))
            reply = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                                "choices": [{"index": 0, "finish_reason": "stop", "message": {
                                    "role": "assistant", "content": json.dumps(answer)}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    server = next(s for port in range(19400, 19500) if (s := _try_bind(http.server.ThreadingHTTPServer, port,
                                                                      Handler)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        teacher = EndpointTeacher(f"http://127.0.0.1:{server.server_port}/v1", "teacher-model")
        prompts = [UnlabelledPrompt("a", "where is my doorbell"), UnlabelledPrompt("b", "tracking stuck")]
        cache = CallCache(tmp_path / "calls.sqlite")
        labels = teacher_labels(prompts, spec, teacher, cache, max_new_tokens=40)
        assert labels.counts()["labels_valid"] == 2 and labels.answers["a"] == answer
        path, body = seen[0]
        assert path == "/v1/chat/completions" and body["model"] == "teacher-model"
        assert body["max_tokens"] == 40 and body["temperature"] == 0.0
        assert body["messages"] == build_messages(spec, "where is my doorbell")
        assert teacher_labels(prompts, spec, teacher, cache, max_new_tokens=40).teacher_calls == 0
        assert len(seen) == 2
    finally:
        server.shutdown()
        server.server_close()


def _try_bind(cls, port, handler):
    try:
        return cls(("127.0.0.1", port), handler)
    except OSError:
        return None
