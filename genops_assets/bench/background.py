"""Serving latency beside monitoring work: alone, beside an embedding load at normal priority,
and beside the same load at background priority (``genops_assets.lib.priority``: a session of
its own at the nice value monitoring runs and the local judge server take,
``GENOPS_BACKGROUND_NICE``).

The load is what ``prompt_drift`` does: all-MiniLM-L6-v2 embeddings of batches of prompts,
in a process of its own, in a loop until told to stop. Requests are sent one at a time while
it runs; the load's progress (batches a second) shows that background work still advances.
"""

from __future__ import annotations

import json
import multiprocessing
import statistics
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path


def _embedding_load(nice: int, ready, stop, out) -> None:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from genops_assets.lib.priority import lower_priority

    lowered = lower_priority(nice, new_session=True)
    import torch
    from transformers import AutoModel, AutoTokenizer

    from genops_assets.lib.embeddings import minilm_path

    tok = AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
    model = AutoModel.from_pretrained(str(minilm_path()), local_files_only=True).eval()
    texts = [f"ticket {i}: the parcel arrived damaged and the refund I was promised has not come through"
             for i in range(64)]
    batch = tok(texts, padding=True, return_tensors="pt")
    batches = 0
    with torch.inference_mode():
        model(**batch)
        ready.set()
        started = time.perf_counter()
        while not stop.is_set():
            model(**batch)
            batches += 1
    out.put({"lowered": lowered, "batches": batches, "seconds": round(time.perf_counter() - started, 2)})


def bench_background(base_dir: str, prompts: list, work: Path, port: int, max_tokens: int = 32,
                     requests: int = 3, log: Callable[[str], None] = print) -> dict:
    from genops_assets.serving import control
    from resources.settings import GenopsSettings

    nice = GenopsSettings.from_env().background_nice
    state = control.start_server(base_dir, {}, {}, work / "endpoint", port=port)

    def ask(messages) -> float:
        body = json.dumps({"model": "base", "messages": messages, "max_tokens": max_tokens,
                           "temperature": 0}).encode()
        t0 = time.perf_counter()
        req = urllib.request.Request(f"{state.url}/v1/chat/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as resp:
            resp.read()
        return time.perf_counter() - t0

    results: dict = {"max_tokens": max_tokens, "requests": requests, "background_nice": nice}
    ctx = multiprocessing.get_context("spawn")
    try:
        ask(prompts[0])
        for label, load_nice in (("alone", None), ("beside_load_normal_priority", 0),
                            ("beside_load_background_priority", nice)):
            load = None
            if load_nice is not None:
                ready, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
                load = ctx.Process(target=_embedding_load, args=(load_nice, ready, stop, out))
                load.start()
                if not ready.wait(timeout=300):
                    raise RuntimeError("the embedding load did not start within 300 s")
            latencies = [ask(prompts[i % len(prompts)]) for i in range(requests)]
            entry: dict = {"latencies_s": [round(x, 2) for x in latencies],
                           "p50_s": round(statistics.median(latencies), 2)}
            if load is not None:
                stop.set()
                entry["load"] = out.get(timeout=120)
                entry["load"]["batches_per_s"] = round(entry["load"]["batches"]
                                                       / max(entry["load"]["seconds"], 1e-9), 2)
                load.join(timeout=60)
            results[label] = entry
            log(f"background: {label}: p50 {entry['p50_s']}s {entry.get('load', '')}")
    finally:
        control.stop_server(work / "endpoint")
    alone = results["alone"]["p50_s"]
    results["ratios"] = {
        "normal_priority_p50_vs_alone": round(results["beside_load_normal_priority"]["p50_s"] / alone, 2),
        "background_priority_p50_vs_alone": round(results["beside_load_background_priority"]["p50_s"] / alone, 2)}
    return results
