"""What genops' endpoint costs in front of llama.cpp: single-stream tokens/s and p50 latency of
one GGUF served directly by llama.cpp, and the same GGUF as a task's variant route through
genops (guardrails, prompt rendering, request log, metrics included).

    python -m genops_assets.bench.llamacpp_overhead --base-model DIR [--gguf FILE] [--port 19250]

``DIR`` is the endpoint's base model folder (its tokenizer renders the prompts; the embedded
model's converted folder under $GENOPS_HOME). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

PROMPTS = [
    "My thermostat keeps clicking on and off and the house never gets warm.",
    "Can I return the doorbell I bought last week? It is the wrong colour.",
    "The app logs me out every time I open it.",
    "I was charged twice for my cloud plan this month.",
]
TASK = "bench"


def main(argv: list[str] | None = None) -> dict:
    from genops_assets.bench.serving import load
    from genops_assets.lib.base_model import find_embedded_gguf
    from genops_assets.lib.integrity import write_manifest
    from genops_assets.serving import control
    from genops_assets.serving.llamacpp import LlamaCppServer, free_port

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-model", required=True)
    parser.add_argument("--gguf", default=None)
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    gguf = Path(args.gguf) if args.gguf else find_embedded_gguf()
    prompts = [[{"role": "user", "content": p}] for p in PROMPTS] * 2
    work = Path(tempfile.mkdtemp(prefix="genops-llamacpp-bench-"))
    out: dict = {"gguf": str(gguf), "max_tokens": args.max_tokens, "threads": args.threads}
    try:
        with LlamaCppServer(gguf, n_threads=args.threads, log_path=work / "direct.log") as direct:
            out["llamacpp_direct"] = load(f"{direct.url}/v1", "gguf", prompts, 1, args.max_tokens)
        variant_dir = work / "variant"
        variant_dir.mkdir()
        (variant_dir / gguf.name).symlink_to(gguf.resolve())
        write_manifest(variant_dir)
        variant = {"name": "bench", "path": str(variant_dir), "format": "gguf", "engine": "llamacpp"}
        state_dir = work / "endpoint"
        port = args.port or free_port()
        control.start_server(args.base_model, {}, {}, state_dir, port=port,
                             extra_args=["--llamacpp-threads", str(args.threads)], env={"GENOPS_API_KEYS": ""})
        try:
            control.reload_variant(state_dir, TASK, variant, "1")
            out["genops_route"] = load(f"http://127.0.0.1:{port}/v1", TASK, prompts, 1, args.max_tokens)
        finally:
            control.stop_server(state_dir)
        out["overhead"] = {
            "tokens_per_s_ratio": round(out["genops_route"]["tokens_per_s"] / out["llamacpp_direct"]["tokens_per_s"],
                                        3),
            "p50_added_s": round(out["genops_route"]["p50_s"] - out["llamacpp_direct"]["p50_s"], 3)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
