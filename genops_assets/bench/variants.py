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
