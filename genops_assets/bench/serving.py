"""Serving benchmark: output tokens/s and p50/p99 latency at concurrency 1, 4 and 16, in one
run, for three servers on the same machine and the same prompts:

- genops: its server with continuous batching (up to 16 requests decoding together);
- naive: the same server generating one request at a time with plain transformers
  (``model.generate`` per request: static scheduling, batches of one);
- llama.cpp: llama-cpp-python's OpenAI server on the same GGUF (skipped, and said so, when
  the package is not installed: ``make bench`` installs it).

Servers run one after the other, never together. Results are ratios against the naive server.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from genops_assets.lib.stats import percentile

LEVELS = (1, 4, 16)


def _wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 300.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; log {log}:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"server not ready after {timeout_s:.0f}s; log {log}")


def _start(cmd: list[str], ready_url: str, log: Path) -> subprocess.Popen:
    fh = open(log, "w")  # noqa: SIM115 - closed with the process
    env = {**os.environ, "GENOPS_API_KEYS": ""}  # benchmark servers are local and open
    proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    _wait_ready(ready_url, proc, log)
    return proc


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def load(url: str, model: str, prompts: list[list[dict]], concurrency: int, max_tokens: int) -> dict:
    """Send ``prompts`` with ``concurrency`` clients; throughput counts completion tokens."""
    from openai import OpenAI

    client = OpenAI(base_url=url, api_key="bench", max_retries=0, timeout=600)

    def one(messages):
        t0 = time.perf_counter()
        r = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0.0)
        return time.perf_counter() - t0, r.usage.completion_tokens

    one(prompts[0])  # warm-up, not counted
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(one, prompts))
    wall = time.perf_counter() - t0
    lat = [r[0] for r in results]
    tokens = sum(r[1] for r in results)
    return {"requests": len(prompts), "wall_s": round(wall, 2), "output_tokens": tokens,
            "tokens_per_s": round(tokens / wall, 2),
            "p50_s": round(percentile(lat, 50), 3), "p99_s": round(percentile(lat, 99), 3)}


def bench_serving(base_dir: str, gguf: Path, prompts: list[list[dict]], work: Path, port: int,
                  max_tokens: int = 48, log=print) -> dict:
    engines: dict[str, list[str] | None] = {
        "genops": [sys.executable, "-m", "genops_assets.serving.cli", "--base-model", base_dir,
                   "--state-dir", str(work / "genops"), "--port", str(port), "--max-batch", "16"],
        "naive": [sys.executable, "-m", "genops_assets.serving.cli", "--base-model", base_dir,
                  "--state-dir", str(work / "naive"), "--port", str(port), "--max-batch", "1",
                  "--scheduler", "static"],
        "llama_cpp": None,
    }
    if importlib.util.find_spec("llama_cpp") is not None:
        engines["llama_cpp"] = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(port),
                                "--n_threads", str(os.cpu_count() or 2), "--n_ctx", "2048"]
    out: dict = {"max_tokens": max_tokens, "levels": list(LEVELS), "engines": {}}
    for name, cmd in engines.items():
        if cmd is None:
            out["engines"][name] = {"skipped": "llama-cpp-python is not installed (make bench installs it)"}
            log(f"serving: {name} skipped (not installed)")
            continue
        state = work / name
        state.mkdir(parents=True, exist_ok=True)
        (state / "admin_token").write_text("bench")
        proc = _start(cmd, f"http://127.0.0.1:{port}/v1/models", state / "server.log")
        model = "base"
        try:
            res = {}
            for c in LEVELS:
                n = max(8, 2 * c)
                batch = (prompts * (n // len(prompts) + 1))[:n]
                res[str(c)] = load(f"http://127.0.0.1:{port}/v1", model, batch, c, max_tokens)
                log(f"serving: {name} c={c}: {res[str(c)]['tokens_per_s']} tok/s, p50 {res[str(c)]['p50_s']}s, "
                    f"p99 {res[str(c)]['p99_s']}s")
            out["engines"][name] = res
        finally:
            _stop(proc)
    naive, genops, llama = (out["engines"].get(k, {}) for k in ("naive", "genops", "llama_cpp"))
    ratios = {
        "c16_throughput_vs_naive": round(genops["16"]["tokens_per_s"] / naive["16"]["tokens_per_s"], 2),
        "c1_p50_vs_naive": round(genops["1"]["p50_s"] / naive["1"]["p50_s"], 2),
    }
    if "1" in llama:
        ratios["c16_throughput_vs_llama_cpp_single_stream"] = round(
            genops["16"]["tokens_per_s"] / llama["1"]["tokens_per_s"], 2)
    out["ratios"] = ratios
    out["targets"] = {"c16_throughput_vs_naive": ">= 5", "c1_p50_vs_naive": "<= 1.2",
                      "c16_throughput_vs_llama_cpp_single_stream": ">= 1"}
    return out


def table(result: dict) -> str:
    rows = ["| engine | concurrency | tokens/s | p50 s | p99 s |", "|---|---|---|---|---|"]
    for name, res in result["engines"].items():
        if "skipped" in res:
            rows.append(f"| {name} | - | skipped: {res['skipped']} | | |")
            continue
        for c, r in res.items():
            rows.append(f"| {name} | {c} | {r['tokens_per_s']} | {r['p50_s']} | {r['p99_s']} |")
    return "\n".join(rows)
