"""4-bit / 8-bit loading through bitsandbytes: the one conversion to BitsAndBytesConfig, the
version key, the errors of a machine that cannot quantize, and real QLoRA training and quantized
inference on the tiny Llama with bitsandbytes' CPU backend."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pandas as pd
import pytest
from resume_worker import DATA_DIGEST, examples, train_config

from genops_assets.defs.tuning.config import TuningConfig
from genops_assets.lib import quantization as q
from genops_assets.lib.training import LoraTrainConfig, train_lora
from genops_assets.lib.tuning import plan_tuning

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def no_bitsandbytes(monkeypatch):
    """bitsandbytes made unimportable (as on a machine without it)."""
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    q._probe.cache_clear()
    yield
    q._probe.cache_clear()


def cpu_backend_problem() -> str | None:
    return q.quantization_problem("nf4", "cpu") or q.quantization_problem("int8", "cpu")


needs_cpu_backend = pytest.mark.skipif(cpu_backend_problem() is not None,
                                       reason=f"bitsandbytes CPU backend: {cpu_backend_problem()}")


def test_nf4_config_fields():
    import torch

    cfg = q.to_bnb_config("nf4", "bfloat16", double_quant=True, device="cpu")
    assert cfg.load_in_4bit and not cfg.load_in_8bit
    assert cfg.bnb_4bit_quant_type == "nf4"
    assert cfg.bnb_4bit_compute_dtype == torch.bfloat16
    assert cfg.bnb_4bit_use_double_quant is True
    single = q.to_bnb_config("nf4", "float16", double_quant=False, device="cpu")
    assert single.bnb_4bit_compute_dtype == torch.float16 and single.bnb_4bit_use_double_quant is False
    # auto: bfloat16 only on a GPU that has it; a CPU computes in float32
    assert q.to_bnb_config("nf4", "auto", device="cpu").bnb_4bit_compute_dtype == torch.float32


def test_int8_and_none_config():
    cfg = q.to_bnb_config("int8", "bfloat16", device="cpu")
    assert cfg.load_in_8bit and not cfg.load_in_4bit
    assert q.to_bnb_config("none") is None
    with pytest.raises(ValueError, match="quantization: unknown quantization 'q4'"):
        q.to_bnb_config("q4")
    with pytest.raises(ValueError, match="unknown compute dtype 'fp8'"):
        q.to_bnb_config("nf4", "fp8", device="cpu")


def test_tuning_config_reaches_the_library():
    cfg = TuningConfig(quantization="nf4", compute_dtype="bfloat16", double_quant=False).to_train_config()
    assert (cfg.quantization, cfg.compute_dtype, cfg.double_quant) == ("nf4", "bfloat16", False)
    with pytest.raises(Exception, match="quantization"):
        TuningConfig(quantization="q4")
    with pytest.raises(ValueError, match="unknown quantization 'q4'"):
        LoraTrainConfig(quantization="q4")
    with pytest.raises(ValueError, match="deepspeed_config"):
        LoraTrainConfig(quantization="nf4", deepspeed_config="ds.json")


def test_version_key_changes_with_quantization():
    sft = pd.DataFrame({"example_id": ["a", "b"], "input_text": ["x", "y"], "output_json": ["{}", "{}"],
                        "split": ["train", "validation"]})

    def key(**changes) -> str:
        params = dataclasses.replace(LoraTrainConfig(), **changes).as_params()
        return plan_tuning(sft, "base", "prompt", params, "code").version_key

    keys = {key(), key(quantization="nf4"), key(quantization="int8"), key(quantization="nf4", compute_dtype="float32"),
            key(quantization="nf4", double_quant=False)}
    assert len(keys) == 5
    # fields that do not apply to a run leave its key alone
    assert key(quantization="int8") == key(quantization="int8", compute_dtype="float32", double_quant=False)
    assert key() == key(compute_dtype="float32")
    params = LoraTrainConfig(quantization="nf4").as_params()
    assert (params["quantization"], params["compute_dtype"], params["double_quant"]) == ("nf4", "auto", True)


def test_error_without_bitsandbytes_names_the_setting(no_bitsandbytes):
    assert q.quantization_problem("none", "cpu") is None
    with pytest.raises(q.QuantizationUnavailable) as err:
        q.require_quantization("nf4", "tuning config quantization", "cpu")
    message = str(err.value)
    assert "tuning config quantization='nf4'" in message and "bitsandbytes is not installed" in message
    assert "Set tuning config quantization to 'none'" in message


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a CUDA device")
def test_error_without_cuda(tiny_model_dir):
    from genops_assets.serving.adapters import load_model

    with pytest.raises(q.QuantizationUnavailable, match="no CUDA device is visible"):
        load_model(tiny_model_dir, quantization="nf4", device="cuda")


def test_quantized_training_fails_before_any_data_work(no_bitsandbytes, tiny_model_dir, tmp_path):
    tr, val = examples()
    cfg = dataclasses.replace(train_config(), quantization="nf4")
    with pytest.raises(q.QuantizationUnavailable, match="quantization='nf4'"):
        train_lora(tiny_model_dir, tr, val, cfg, tmp_path / "adapter", tmp_path / "work", data_digest=DATA_DIGEST)
    # no checkpoint record, no adapter: nothing was started in full precision instead
    assert not (tmp_path / "work").exists() and not (tmp_path / "adapter").exists()


def test_endpoint_refuses_to_start_quantized(no_bitsandbytes, tiny_model_dir, tmp_path):
    from genops_assets.serving import cli

    (tmp_path / "admin_token").write_text("t")
    with pytest.raises(SystemExit, match="genops endpoint: quantization='int8' needs bitsandbytes"):
        cli.main(["--base-model", str(tiny_model_dir), "--state-dir", str(tmp_path), "--port", "19601",
                  "--quantization", "int8"])


def test_quantized_identity():
    assert q.quantized_identity("abc", "none") == "abc"
    assert len({q.quantized_identity("abc", name) for name in q.QUANTIZATIONS}) == 3


@pytest.fixture(scope="module")
def tiny64_dir(tmp_path_factory, tokenizer_dir):
    """A 2-layer Llama with hidden size 64: bitsandbytes' CPU inference layout for 4-bit weights
    needs input features in whole blocks of 64 (the real models have them)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    out = tmp_path_factory.mktemp("tiny64")
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _first_loss(result) -> float:
    return next(h["loss"] for h in result.history if "loss" in h)


