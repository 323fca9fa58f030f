"""Guardrail latency: what the input and output checks add to one request, for a 200-token
exchange (a 100-token user message and a 100-token answer, counted with the served
tokenizer), with a task's shipped settings and the endpoint's injection detector.

The checks run as the endpoint runs them (``Guardrails.check_input`` on the client's messages,
``check_output`` on the answer with the system prompt), one request at a time after a warm-up;
p50/p95 are over ``requests`` exchanges built from the task's own examples. Target: all checks
together add at most 15 ms p50.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import numpy as np

TARGET_P50_MS = 15.0
SIDE_TOKENS = 100


def _cut(tokenizer, texts: list[str], start: int, tokens: int) -> str:
    """Texts from ``start`` on (wrapping), joined until they hold ``tokens`` tokens, cut there."""
    ids: list[int] = []
    i = start
    while len(ids) < tokens:
        ids += tokenizer(texts[i % len(texts)] + "\n", add_special_tokens=False)["input_ids"]
        i += 1
    return tokenizer.decode(ids[:tokens])


def _pcts(values: list[float]) -> dict[str, float]:
    return {"p50": round(float(np.percentile(values, 50)), 3), "p95": round(float(np.percentile(values, 95)), 3)}


def bench_guardrails(task, tokenizer_dir: str, detector_spec: str, requests: int = 200,
                     log: Callable[[str], None] = print) -> dict:
    from transformers import AutoTokenizer

    from genops_assets.lib.guardrails.engine import Guardrails
    from genops_assets.lib.tasks import read_raw_file
    from genops_assets.serving.guard import load_detector

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    raw = [r for f in task.raw_files() for r in read_raw_file(f, task)]
    inputs = [r.input_text for r in raw]
    answers = [json.dumps(r.output) for r in raw]

    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    t0 = time.perf_counter()
    guard = Guardrails(task.guardrails, count, detector=load_detector(detector_spec))
    guard.warm_up()
    load_s = time.perf_counter() - t0
    system = task.system_template
    exchanges = [(_cut(tok, inputs, i * 3, SIDE_TOKENS), _cut(tok, answers, i * 3, SIDE_TOKENS))
                 for i in range(requests)]
    log(f"guardrails: {requests} exchanges of {SIDE_TOKENS}+{SIDE_TOKENS} tokens, task {task.name} "
        f"(guardrails {guard.version}), detector {detector_spec}")
    for text, answer in exchanges[:5]:  # warm caches (regexes, the leak spans of the system prompt)
        guard.check_input([{"role": "system", "content": system}, {"role": "user", "content": text}])
        guard.check_output(answer, system)
    rows: dict[str, list[float]] = {"input": [], "output": [], "total": []}
    per_check: dict[str, list[float]] = {}
    blocked = 0
    for text, answer in exchanges:
        t = time.perf_counter()
        vin = guard.check_input([{"role": "system", "content": system}, {"role": "user", "content": text}])
        t_in = (time.perf_counter() - t) * 1000
        t = time.perf_counter()
        vout = guard.check_output(answer, system)
        t_out = (time.perf_counter() - t) * 1000
        blocked += (not vin.allowed) + (not vout.allowed)
        rows["input"].append(t_in)
        rows["output"].append(t_out)
        rows["total"].append(t_in + t_out)
        for stage, v in (("input", vin), ("output", vout)):
            for check, ms in v.timings_ms.items():
                per_check.setdefault(f"{stage}.{check}", []).append(ms)
    total = _pcts(rows["total"])
    return {"requests": requests, "tokens_per_side": SIDE_TOKENS, "task": task.name,
            "guardrails_version": guard.version, "injection_detector": detector_spec,
            "load_s": round(load_s, 2), "blocked_checks": blocked,
            "input_ms": _pcts(rows["input"]), "output_ms": _pcts(rows["output"]), "total_ms": total,
            "per_check_p50_ms": {k: round(float(np.percentile(v, 50)), 3) for k, v in sorted(per_check.items())},
            "target": f"total p50 <= {TARGET_P50_MS:g} ms", "target_met": total["p50"] <= TARGET_P50_MS}


def summary(result: dict) -> str:
    return (f"  guardrails ({result['requests']} exchanges of {result['tokens_per_side']}+{result['tokens_per_side']} "
            f"tokens): input p50 {result['input_ms']['p50']} ms / p95 {result['input_ms']['p95']} ms, output p50 "
            f"{result['output_ms']['p50']} ms / p95 {result['output_ms']['p95']} ms, total p50 "
            f"{result['total_ms']['p50']} ms / p95 {result['total_ms']['p95']} ms (target {result['target']}: "
            f"{'met' if result['target_met'] else 'NOT met'})")


if __name__ == "__main__":  # python -m genops_assets.bench.guardrails TOKENIZER_DIR [DETECTOR_SPEC]
    import sys
    from pathlib import Path

    from genops_assets.lib.tasks import load_task
    from genops_assets.serving.settings import ServerSettings

    repo = Path(__file__).resolve().parents[2]
    spec = sys.argv[2] if len(sys.argv) > 2 else ServerSettings().injection_detector
    result = bench_guardrails(load_task(repo / "tasks", "support_triage"), sys.argv[1], spec)
    print(json.dumps(result, indent=2))
    print(summary(result))
