"""Merged variant (logits equal the unmerged model's), GGUF export of the tiny Llama, and the
lineage of variants in the registry."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from genops_assets.lib.base_model import find_embedded_gguf
from genops_assets.lib.gguf_export import export_gguf, rope_rows_to_gguf
from genops_assets.lib.integrity import MANIFEST, IntegrityError, verify_folder
from genops_assets.lib.variants import VariantError, VariantFiles, gguf_file, merge_adapter
from resources.tracking import MlflowTracking, variant_model_name

PROMPTS = ["Hello there", "The order never arrived and I want a refund.", "{\"label\": \"billing\"}"]


def quiet(_msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def merged(tiny_model_dir, tiny_adapter_dir, tmp_path_factory) -> VariantFiles:
    return merge_adapter(tiny_model_dir, tiny_adapter_dir, tmp_path_factory.mktemp("v") / "merged", log=quiet)


def last_logits(model, tokenizer, prompt: str):
    import torch

    with torch.no_grad():
        return model(**tokenizer(prompt, return_tensors="pt")).logits[0]


def test_merged_logits_equal_the_unmerged_adapter_on_the_base(merged, tiny_model_dir, tiny_adapter_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    plain = [last_logits(base, tok, p) for p in PROMPTS]
    unmerged = PeftModel.from_pretrained(base, tiny_adapter_dir).eval()
    merged_model = AutoModelForCausalLM.from_pretrained(merged.path, dtype=torch.float32).eval()
    for prompt, before in zip(PROMPTS, plain, strict=True):
        want, got = last_logits(unmerged, tok, prompt), last_logits(merged_model, tok, prompt)
        assert torch.allclose(got, want, atol=1e-4, rtol=0), (prompt, (got - want).abs().max())
        assert (want - before).abs().max() > 1e-2  # the adapter changes the outputs: the check can fail

    assert merged.name == "merged" and merged.format == "safetensors" and merged.parent is None
    assert merged.size_bytes == sum(p.stat().st_size for p in tiny_model_dir.glob("*.safetensors"))
    assert json.loads((tiny_model_dir / "config.json").read_text())["tie_word_embeddings"]
    verify_folder(merged.path)
    names = {p.name for p in Path(merged.path).iterdir()}
    assert {"config.json", "tokenizer.json", "model.safetensors", MANIFEST} <= names
    assert not any(n.startswith("adapter_") for n in names)


def test_merge_refuses_an_adapter_changed_after_it_was_recorded(tiny_model_dir, tiny_adapter_dir, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_adapter_dir, adapter)
    (adapter / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text() + " ")
    with pytest.raises(VariantError, match=r"merge: .*adapter_config\.json was changed"):
        merge_adapter(tiny_model_dir, adapter, tmp_path / "merged", log=quiet)
    assert not (tmp_path / "merged").exists()


def test_gguf_export_of_the_tiny_model_holds_its_weights_in_gguf_order(merged, tmp_path):
    import gguf
    from safetensors.numpy import load_file

    messages: list[str] = []
    f16 = export_gguf(merged.path, find_embedded_gguf(), tmp_path / "f16", log=messages.append)
    assert (f16.name, f16.format, f16.engine, f16.parent) == ("merged_f16", "gguf", "llamacpp", "merged")
    assert any("export" in m and "done in" in m for m in messages)
    verify_folder(f16.path)
    reader = gguf.GGUFReader(gguf_file(f16.path))
    template = gguf.GGUFReader(find_embedded_gguf())
    fields = reader.fields
    assert fields["llama.block_count"].contents() == 2 and fields["llama.embedding_length"].contents() == 32
    assert fields["llama.attention.head_count"].contents() == 4
    assert fields["llama.attention.head_count_kv"].contents() == 2
    assert fields["llama.feed_forward_length"].contents() == 64
    assert fields["llama.rope.dimension_count"].contents() == 8
    assert fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_F16)
    for key in ("tokenizer.chat_template", "tokenizer.ggml.merges", "tokenizer.ggml.tokens", "general.name"):
        assert fields[key].contents() == template.fields[key].contents(), key

    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors  # tied, as the template
    assert len(tensors) == 2 + 2 * 9
    hf = load_file(f"{merged.path}/model.safetensors")
    q = tensors["blk.1.attn_q.weight"]
    assert q.tensor_type == gguf.GGMLQuantizationType.F16
    want = rope_rows_to_gguf(hf["model.layers.1.self_attn.q_proj.weight"], 4)
    np.testing.assert_allclose(np.asarray(q.data, dtype=np.float32), want, atol=1e-3)
    k = np.asarray(tensors["blk.0.attn_k.weight"].data, dtype=np.float32)
    np.testing.assert_allclose(k, rope_rows_to_gguf(hf["model.layers.0.self_attn.k_proj.weight"], 2), atol=1e-3)
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32


def test_rope_rows_pair_each_half_of_a_head():
    w = np.arange(8 * 2, dtype=np.float32).reshape(8, 2)  # 2 heads of 4 rows
    got = rope_rows_to_gguf(w, 2)[:, 0].tolist()
    assert got == [0, 4, 2, 6, 8, 12, 10, 14]
    with pytest.raises(ValueError, match="3 heads"):
        rope_rows_to_gguf(w, 3)


def test_gguf_file_names_the_folder_when_it_holds_no_single_gguf(tmp_path):
    with pytest.raises(VariantError, match="found 0"):
        gguf_file(tmp_path)
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    (tmp_path / "b.gguf").write_bytes(b"GGUF")
    with pytest.raises(VariantError, match=r"found 2 \(a.gguf, b.gguf\)"):
        gguf_file(tmp_path)


def fake_quantized(src: VariantFiles, out, name: str) -> VariantFiles:
    """A GGUF folder standing in for a quantized file (the registry only sees files)."""
    from genops_assets.lib.integrity import write_manifest
    from genops_assets.lib.variants import describe

    out.mkdir()
    shutil.copy(gguf_file(src.path), out / f"model.{name}.gguf")
    write_manifest(out)
    return describe(out, name, "gguf", "llamacpp", "merged")


def test_variant_lineage_is_read_back_from_the_registry_and_registration_is_idempotent(merged, tmp_path):
    tracking = MlflowTracking(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                              artifact_root=(tmp_path / "artifacts").as_uri())
    f16 = export_gguf(merged.path, find_embedded_gguf(), tmp_path / "f16", log=quiet)
    refs = {}
    with tracking.run("genops/demo", "variants", {}) as run_id:
        refs["merged"] = tracking.register_variant("demo", merged, run_id, "3", "key-merged")
        for name in ("q8_0", "q4_k_m"):
            files = fake_quantized(f16, tmp_path / name, name)
            refs[name] = tracking.register_variant("demo", files, run_id, "3", f"key-{name}",
                                                   {"genops.parent_version": refs["merged"].version})
        again = tracking.register_variant("demo", merged, run_id, "3", "key-merged")
    assert again.version == refs["merged"].version
    model = variant_model_name("demo")
    assert model == "genops-demo-variants"
    assert len(tracking.client().search_model_versions(f"name = '{model}'")) == 3

    for name, ref in refs.items():
        tags = tracking.get_version(model, ref.version).tags
        assert tags["genops.variant"] == name
        assert tags["genops.source_model"] == "genops-demo" and tags["genops.source_version"] == "3"
        assert tags["genops.parent_variant"] == ("" if name == "merged" else "merged")
        assert tags["genops.format"] == ("safetensors" if name == "merged" else "gguf")
    assert tracking.get_version(model, refs["q8_0"].version).tags["genops.parent_version"] == refs["merged"].version

    cache = tmp_path / "cache"
    fetched = tracking.fetch_variant(cache, "demo", refs["q4_k_m"].version)
    verify_folder(fetched)
    assert gguf_file(fetched).name == "model.q4_k_m.gguf"
    with open(gguf_file(fetched), "r+b") as fh:  # the cached copy changed after download
        fh.seek(100)
        byte = fh.read(1)
        fh.seek(100)
        fh.write(bytes([byte[0] ^ 1]))
    with pytest.raises(IntegrityError, match=f"{model} v{refs['q4_k_m'].version}.*model.q4_k_m.gguf"):
        tracking.fetch_variant(cache, "demo", refs["q4_k_m"].version)


# -- the assets ------------------------------------------------------------------------------

TASK = "support_triage"


def variant_graph(tiny_model_dir, adapter_dir):
    import dagster as dg

    from genops_assets.defs.optimization.variants import build_variant_assets
    from genops_assets.lib.hashing import sha256_dir
    from genops_assets.lib.tasks import TaskRef

    @dg.asset(name="base_model")
    def base_model() -> dict:
        return {"path": str(tiny_model_dir), "folder_digest": sha256_dir(tiny_model_dir)}

    @dg.asset(key=[TASK, "tuned_adapter"])
    def tuned_adapter() -> dict:
        return {"adapter_dir": str(adapter_dir), "adapter_digest": sha256_dir(adapter_dir), "version": "7"}

    task = TaskRef(TASK, str(Path(__file__).resolve().parents[1] / "tasks"))
    return [base_model, tuned_adapter, *build_variant_assets(task)]


def materialize(assets, tmp_path, selection):
    import dagster as dg

    from resources.paths import GenopsHome

    tracking = MlflowTracking(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                              artifact_root=(tmp_path / "artifacts").as_uri())
    result = dg.materialize(assets, selection=selection, raise_on_error=False,
                            resources={"mlflow": tracking, "home": GenopsHome(root=str(tmp_path / "home"))})
    return result, tracking


def run_statuses(tracking: MlflowTracking) -> list[str]:
    exp = tracking.client().get_experiment_by_name(f"genops/{TASK}")
    return sorted(r.info.status for r in tracking.client().search_runs([exp.experiment_id]))


def test_merged_model_asset_registers_once_and_reuses_the_version(tiny_model_dir, tiny_adapter_dir, tmp_path):
    assets = variant_graph(tiny_model_dir, tiny_adapter_dir)
    selection = ["base_model", f"{TASK}/tuned_adapter", f"{TASK}/merged_model"]
    first, tracking = materialize(assets, tmp_path, selection)
    assert first.success
    value = first.output_for_node(f"{TASK}__merged_model")
    (row,) = value["variants"]
    assert row["name"] == "merged" and row["version"] == "1" and row["load_check"]["engine"] == "transformers"
    meta = first.asset_materializations_for_node(f"{TASK}__merged_model")[0].metadata
    assert meta["merged_version"].value == "1" and meta["merged_digest"].value == row["digest"]
    assert meta["merged_size_mb"].value > 0
    tags = tracking.get_version(variant_model_name(TASK), "1").tags
    assert tags["genops.source_version"] == "7" and tags["genops.variant"] == "merged"

    again, _ = materialize(assets, tmp_path, selection)
    assert again.success
    assert again.output_for_node(f"{TASK}__merged_model")["variants"][0]["version"] == "1"
    assert len(tracking.client().search_model_versions(f"name = '{variant_model_name(TASK)}'")) == 1
    assert run_statuses(tracking) == ["FINISHED", "FINISHED"]


def test_a_variant_that_fails_to_build_fails_the_asset_naming_file_and_step(tiny_model_dir, tiny_adapter_dir,
                                                                            tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_adapter_dir, adapter)
    with open(adapter / "adapter_model.safetensors", "r+b") as fh:
        fh.seek(-1, 2)
        fh.write(b"\x01")
    result, tracking = materialize(variant_graph(tiny_model_dir, adapter), tmp_path,
                                   ["base_model", f"{TASK}/tuned_adapter", f"{TASK}/merged_model"])
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure).step_failure_data.error.cause
    assert "merge:" in failure.message and "adapter_model.safetensors was changed" in failure.message
    assert run_statuses(tracking) == ["FAILED"]
    assert not tracking.client().search_model_versions(f"name = '{variant_model_name(TASK)}'")


def test_quantized_models_asset_builds_q8_0_and_q4_k_m_from_the_merged_model(tiny_model_dir, tiny_adapter_dir,
                                                                             tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is the quantizer (an optional install)")
    result, tracking = materialize(variant_graph(tiny_model_dir, tiny_adapter_dir), tmp_path, "*")
    assert result.success
    merged_version = result.output_for_node(f"{TASK}__merged_model")["variants"][0]["version"]
    rows = result.output_for_node(f"{TASK}__quantized_models")["variants"]
    assert [r["name"] for r in rows] == ["q8_0", "q4_k_m"]
    for row in rows:
        assert row["parent"] == "merged" and row["engine"] == "llamacpp" and row["load_check"]["engine"] == "llamacpp"
        tags = tracking.get_version(variant_model_name(TASK), row["version"]).tags
        assert tags["genops.parent_variant"] == "merged" and tags["genops.parent_version"] == merged_version
        assert gguf_file(row["path"]).name == f"model.{row['name']}.gguf"
    assert rows[1]["size_bytes"] < rows[0]["size_bytes"]
    assert run_statuses(tracking) == ["FINISHED", "FINISHED"]


def test_the_variant_assets_build_without_importing_ml_libraries_or_llama_cpp():
    import subprocess
    import sys

    code = ("import sys, json; from genops_assets.defs.optimization.variants import build_variant_assets; "
            "from genops_assets.lib.tasks import TaskRef; "
            "a = build_variant_assets(TaskRef('support_triage', 'tasks')); "
            "print(json.dumps([[k.to_user_string() for x in a for k in x.keys], "
            "[m for m in ('torch', 'transformers', 'peft', 'llama_cpp') if m in sys.modules]]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, timeout=120, check=True)
    keys, heavy = json.loads(out.stdout.strip().splitlines()[-1])
    assert keys == ["support_triage/merged_model", "support_triage/quantized_models"] and heavy == []