@needs_cpu_backend
@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_quantized_lora_trains_on_cpu(quantization, tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    tr, val = examples(8, 2)
    base = dataclasses.replace(train_config(), max_steps=2, eval_every=0, save_every=2, warmup_steps=0)
    full = train_lora(tiny_model_dir, tr, val, base, tmp_path / "full", tmp_path / "wfull", data_digest=DATA_DIGEST)
    cfg = dataclasses.replace(base, quantization=quantization, gradient_checkpointing=True)
    result = train_lora(tiny_model_dir, tr, val, cfg, tmp_path / "adapter", tmp_path / "work", data_digest=DATA_DIGEST)
    assert result.steps == 2 and result.last("eval_loss") is not None
    # the quantized base gives another loss than the full-precision one from the same start
    assert _first_loss(result) != pytest.approx(_first_loss(full), abs=1e-7)
    assert abs(_first_loss(result) - _first_loss(full)) < 0.5
    weights = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert any("lora_B" in k and float(v.abs().max()) > 0 for k, v in weights.items())
    recorded = json.loads((tmp_path / "work" / "resume.json").read_text())["config"]
    assert recorded["quantization"] == quantization


@needs_cpu_backend
def test_evaluation_does_not_change_nf4_training(tiny64_dir, tmp_path):
    """An evaluation between steps must leave the training as it was: same adapter weights as a
    run evaluated only at the end."""
    from safetensors.torch import load_file

    tr, val = examples(8, 2)
    # dropout off: an evaluation moves the random state LoRA dropout draws from, quantized or not
    cfg = dataclasses.replace(train_config(), max_steps=3, save_every=3, warmup_steps=0, batch_size=2,
                              dropout=0.0, quantization="nf4")
    runs = {}
    for every in (1, 0):
        root = tmp_path / f"eval{every}"
        train_lora(tiny64_dir, tr, val, dataclasses.replace(cfg, eval_every=every), root / "adapter", root / "work",
                   data_digest=DATA_DIGEST)
        runs[every] = load_file(str(root / "adapter" / "adapter_model.safetensors"))
    assert runs[1].keys() == runs[0].keys()
    for name, tensor in runs[0].items():
        assert float((runs[1][name] - tensor).abs().max()) < 1e-6, name


@needs_cpu_backend
@pytest.mark.parametrize("quantization,layer", [("nf4", "Linear4bit"), ("int8", "Linear8bitLt")])
def test_quantized_inference_on_cpu(quantization, layer, tiny64_dir, tmp_path):
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from genops_assets.lib.integrity import write_manifest
    from genops_assets.lib.training import to_lora_config
    from genops_assets.serving.adapters import load_model, selected
    from genops_assets.serving.generation import generate

    torch.manual_seed(1)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny64_dir), to_lora_config(train_config()))
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(adapter_dir, safe_serialization=True)
    write_manifest(adapter_dir)
    full = load_model(tiny64_dir, {"t": adapter_dir}, dtype="float32", device="cpu")
    quant = load_model(tiny64_dir, {"t": adapter_dir}, dtype="float32", device="cpu", quantization=quantization)
    proj = quant.model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(proj.base_layer).__name__ == layer
    ids = full.tokenizer("Ticket 3: my parcel is late", return_tensors="pt")["input_ids"]
    with selected(full, "t") as m:
        ref = m(input_ids=ids).logits
    with selected(quant, "t") as m:
        got = m(input_ids=ids).logits
    assert torch.isfinite(got).all()
    diff = float((got - ref).abs().max())
    assert 0 < diff < 0.5 * float(ref.abs().max())
    messages = [[{"role": "user", "content": "Ticket 3: my parcel is late"}]]
    answer = generate(quant, messages, adapter="t", max_new_tokens=4)[0]
    assert answer.completion_tokens > 0


