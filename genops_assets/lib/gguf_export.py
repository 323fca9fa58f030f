"""GGUF files of a Hugging Face Llama folder for llama.cpp: an f16/f32 export written with the
``gguf`` package, and Q8_0 / Q4_K_M quantizations made by llama.cpp's own quantizer.

The export takes the tokenizer, chat template and general metadata from a template GGUF (the
embedded SmolLM2 GGUF the base model was converted from: the tuned model shares its
vocabulary), the hyper-parameters from the folder's ``config.json``, and the weights from its
safetensors files.

Rotary layout: Hugging Face Llama checkpoints rotate the pairs (i, i + d/2) of each attention
head ("rotate_half"), GGUF files the pairs (2i, 2i + 1) of the original checkpoints. The rows
of the q and k projections are therefore reordered within each head on export
(``rope_rows_to_gguf``); ``tests/test_gguf_export.py`` checks the order against the embedded
GGUF and the folder transformers converted from it.
"""

from __future__ import annotations

import ctypes
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from genops_assets.lib.hashing import atomic_dir
from genops_assets.lib.integrity import verify_folder, verify_model_folder, write_manifest
from genops_assets.lib.variants import MERGED, Q4_K_M, Q8_0, VariantError, describe, gguf_file, stage

OUTTYPES = ("f16", "f32")
QTYPES = {Q8_0: "LLAMA_FTYPE_MOSTLY_Q8_0", Q4_K_M: "LLAMA_FTYPE_MOSTLY_Q4_K_M"}
# Template keys the export writes itself (from config.json) or the writer adds.
_OWN_PREFIXES = ("GGUF.", "llama.")
_OWN_KEYS = ("general.architecture", "general.file_type")


