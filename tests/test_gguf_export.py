"""GGUF export and llama.cpp quantization on the real embedded SmolLM2-135M: the rotary row order
against the embedded GGUF, and the merged model's next tokens on llama.cpp against transformers."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from genops_assets.lib.base_model import convert_gguf, find_embedded_gguf
from genops_assets.lib.gguf_export import export_gguf, llamacpp_next_token_logits, quantize_gguf, rope_rows_to_gguf
from genops_assets.lib.variants import merge_adapter

pytestmark = pytest.mark.integration

QUESTIONS = ["My invoice shows a double charge for March.", "The app crashes when I open settings.",
             "How do I reset my password?", "Please cancel my subscription today."]


@pytest.fixture(scope="module")
def real_base(tmp_path_factory) -> Path:
    """The embedded GGUF converted to safetensors, in the model cache the base_model asset uses
    (converted once, ~25 s the first time)."""
    home = os.environ.get("GENOPS_HOME")
    cache = Path(home) / "models" / "base" if home else tmp_path_factory.mktemp("base")
    return Path(convert_gguf(find_embedded_gguf(), cache, log=lambda _m: None).path)


def test_q_and_k_rows_in_gguf_order_equal_the_embedded_gguf(real_base):
    import gguf
    from safetensors import safe_open

    tensors = {t.name: t for t in gguf.GGUFReader(find_embedded_gguf()).tensors}
    assert "output.weight" not in tensors  # the template ties the output to the embeddings
    with safe_open(str(real_base / "model.safetensors"), framework="numpy") as hf:
        for gguf_name, hf_name, heads in (("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight", 9),
                                          ("blk.0.attn_k.weight", "model.layers.0.self_attn.k_proj.weight", 3),
                                          ("blk.29.attn_q.weight", "model.layers.29.self_attn.q_proj.weight", 9)):
            t = tensors[gguf_name]
            stored = gguf.quants.dequantize(t.data, t.tensor_type)
            weight = hf.get_tensor(hf_name)
            np.testing.assert_allclose(rope_rows_to_gguf(weight, heads), stored, atol=1e-6)
            assert np.abs(weight - stored).max() > 1.0  # without the reordering they differ


@pytest.fixture(scope="module")
def real_adapter(real_base, tmp_path_factory) -> Path:
    """A LoRA adapter on the real base with small random B weights (it changes the outputs)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from genops_assets.lib.integrity import write_manifest

    torch.manual_seed(3)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(real_base, dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.02)
    out = tmp_path_factory.mktemp("real-adapter")
    model.save_pretrained(out)
    write_manifest(out)
    return out


def test_merged_model_on_llama_cpp_predicts_the_tokens_transformers_does(real_base, real_adapter, tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is the quantizer (an optional install)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    timings: dict[str, float] = {}

    def timed(name, fn, *args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        timings[name] = round(time.perf_counter() - t0, 1)
        return out

    quiet = lambda _m: None  # noqa: E731
    merged = timed("merge", merge_adapter, real_base, real_adapter, tmp_path / "merged", log=quiet)
    f16 = timed("export_f16", export_gguf, merged.path, find_embedded_gguf(), tmp_path / "f16", log=quiet)
    quantized = {q: timed(q, quantize_gguf, f16, tmp_path / q, q, log=quiet) for q in ("q8_0", "q4_k_m")}

    tok = AutoTokenizer.from_pretrained(merged.path)
    model = AutoModelForCausalLM.from_pretrained(merged.path, dtype=torch.float32).eval()
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
               for q in QUESTIONS]
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    with torch.no_grad():
        want = [model(torch.tensor([i])).logits[0, -1].numpy() for i in ids]

    agreement = {}
    for variant in (f16, *quantized.values()):
        got = llamacpp_next_token_logits(variant.path, ids)
        agreement[variant.name] = sum(int(g.argmax() == w.argmax()) for g, w in zip(got, want, strict=True))
        if variant is f16:
            for g, w in zip(got, want, strict=True):
                assert np.corrcoef(g, w)[0, 1] > 0.999
    sizes = {v.name: v.size_bytes for v in (merged, f16, *quantized.values())}
    print(f"top-1 agreement with transformers on {len(ids)} prompts: {agreement}; sizes {sizes}; seconds {timings}")
    assert agreement["merged_f16"] == len(ids)
    assert agreement["q8_0"] >= len(ids) - 1
    assert sizes["q4_k_m"] < sizes["q8_0"] < sizes["merged_f16"] < sizes["merged"]
