"""`make bench`: side-by-side timings on this machine, written to ``<data dir>/bench/results.json``.

* golden-set evaluation, cold (model calls) vs fully cached (zero model calls);
* judging against the local server, sequential (one call in flight) vs concurrent
  (the server batches concurrent requests);
* serving (``genops_assets.bench.serving``): genops vs one-at-a-time vs llama.cpp;
* serving latency beside monitoring work at normal and at background priority
  (``genops_assets.bench.background``);
* guardrail latency: p50/p95 that the input and output checks add to a 200-token exchange
  (``genops_assets.bench.guardrails``; absolute times, target 15 ms p50);
* training: non-padding tokens/s of genops' SFT step vs a naive Trainer + PEFT loop
  (``genops_assets.bench.training``; target 1.5x at validation loss within 1%).

``--quick`` runs the training part with reduced settings (``make bench-quick``). A run updates
the parts it measured in the results file and keeps the others; each run records machine, date
and git commit.

Each comparison runs both sides in the same process, one after the other, and reports the
ratio: absolute times on shared machines are noise, ratios are not.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _log(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


def bench_eval(base_dir: str, task, examples, work: Path) -> dict:
    from genops_assets.lib.cache import CallCache
    from genops_assets.lib.evaluation import evaluate_model
    from genops_assets.serving.adapters import load_model

    loaded = load_model(base_dir)
    digest = "bench-" + Path(base_dir).name
    t0 = time.perf_counter()
    cold = evaluate_model(loaded, None, "cold", digest, task, examples, [], CallCache(work / "eval.sqlite"),
                          batch_size=8, log=_log)
    cold_s = time.perf_counter() - t0

    def no_model():
        raise AssertionError("a cached evaluation must not load the model")

    t0 = time.perf_counter()
    warm = evaluate_model(no_model, None, "cached", digest, task, examples, [], CallCache(work / "eval.sqlite"),
                          batch_size=8, log=_log)
    cached_s = time.perf_counter() - t0
    assert warm.model_calls == 0 and [p["prediction"] for p in warm.predictions] == [
        p["prediction"] for p in cold.predictions]
    return {"examples": len(examples), "cold_s": round(cold_s, 3), "cached_s": round(cached_s, 4),
            "cold_model_calls": cold.model_calls, "cached_model_calls": warm.model_calls,
            "speedup": round(cold_s / cached_s, 1), "target": ">= 20x",
            "predictions": [p["prediction"] for p in cold.predictions]}


def bench_judging(base_dir: str, task, examples, predictions, work: Path, modes: list[bool], explain_tokens: int,
                  concurrency: int) -> dict:
    """Sequential vs concurrent judging on one local judge server, for each mode: verdicts only
    (choice mode: one forward pass per verdict) and, when asked, verdicts with a written
    explanation (a second, generated answer per verdict)."""
    from genops_assets.lib.formatting import build_messages
    from genops_assets.lib.judging import BUILTIN_RUBRICS, ChatJudge, load_rubrics
    from genops_assets.serving import control

    rubric = load_rubrics(BUILTIN_RUBRICS)["instruction_following"]
    items = []
    for ex, pred in zip(examples, predictions, strict=True):
        request = "\n\n".join(m["content"] for m in build_messages(task, ex.input_text, []))
        items.append((rubric.render(input=request, response=pred, reference=""), rubric.choices, rubric.version))
    from genops_assets.serving.control import port_free

    port = next(p for p in range(8090, 8190) if port_free("127.0.0.1", p))
    state = control.start_server(base_dir, {}, {}, work / "judge", port=port, extra_args=["--guardrails", "off"])
    results = {}
    try:
        url = f"{state.url}/v1"
        for explain in modes:
            warm = ChatJudge(url, "base", explain=explain, explain_tokens=explain_tokens)
            warm.choose(*items[0][:2])  # first call pays one-off costs; not timed
            timings = {}
            for label, limit in (("sequential", 1), ("concurrent", concurrency)):
                judge = ChatJudge(url, "base", explain=explain, explain_tokens=explain_tokens, max_concurrency=limit)
                t0 = time.perf_counter()
                out = judge.choose_many(items)
                timings[label] = time.perf_counter() - t0
                failures = [o for o in out if not hasattr(o, "choice")]
                if failures:
                    raise RuntimeError(f"{label} judging had {len(failures)} failed calls: {failures[:2]}")
                _log(f"judging{' + explanations' if explain else ''} {label} (max {limit} in flight): "
                     f"{len(items)} verdicts in {timings[label]:.1f}s, {judge.usage.calls} calls")
            results["explained" if explain else "choice"] = {
                "verdicts": len(items), "explain": explain, "explain_tokens": explain_tokens,
                "concurrency": concurrency, "sequential_s": round(timings["sequential"], 2),
                "concurrent_s": round(timings["concurrent"], 2),
                "speedup": round(timings["sequential"] / timings["concurrent"], 2), "target": ">= 3x"}
        with urllib.request.urlopen(f"{state.url}/health") as resp:
            health = json.loads(resp.read())
    finally:
        control.stop_server(work / "judge")
    results["server_batches"], results["server_batched_requests"] = health.get("batches"), health.get(
        "batched_requests")
    results["prefill"] = bench_prefill(base_dir, items, concurrency)
    return results


def bench_prefill(base_dir: str, items, batch: int) -> dict:
    """Why concurrent judging is bounded on CPU cores: the judge prompts' length and the start
    they share, and the prompt tokens a second of one forward pass at batch 1 against batch
    ``batch`` (distinct prompts of the mean length, nothing shared). Where the rate does not
    grow with the batch, concurrency gains only the work requests share."""
    import torch

    from genops_assets.serving.adapters import load_model
    from genops_assets.serving.kv_cache import encode as _encode

    loaded = load_model(base_dir)
    prompts = [_encode(loaded.tokenizer, messages) for messages, _choices, _version in items]
    length = round(sum(map(len, prompts)) / len(prompts))
    shared = len(os.path.commonprefix(prompts))
    generator = torch.Generator().manual_seed(0)
    rates = {}
    with torch.inference_mode():
        loaded.model(input_ids=torch.randint(100, 30000, (1, length), generator=generator), logits_to_keep=1)
        for rows in (1, batch):
            ids = torch.randint(100, 30000, (rows, length), generator=generator)
            reps = max(1, batch // rows)
            t0 = time.perf_counter()
            for _ in range(reps):
                loaded.model(input_ids=ids, logits_to_keep=1)
            rates[rows] = rows * length * reps / (time.perf_counter() - t0)
    return {"judge_prompt_tokens_mean": length, "shared_prefix_tokens": shared,
            "prefill_tokens_per_s": {str(k): round(v) for k, v in rates.items()},
            "batch_gain": round(rates[batch] / rates[1], 2)}


def git_sha() -> str:
    """The checked-out commit (with ``-dirty`` for uncommitted changes), or why it is unknown."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError) as exc:
        return f"unknown ({exc})"
    return sha + ("-dirty" if dirty else "")


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else (
        platform.processor())
    return {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count(),
            "cpu_model": cpu, "load_avg_1m": round(os.getloadavg()[0], 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=24, help="golden examples in the evaluation benchmark")
    parser.add_argument("--judge-items", type=int, default=24, help="verdicts in the judging benchmark")
    parser.add_argument("--judge-modes", default="choice,explained",
                        help="comma-separated: choice (verdicts only), explained (verdict + explanation)")
    parser.add_argument("--explain-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--out", default=None)
    parser.add_argument("--only", choices=("all", "evaluation", "serving", "background", "guardrails", "training"),
                        default="all")
    parser.add_argument("--quick", action="store_true", help="training part only, reduced settings (minutes)")
    parser.add_argument("--serving-port", type=int, default=8028)
    parser.add_argument("--serving-max-tokens", type=int, default=48,
                        help="max_tokens per request (the task's answers need about 40)")
    args = parser.parse_args(argv)
    if args.quick:
        args.only = "training"

    from resources import QUIET_ENV, genops_home

    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)
    from genops_assets.lib.base_model import convert_gguf, find_embedded_gguf
    from genops_assets.lib.evaluation import EvalExample
    from genops_assets.lib.formatting import build_messages
    from genops_assets.lib.tasks import load_task, read_raw_file

    home = genops_home()
    out = Path(args.out) if args.out else home / "bench" / "results.json"
    base = convert_gguf(find_embedded_gguf(), home / "models" / "base", log=_log)
    task = load_task(REPO / "tasks", os.environ.get("GENOPS_TASK") or "support_triage")
    raw = [r for f in task.raw_files() for r in read_raw_file(f, task)]
    examples = [EvalExample(f"bench_{i}", r.input_text, r.output) for i, r in enumerate(raw[: args.examples])]
    results: dict = {"machine": machine(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                     "git_sha": git_sha(), "model": base.name}
    with tempfile.TemporaryDirectory(prefix="genops-bench-") as tmp:
        work = Path(tmp)
        if args.only in ("all", "evaluation"):
            _log(f"evaluation: {len(examples)} examples, cold then cached")
            results["evaluation_cache"] = bench_eval(base.path, task, examples, work)
            preds = results["evaluation_cache"].pop("predictions")
            n = min(args.judge_items, len(examples))
            modes = [m.strip() for m in args.judge_modes.split(",") if m.strip()]
            unknown = sorted(set(modes) - {"choice", "explained"})
            if unknown or not modes:
                parser.error(f"--judge-modes: unknown mode(s) {unknown} (use choice, explained)")
            _log(f"judging: {n} pointwise verdicts ({', '.join(modes)}), sequential then concurrent")
            results["judging"] = bench_judging(base.path, task, examples[:n], preds[:n], work,
                                               [m == "explained" for m in modes], args.explain_tokens,
                                               args.concurrency)
        if args.only in ("all", "serving"):
            from genops_assets.bench.serving import bench_serving

            prompts = [build_messages(task, ex.input_text) for ex in examples[:16]]
            _log("serving: genops (batched) vs naive (one at a time) vs llama.cpp, concurrency 1/4/16")
            results["serving"] = bench_serving(base.path, find_embedded_gguf(), prompts, work / "serving",
                                               args.serving_port, max_tokens=args.serving_max_tokens, log=_log)
        if args.only in ("all", "background"):
            from genops_assets.bench.background import bench_background

            prompts = [build_messages(task, ex.input_text) for ex in examples[:4]]
            _log("background: serving latency alone, beside an embedding load at normal, then at background priority")
            results["background"] = bench_background(base.path, prompts, work / "background", args.serving_port,
                                                     log=_log)
        if args.only in ("all", "guardrails"):
            from genops_assets.bench.guardrails import bench_guardrails
            from genops_assets.serving.settings import ServerSettings

            results["guardrails"] = bench_guardrails(task, base.path, ServerSettings.from_env().injection_detector,
                                                     log=_log)
        if args.only in ("all", "training"):
            from genops_assets.bench.training import FULL, QUICK, bench_training

            settings = QUICK if args.quick else FULL
            _log(f"training: genops' SFT step vs a naive Trainer + PEFT loop, alternating, {settings}")
            results["training"] = bench_training(base.path, task, work=work / "training", log=_log, **settings)
            results["training"]["measured"] = {k: results[k] for k in ("machine", "date", "git_sha")}
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.is_file():  # keep the parts this run did not measure
        try:
            previous = json.loads(out.read_text())
        except ValueError as exc:
            raise SystemExit(f"{out}: not valid JSON ({exc}); move it away to start a new results file") from exc
        results = {**previous, **results}
    tmp_out = out.with_suffix(".tmp")
    tmp_out.write_text(json.dumps(results, indent=2) + "\n")
    tmp_out.replace(out)
    print(f"\ngenops bench ({results['machine']['cpus']} CPUs) -> {out}")
    if "evaluation_cache" in results:
        e = results["evaluation_cache"]
        print(f"  golden-set evaluation, {e['examples']} examples: cold {e['cold_s']:.1f}s ({e['cold_model_calls']} "
              f"model calls), cached {e['cached_s']:.3f}s (0 calls): {e['speedup']}x (target {e['target']})")
        for mode in ("choice", "explained"):
            if mode in results["judging"]:
                j = results["judging"][mode]
                print(f"  judging, {j['verdicts']} verdicts{' + explanations' if j['explain'] else ''} (choice mode): "
                      f"sequential {j['sequential_s']:.1f}s, concurrent x{j['concurrency']} {j['concurrent_s']:.1f}s: "
                      f"{j['speedup']}x (target {j['target']})")
        p = results["judging"]["prefill"]
        print(f"  judge prompts: {p['judge_prompt_tokens_mean']} tokens, {p['shared_prefix_tokens']} shared; "
              f"one forward pass: {p['prefill_tokens_per_s']} prompt tokens/s by batch size ({p['batch_gain']}x)")
    if "serving" in results:
        from genops_assets.bench.serving import table

        print(table(results["serving"]))
        print("  ratios:", results["serving"]["ratios"], " targets:", results["serving"]["targets"])
    if "background" in results:
        b = results["background"]
        print(f"  serving p50 ({b['max_tokens']} tokens) alone {b['alone']['p50_s']}s; beside monitoring-like load at "
              f"normal priority {b['beside_load_normal_priority']['p50_s']}s, at background priority "
              f"{b['beside_load_background_priority']['p50_s']}s: {b['ratios']}")
    if "guardrails" in results:
        from genops_assets.bench.guardrails import summary

        print(summary(results["guardrails"]))
    if "training" in results:
        from genops_assets.bench.training import summary as training_summary

        print(training_summary(results["training"]))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
