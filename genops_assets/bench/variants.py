"""Serving benchmark of a tuned model's variants: for each, its own server, tokens/s and p50
latency at concurrency 1 and 16 on the same prompts (``bench.serving.load``), and the peak
resident memory of the server's process tree (sampled with psutil while it serves).

How each variant is served:
- ``original``: the genops endpoint on the base model with the tuned adapter;
- a safetensors variant (merged, distilled): the genops endpoint with that folder as its base,
  no adapter;
- a GGUF variant: llama-cpp-python's OpenAI server on the variant's file (llama.cpp directly,
  its own chat template from the GGUF; the genops endpoint's llama.cpp route adds the front door
  but not the decoding speed).

Servers run one after the other, never together; a variant whose server cannot start gets its
error instead of numbers (never zeros).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from genops_assets.bench.serving import _start, _stop, load
from genops_assets.lib.variants import gguf_file

LEVELS = (1, 16)
ORIGINAL = "original"


class RssSampler:
    """Peak resident memory (bytes) of a process and its children, sampled every ``interval_s``."""

    def __init__(self, pid: int, interval_s: float = 0.1):
        self.pid, self.interval_s, self.peak = pid, interval_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> int:
        import psutil

        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                continue
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.sample())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        self.peak = self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@contextmanager
def serve_variant(variant: Mapping, base_dir: str, work: Path, port: int) -> Iterator[tuple[str, str, int]]:
    """Start the server of one variant; yields (OpenAI base URL, model name, server pid), stops it after."""
    from genops_assets.serving import control

    name = variant["name"]
    state = work / name
    state.mkdir(parents=True, exist_ok=True)
    if variant.get("format") == "gguf":
        import importlib.util

        if importlib.util.find_spec("llama_cpp") is None:
            raise RuntimeError("llama-cpp-python is not installed (make install-llamacpp)")
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf_file(variant["path"])),
               "--port", str(port), "--n_threads", str(os.cpu_count() or 2), "--n_ctx", "2048"]
        proc = _start(cmd, f"http://127.0.0.1:{port}/v1/models", state / "server.log")
        try:
            yield f"http://127.0.0.1:{port}/v1", "model", proc.pid
        finally:
            _stop(proc)
        return
    if name == ORIGINAL:
        model, base, adapters = "bench:challenger", base_dir, {"bench:challenger": str(variant["adapter_dir"])}
    else:
        model, base, adapters = "base", str(variant["path"]), {}
    started = control.start_server(base, adapters, {}, state, port=port, env={"GENOPS_API_KEYS": ""},
                                   extra_args=["--guardrails", "off", "--max-batch", "16"])
    try:
        yield f"http://127.0.0.1:{port}/v1", model, started.pid
    finally:
        control.stop_server(state)


def bench_variant(variant: Mapping, base_dir: str, prompts: Sequence[list[dict]], work: Path, port: int,
                  requests: int = 16, max_tokens: int = 48, log=print) -> dict:
    """Tokens/s and p50 at each level (``max(requests, level)`` requests) and the peak RSS."""
    if not prompts:
        raise ValueError("no prompts to benchmark with")
    with serve_variant(variant, base_dir, work, port) as (url, model, pid), RssSampler(pid) as rss:
        levels = {}
        for c in LEVELS:
            n = max(requests, c)
            batch = (list(prompts) * (n // len(prompts) + 1))[:n]
            levels[str(c)] = load(url, model, batch, c, max_tokens)
            log(f"{variant['name']} c={c}: {levels[str(c)]['tokens_per_s']} tok/s, p50 {levels[str(c)]['p50_s']}s")
    return {"levels": levels, "peak_rss_bytes": rss.peak, "max_tokens": max_tokens, "requests": requests,
            "served_by": "llama.cpp server" if variant.get("format") == "gguf" else "genops endpoint"}


def bench_variants(variants: Sequence[Mapping], base_dir: str, prompts: Sequence[list[dict]], work: Path,
                   port: int, requests: int = 16, max_tokens: int = 48, log=print) -> dict[str, dict]:
    """Every variant, one server at a time; a variant whose server fails gets ``{"error": ...}``."""
    out: dict[str, dict] = {}
    for v in variants:
        started = time.monotonic()
        try:
            out[v["name"]] = bench_variant(v, base_dir, prompts, work, port, requests, max_tokens, log)
        except Exception as exc:  # the variant is reported failed with this reason
            out[v["name"]] = {"error": f"{type(exc).__name__}: {exc}"}
            log(f"{v['name']}: benchmark failed: {out[v['name']]['error']}")
        out[v["name"]]["seconds"] = round(time.monotonic() - started, 1)
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    """Side by side, in one run: the original (base + adapter on the genops endpoint) and each
    given variant, ``--rounds`` times in alternation, on the task's first golden-set inputs;
    prints and writes each variant's median tokens/s at concurrency 1 and its ratio to the
    original's.

        python -m genops_assets.bench.variants --base-model DIR --adapter DIR \\
            --variant q8_0=PATH/model.q8_0.gguf --variant merged=PATH/merged [--rounds 2]
    """
    import argparse
    import json
    import statistics
    import tempfile

    from genops_assets.lib.formatting import build_messages
    from genops_assets.lib.tasks import load_task, read_raw_file
    from genops_assets.serving.llamacpp import free_port
    from resources import genops_home
    from resources.settings import GenopsSettings

    parser = argparse.ArgumentParser(description=main.__doc__.split("\n\n")[0])
    parser.add_argument("--base-model", required=True, help="the base model folder (safetensors)")
    parser.add_argument("--adapter", required=True, help="the tuned adapter folder: the original")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=PATH",
                        help="a GGUF file or a safetensors folder (repeatable)")
    parser.add_argument("--task", default=None)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    settings = GenopsSettings.from_env()
    variants: list[dict] = [{"name": ORIGINAL, "adapter_dir": args.adapter}]
    for item in args.variant:
        name, sep, path = item.partition("=")
        if not sep or not Path(path).exists():
            parser.error(f"--variant {item!r}: expected NAME=PATH to an existing file or folder")
        gguf = path.endswith(".gguf")
        variants.append({"name": name, "path": str(Path(path).parent if gguf else path),
                         "format": "gguf" if gguf else "safetensors"})
    spec = load_task(settings.tasks_dir, args.task or settings.task)
    raw = [r for f in spec.raw_files() for r in read_raw_file(f, spec)][: args.requests]
    prompts = [build_messages(spec, r.input_text) for r in raw]
    rounds: dict[str, list[dict]] = {v["name"]: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="genops-bench-variants-") as tmp:
        for i in range(args.rounds):
            for v in variants:
                rounds[v["name"]].append(bench_variant(v, args.base_model, prompts, Path(tmp) / f"{i}", free_port(),
                                                       args.requests, args.max_tokens))
    c1 = {name: statistics.median(r["levels"]["1"]["tokens_per_s"] for r in runs) for name, runs in rounds.items()}
    result = {"rounds": args.rounds, "requests": args.requests, "max_tokens": args.max_tokens,
              "c1_tokens_per_s": c1, "c1_ratio_to_original": {n: round(t / c1[ORIGINAL], 2) for n, t in c1.items()},
              "runs": rounds}
    out = Path(args.out) if args.out else genops_home() / "bench" / "variants.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".tmp").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".tmp").replace(out)
    for name, tps in c1.items():
        print(f"{name}: {tps:.1f} tok/s at c=1 (median of {args.rounds}), {result['c1_ratio_to_original'][name]}x "
              f"the original")
    print(f"-> {out}")
    return result


if __name__ == "__main__":
    main()