# -- the tuning asset ---------------------------------------------------------------------------

TASK = "support_triage"


@pytest.fixture()
def tuning_res(tmp_path):
    """Resources of the tuning asset on a fresh data directory: an MLflow store with the task's
    prompt as `production`, and a warehouse whose sft_dataset holds 8 train and 4 validation rows."""
    import dagster as dg
    import duckdb

    from genops_assets.lib.prompts import PRODUCTION, prompt_registry_name
    from genops_assets.lib.tasks import load_task, read_raw_file
    from resources.paths import GenopsHome
    from resources.storage import LocalStorage
    from resources.tracking import MlflowTracking
    from resources.trainer import SubprocessTrainer
    from resources.warehouse import DuckDBWarehouse, mart_schema

    spec = load_task(REPO / "tasks", TASK)
    tracking = MlflowTracking(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                              artifact_root=(tmp_path / "artifacts").as_uri())
    ref, _ = tracking.register_prompt(prompt_registry_name(TASK), spec.prompt, "the task folder's prompt")
    tracking.set_prompt_alias(ref.name, PRODUCTION, ref.version)
    warehouse = DuckDBWarehouse(path=str(tmp_path / "warehouse.duckdb"))
    raw = [ex for path in spec.raw_files() for ex in read_raw_file(path, spec)][:12]
    sft = pd.DataFrame({"example_id": [f"ex{i}" for i in range(len(raw))],
                        "input_text": [ex.input_text for ex in raw],
                        "output_json": [json.dumps(ex.output) for ex in raw],
                        "split": ["train" if i < 8 else "validation" for i in range(len(raw))]})
    with duckdb.connect(warehouse.path) as con:
        con.execute(f"create schema {mart_schema(TASK)}")
        con.register("sft", sft)
        con.execute(f"create table {mart_schema(TASK)}.sft_dataset as select * from sft")
    return {"warehouse": warehouse, "mlflow": tracking, "home": GenopsHome(root=str(tmp_path / "home")),
            "storage": LocalStorage(root=str(tmp_path / "home" / "objects")),
            "io_manager": dg.FilesystemIOManager(base_dir=str(tmp_path / "io")), "trainer": SubprocessTrainer()}


