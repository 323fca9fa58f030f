"""QLoRA against LoRA, and 4-bit / 8-bit inference against bf16, on one CUDA GPU with the embedded model:

    python -m genops_assets.bench.qlora_gpu [--steps 60] [--task support_triage]

1. LoRA on the bf16 base and QLoRA on the NF4 base (double quantization, bf16 compute), the same
   examples, config and seed: peak GPU memory, training tokens/s and the final validation loss
   of each.
2. The bf16 LoRA adapter served on the bf16, NF4 and int8 base (``load_model(quantization=...)``):
   generation tokens/s (greedy, batched) and how many answers equal the bf16 ones (text and
   parsed JSON), with the share of valid JSON.

Results go to ``$GENOPS_HOME/bench/qlora_gpu.json`` (rewritten after each section, so a section
that fails leaves the earlier ones). Without a CUDA device it exits at once saying so. About 2-3
minutes on one H200 with the defaults (most of it loading and the int8 generation).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def _log(msg: str) -> None:
    print(f"[qlora-gpu] {msg}", flush=True)


def _write(out: Path, results: dict[str, Any]) -> None:
    from genops_assets.lib.hashing import atomic_write_json

    atomic_write_json(out, results)


def _fresh_gpu() -> None:
    import torch

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def train_run(base_dir: str, train, validation, cfg, work: Path, tokens_per_example: float) -> dict[str, Any]:
    """One training run: peak GPU memory, tokens/s between the first and last logged step, eval loss."""
    import torch

    from genops_assets.lib.training import train_lora

    stamps: list[tuple[float, float]] = []

    def on_progress(rec: dict[str, float]) -> None:
        if "loss" in rec:
            stamps.append((rec["step"], time.perf_counter()))

    _fresh_gpu()
    result = train_lora(base_dir, train, validation, cfg, work / "adapter", work / "run", on_progress,
                        data_digest="qlora-gpu-bench", resume=False)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    (s0, t0), (s1, t1) = stamps[0], stamps[-1]
    if s1 <= s0:
        raise RuntimeError(f"fewer than two logged steps ({stamps}); raise --steps")
    tokens = (s1 - s0) * cfg.batch_size * cfg.grad_accum * tokens_per_example
    return {"quantization": cfg.quantization, "steps": result.steps, "peak_gpu_mb": round(peak / 2**20, 1),
            "train_tokens_per_s": round(tokens / (t1 - t0), 1), "runtime_s": round(result.runtime_s, 1),
            "final_train_loss": result.last("loss"), "eval_loss": result.last("eval_loss"),
            "adapter_dir": result.adapter_dir}


def infer_run(base_dir: str, adapter_dir: str, quantization: str, prompts, max_new_tokens: int,
              batch_size: int, device: str = "cuda") -> tuple[dict[str, Any], list[str]]:
    """Greedy answers of the adapter on the base loaded with ``quantization``: tokens/s, peak memory."""
    import torch

    from genops_assets.serving.adapters import load_model
    from genops_assets.serving.generation import generate

    _fresh_gpu()
    loaded = load_model(base_dir, {"tuned": adapter_dir}, dtype="bfloat16", device=device, quantization=quantization)
    generate(loaded, prompts[:batch_size], adapter="tuned", max_new_tokens=8, batch_size=batch_size)  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    answers = generate(loaded, prompts, adapter="tuned", max_new_tokens=max_new_tokens, batch_size=batch_size)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    tokens = sum(a.completion_tokens for a in answers)
    row = {"quantization": quantization, "prompts": len(prompts), "completion_tokens": tokens,
           "tokens_per_s": round(tokens / wall, 1), "wall_s": round(wall, 2),
           "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)}
    del loaded
    return row, [a.text for a in answers]


def _parsed(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def agreement(reference: list[str], answers: list[str]) -> dict[str, Any]:
    parsed_ref, parsed = [_parsed(t) for t in reference], [_parsed(t) for t in answers]
    n = len(reference)
    return {"same_text": round(sum(a == b for a, b in zip(reference, answers, strict=True)) / n, 4),
            "same_json": round(sum(a is not None and a == b for a, b in zip(parsed_ref, parsed, strict=True)) / n, 4),
            "valid_json": round(sum(p is not None for p in parsed) / n, 4)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="support_triage")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps of each training run")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--train-examples", type=int, default=400)
    parser.add_argument("--validation-examples", type=int, default=48)
    parser.add_argument("--prompts", type=int, default=64, help="prompts answered in the inference comparison")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("qlora_gpu: no CUDA device is visible to torch (torch "
              f"{torch.__version__}); this benchmark measures bitsandbytes on a GPU and has nothing to run here.",
              file=sys.stderr)
        return 2

    from resources import QUIET_ENV, genops_home

    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)
    from genops_assets.lib.base_model import convert_gguf, find_embedded_gguf
    from genops_assets.lib.formatting import build_messages, format_target
    from genops_assets.lib.quantization import require_quantization
    from genops_assets.lib.tasks import load_task, read_raw_file
    from genops_assets.lib.training import LoraTrainConfig, SftExample, tokenize_example

    for quantization in ("nf4", "int8"):
        require_quantization(quantization, "qlora_gpu", "cuda")
    started = time.perf_counter()
    home = genops_home()
    out = Path(args.out) if args.out else home / "bench" / "qlora_gpu.json"
    base = convert_gguf(find_embedded_gguf(), home / "models" / "base", log=_log)
    task = load_task(REPO / "tasks", args.task)
    raw = [r for f in task.raw_files() for r in read_raw_file(f, task)]
    n_val = args.validation_examples
    if len(raw) < n_val + 2 * args.batch_size:
        raise SystemExit(f"qlora_gpu: task {args.task} has {len(raw)} examples, too few for "
                         f"{n_val} validation examples and a training batch")
    examples = [SftExample(f"ex{i}", build_messages(task, r.input_text), format_target(r.output, task.output_fields))
                for i, r in enumerate(raw)]
    validation, train = examples[:n_val], examples[n_val:n_val + args.train_examples]

    cfg = LoraTrainConfig(max_steps=args.steps, batch_size=args.batch_size, eval_every=0, save_every=args.steps,
                          log_every=1, warmup_steps=min(5, args.steps // 10), bf16=True)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base.path)
    rows = [r for r in (tokenize_example(tokenizer, ex, cfg.max_length) for ex in train) if r]
    tokens_per_example = sum(len(r["input_ids"]) for r in rows) / len(rows)

    results: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "model": base.name, "task": args.task,
        "train_examples": len(train), "validation_examples": len(validation),
        "mean_tokens_per_example": round(tokens_per_example, 1), "config": cfg.as_params(), "training": {},
        "inference": {},
    }
    import bitsandbytes

    results["bitsandbytes"] = bitsandbytes.__version__
    with tempfile.TemporaryDirectory(prefix="genops-qlora-") as tmp:
        work = Path(tmp)
        runs = {"lora_bf16": cfg,
                "qlora_nf4": dataclasses.replace(cfg, quantization="nf4", compute_dtype="bfloat16")}
        for name, run_cfg in runs.items():
            _log(f"training {name}: {run_cfg.max_steps} steps of {run_cfg.batch_size}")
            results["training"][name] = train_run(base.path, train, validation, run_cfg, work / name,
                                                  tokens_per_example)
            _log(f"{name}: {results['training'][name]}")
            _write(out, results)
        lora, qlora = results["training"]["lora_bf16"], results["training"]["qlora_nf4"]
        results["training"]["qlora_vs_lora"] = {
            "peak_memory_ratio": round(qlora["peak_gpu_mb"] / lora["peak_gpu_mb"], 3),
            "tokens_per_s_ratio": round(qlora["train_tokens_per_s"] / lora["train_tokens_per_s"], 3),
            "eval_loss_delta": round(qlora["eval_loss"] - lora["eval_loss"], 4)}

        prompts = [ex.messages for ex in validation[: args.prompts]]
        adapter = lora.pop("adapter_dir")
        qlora.pop("adapter_dir")
        reference: list[str] = []
        for quantization in ("none", "nf4", "int8"):
            _log(f"inference on the {'bf16' if quantization == 'none' else quantization} base: {len(prompts)} prompts")
            row, answers = infer_run(base.path, adapter, quantization, prompts, task.max_new_tokens, 16)
            if quantization == "none":
                reference = answers
            row["agreement_with_bf16"] = agreement(reference, answers)
            results["inference"]["bf16" if quantization == "none" else quantization] = row
            _log(f"{quantization}: {row}")
            _write(out, results)
    results["elapsed_s"] = round(time.perf_counter() - started, 1)
    _write(out, results)
    _log(f"wrote {out} ({results['elapsed_s']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