def rope_rows_to_gguf(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder the rows of a q or k projection (``[n_heads * head_dim, hidden]``, Hugging Face
    order) into GGUF order: within each head, row 2i takes HF row i and row 2i+1 takes HF row
    i + head_dim/2."""
    rows = weight.shape[0]
    if rows % n_heads or (rows // n_heads) % 2:
        raise ValueError(f"{rows} rows do not split into {n_heads} heads of even size")
    half = rows // n_heads // 2
    return weight.reshape(n_heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise VariantError(f"export: {path}: unreadable config: {exc}") from exc
    if config.get("model_type") != "llama":
        raise VariantError(f"export: {path}: model_type {config.get('model_type')!r}; only llama folders "
                           "are exported to GGUF")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise VariantError(f"export: {path}: rope scaling {rope!r} is not supported by this export")
    return config


def _hyper_parameters(writer, config: dict) -> None:
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    rope = config.get("rope_parameters") or {}
    writer.add_vocab_size(config["vocab_size"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config["hidden_size"] // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def _copy_metadata(reader, writer, vocab_size: int, template: Path) -> None:
    """Tokenizer, chat template and general keys of the template, as they are."""
    import gguf

    for key, field in reader.fields.items():
        if key.startswith(_OWN_PREFIXES) or key in _OWN_KEYS:
            continue
        main = field.types[0]
        if main == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, field.contents(), main, sub_type=field.types[-1])
        else:
            writer.add_key_value(key, field.contents(), main)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise VariantError(f"export: template {template} has no tokenizer.ggml.tokens")
    if len(tokens.data) != vocab_size:
        raise VariantError(f"export: template {template} has {len(tokens.data)} tokens, the model's config "
                           f"{vocab_size}: the template's tokenizer does not fit this model")


def _tensors(model_dir: Path, config: dict):
    """(GGUF name, array in GGUF order) of every weight of the folder."""
    import gguf
    from safetensors import safe_open

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    tied = bool(config.get("tie_word_embeddings"))
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise VariantError(f"export: {model_dir}: no *.safetensors weights")
    for file in files:
        with safe_open(str(file), framework="numpy") as fh:
            names = fh.keys()
            for hf_name in names:
                if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
                    continue
                name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
                if name is None:
                    raise VariantError(f"export: {file}: tensor {hf_name} has no GGUF name for llama")
                data = fh.get_tensor(hf_name)
                if name.endswith("attn_q.weight"):
                    data = rope_rows_to_gguf(data, heads)
                elif name.endswith("attn_k.weight"):
                    data = rope_rows_to_gguf(data, kv_heads)
                yield name, data


def export_gguf(model_dir: str | Path, template_gguf: str | Path, out_dir: str | Path, outtype: str = "f16", *,
                name: str | None = None, parent: str | None = MERGED,
                log: Callable[[str], None] = print):
    """A GGUF of the Llama folder ``model_dir`` in ``out_dir`` (one ``model.<outtype>.gguf`` and a
    manifest). 2-D weights are stored as ``outtype``, norms as f32 (as llama.cpp expects).
    The returned variant is named ``name`` (default ``<parent>_<outtype>``), served by llama.cpp;
    its parent is the variant the folder holds. Cost: seconds for the embedded model."""
    import gguf

    if outtype not in OUTTYPES:
        raise VariantError(f"export: outtype {outtype!r} is not one of {OUTTYPES}")
    model_dir, template_gguf, out_dir = Path(model_dir), Path(template_gguf), Path(out_dir)
    try:
        verify_model_folder(model_dir)
    except ValueError as exc:
        raise VariantError(f"export: {exc}") from exc
    config = _config(model_dir)
    try:
        reader = gguf.GGUFReader(template_gguf)
    except (OSError, ValueError) as exc:
        raise VariantError(f"export: template {template_gguf}: not a readable GGUF: {exc}") from exc
    arch = reader.fields.get("general.architecture")
    if arch is None or arch.contents() != "llama":
        raise VariantError(f"export: template {template_gguf}: architecture "
                           f"{arch.contents() if arch else None!r}, expected llama")
    ftype = gguf.LlamaFileType.MOSTLY_F16 if outtype == "f16" else gguf.LlamaFileType.ALL_F32
    with stage(log, f"export: {model_dir.name} -> GGUF {outtype}"), atomic_dir(out_dir) as tmp:
        writer = gguf.GGUFWriter(tmp / f"model.{outtype}.gguf", "llama")
        _copy_metadata(reader, writer, config["vocab_size"], template_gguf)
        _hyper_parameters(writer, config)
        writer.add_file_type(int(ftype))
        for tensor_name, data in _tensors(model_dir, config):
            keep_f32 = outtype == "f32" or data.ndim == 1
            writer.add_tensor(tensor_name, data.astype(np.float32 if keep_f32 else np.float16))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        write_manifest(tmp)
    return describe(out_dir, name or f"{parent}_{outtype}", "gguf", "llamacpp", parent)


def quantize_gguf(src, out_dir: str | Path, qtype: str, *, name: str | None = None, threads: int = 0,
                  log: Callable[[str], None] = print):
    """``src`` (a GGUF variant, f16 or f32) quantized to ``qtype`` (``q8_0`` | ``q4_k_m``) by
    llama.cpp's quantizer into ``out_dir``. The result's parent is the variant ``src`` was
    exported from; its name is ``qtype`` for the merged model, else ``<parent>_<qtype>``.
    Cost: seconds for the embedded model."""
    if qtype not in QTYPES:
        raise VariantError(f"quantize: qtype {qtype!r} is not one of {sorted(QTYPES)}")
    src_file = gguf_file(src.path)
    try:
        verify_folder(src.path)
    except ValueError as exc:
        raise VariantError(f"quantize: {exc}") from exc
    llama_cpp = _llama_cpp("quantize")

    out_dir = Path(out_dir)
    with stage(log, f"quantize: {src_file.name} -> {qtype}"), atomic_dir(out_dir) as tmp:
        out_file = tmp / f"model.{qtype}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, QTYPES[qtype])
        params.nthread = threads
        rc = llama_cpp.llama_model_quantize(str(src_file).encode(), str(out_file).encode(), ctypes.byref(params))
        if rc != 0 or not out_file.is_file():
            raise VariantError(f"quantize: llama.cpp failed to quantize {src_file} to {qtype} (return code {rc})")
        write_manifest(tmp)
    parent = src.parent or src.name
    return describe(out_dir, name or (qtype if parent == MERGED else f"{parent}_{qtype}"), "gguf", "llamacpp", parent)


def _llama_cpp(step: str):
    try:
        import llama_cpp
    except ImportError as exc:
        raise VariantError(f"{step}: llama-cpp-python is not installed (llama-cpp-python==0.3.36 builds "
                           f"llama.cpp from source; see the README): {exc}") from exc
    return llama_cpp


def llamacpp_next_token_logits(folder: str | Path, prompts: list[str | list[int]], n_ctx: int = 512
                               ) -> list[np.ndarray]:
    """Load the GGUF of a variant folder with llama.cpp once (manifest checked first) and return
    the next-token logits after each prompt (text, tokenized by the GGUF's tokenizer, or token
    ids). VariantError names the file when it does not load or its logits are not finite."""
    path = gguf_file(folder)
    try:
        verify_folder(folder)
    except ValueError as exc:
        raise VariantError(f"load check: {exc}") from exc
    llama_cpp = _llama_cpp("load check")
    try:
        # logits_all: llama-cpp-python keeps the logits (``scores``) only then.
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False)
    except Exception as exc:  # llama-cpp-python raises ValueError / RuntimeError for a bad file
        raise VariantError(f"load check: llama.cpp cannot load {path}: {exc}") from exc
    out = []
    try:
        for prompt in prompts:
            tokens = llm.tokenize(prompt.encode(), add_bos=False, special=True) if isinstance(prompt, str) else prompt
            llm.reset()
            llm.eval(list(tokens))
            out.append(np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32))
    finally:
        llm.close()
    if not all(np.isfinite(logits).all() for logits in out):
        raise VariantError(f"load check: {path}: llama.cpp logits are not finite")
    return out


def check_gguf_loads(folder: str | Path, prompt: str = "Hello") -> dict:
    """The load check of a GGUF variant: llama.cpp loads it and predicts a next token."""
    t0 = time.perf_counter()
    (logits,) = llamacpp_next_token_logits(folder, [prompt])
    return {"engine": "llamacpp", "prompt": prompt, "top_token": int(logits.argmax()),
            "seconds": round(time.perf_counter() - t0, 2)}