def _materialize_tuning(res: dict, base_dir, config: dict):
    import dagster as dg

    from genops_assets.defs.tuning.assets import build_tuning_assets
    from genops_assets.lib.hashing import sha256_dir
    from genops_assets.lib.tasks import TaskRef

    ref = TaskRef(TASK, str(REPO / "tasks"))
    (tuned_adapter,) = build_tuning_assets(ref)

    @dg.asset(key="base_model")
    def base_model() -> dict:
        return {"name": "tiny64", "path": str(base_dir), "folder_digest": sha256_dir(base_dir)}

    assert dg.materialize([base_model], resources=res).success
    return dg.materialize([base_model, tuned_adapter], selection=[tuned_adapter], resources=res,
                          raise_on_error=False,
                          run_config={"ops": {ref.step("tuned_adapter"): {"config": config}}})


def _runs(tracking) -> list:
    from mlflow.entities import ViewType

    client = tracking.client()
    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    return client.search_runs(experiments, run_view_type=ViewType.ALL)


def test_tuning_asset_refuses_before_any_data_work(no_bitsandbytes, tuning_res, tiny64_dir):
    import duckdb

    from resources.warehouse import mart_schema

    con = duckdb.connect(tuning_res["warehouse"].path)
    con.execute(f"drop table {mart_schema(TASK)}.sft_dataset")
    con.close()
    result = _materialize_tuning(tuning_res, tiny64_dir, {"quantization": "nf4", "max_steps": 1})
    assert not result.success
    errors = [e.event_specific_data.error.to_string() for e in result.get_step_failure_events()]
    # the quantization error, not the missing table's: the warehouse was never read
    assert errors and all("tuning config quantization='nf4'" in e for e in errors), errors
    assert _runs(tuning_res["mlflow"]) == []


@needs_cpu_backend
def test_tuning_asset_trains_qlora_and_logs_the_quantization(tuning_res, tiny64_dir):
    config = {"quantization": "nf4", "compute_dtype": "float32", "max_steps": 1, "batch_size": 4,
              "eval_every": 0, "save_every": 1, "log_every": 1, "rank": 4, "alpha": 8}
    result = _materialize_tuning(tuning_res, tiny64_dir, config)
    assert result.success
    (run,) = _runs(tuning_res["mlflow"])
    assert run.info.status == "FINISHED"
    assert (run.data.params["quantization"], run.data.params["compute_dtype"],
            run.data.params["double_quant"]) == ("nf4", "float32", "True")


def test_evaluation_asset_refuses_before_any_data_work(no_bitsandbytes, tuning_res, tiny64_dir):
    import dagster as dg

    from genops_assets.defs.evaluation.assets import build_evaluation_assets
    from genops_assets.lib.tasks import TaskRef

    ref = TaskRef(TASK, str(REPO / "tasks"))
    eval_report = build_evaluation_assets(ref)[0]

    @dg.asset(key="base_model")
    def base_model() -> dict:
        return {"name": "tiny64", "path": str(tiny64_dir), "folder_digest": "base-digest"}

    @dg.asset(key=[TASK, "tuned_adapter"])
    def tuned_adapter() -> dict:
        return {"model_name": f"genops-{TASK}", "version": "1", "adapter_dir": "unused", "adapter_digest": "a"}

    # the warehouse has no golden_eval_dataset: reading it would fail with another error
    assert dg.materialize([base_model, tuned_adapter], resources=tuning_res).success
    result = dg.materialize([base_model, tuned_adapter, eval_report], selection=[eval_report],
                            resources={**tuning_res, "judge": object()}, raise_on_error=False,
                            run_config={"ops": {ref.step("eval_report"): {"config": {"quantization": "int8"}}}})
    assert not result.success
    errors = [e.event_specific_data.error.to_string() for e in result.get_step_failure_events()]
    assert errors and all("eval config quantization='int8'" in e for e in errors), errors
