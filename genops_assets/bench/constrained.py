"""What constraining decoding to the task's output schema buys, on the real embedded model.

Evaluates one model (the base, or the base with an adapter) on golden inputs twice with genops'
engine, greedy: with the output schema enforced and without. Prints valid JSON rate, field
exact match, the primary metric and latency for each way, and how many answers that were
already schema-valid without the schema came out identical with it (they must: the mask only
removes tokens the schema forbids).

    python -m genops_assets.bench.constrained --examples 24 --shots 2
    python -m genops_assets.bench.constrained --examples 0 --adapter <adapter folder>   # the whole golden set

Golden inputs come from the warehouse's ``golden_eval_dataset`` mart when it is built, else from
the task's first raw examples. Nothing is read from the generation cache (latencies are real).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def golden_examples(task, warehouse: Path, n: int):
    from genops_assets.lib.evaluation import EvalExample, examples_from_frame
    from genops_assets.lib.tasks import read_raw_file
    from resources.warehouse import mart_schema

    if warehouse.is_file():
        import duckdb

        with duckdb.connect(str(warehouse), read_only=True) as db:
            tables = db.execute("select 1 from information_schema.tables where table_schema = ? and "
                                "table_name = 'golden_eval_dataset'", [mart_schema(task.name)]).fetchall()
            if tables:
                df = db.execute(f"select * from {mart_schema(task.name)}.golden_eval_dataset "
                                "order by example_id").df()
                rows = examples_from_frame(df)
                return (rows[:n] if n else rows), f"{warehouse}: {mart_schema(task.name)}.golden_eval_dataset"
    raw = [r for f in task.raw_files() for r in read_raw_file(f, task)]
    picked = raw[: n or len(raw)]
    return ([EvalExample(f"{r.source_file}:{r.source_row}", r.input_text, r.output) for r in picked],
            f"{task.root} raw examples (no golden_eval_dataset mart in {warehouse})")


def main(argv: list[str] | None = None) -> dict:
    from genops_assets.lib.base_model import convert_gguf, find_embedded_gguf
    from genops_assets.lib.cache import CallCache
    from genops_assets.lib.evaluation import evaluate_model
    from genops_assets.lib.tasks import load_task, read_raw_file
    from resources import genops_home

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="support_triage")
    parser.add_argument("--tasks-dir", default="tasks")
    parser.add_argument("--examples", type=int, default=24, help="golden inputs (0: all)")
    parser.add_argument("--adapter", default=None, help="a LoRA adapter folder (default: the base model)")
    parser.add_argument("--shots", type=int, default=0, help="worked examples in the prompt (base model)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    home = genops_home()
    spec = load_task(args.tasks_dir, args.task)
    examples, source = golden_examples(spec, home / "warehouse.duckdb", args.examples)
    golden_inputs = {e.input_text for e in examples}
    shots = []
    if args.shots:
        pool = [r for f in spec.raw_files() for r in read_raw_file(f, spec) if r.input_text not in golden_inputs]
        shots = [(r.input_text, r.output) for r in pool[-args.shots:]]
    base = convert_gguf(find_embedded_gguf(), home / "models" / "base", log=lambda _: None)

    from genops_assets.serving.adapters import load_model

    loaded = load_model(base.path, {"candidate": args.adapter} if args.adapter else {})
    adapter = "candidate" if args.adapter else None
    out: dict = {"task": spec.name, "golden": source, "examples": len(examples), "shots": len(shots),
                 "model": args.adapter or f"base {base.path}", "ways": {}}
    with tempfile.TemporaryDirectory() as tmp:
        cache = CallCache(Path(tmp) / "calls.sqlite")
        evals = {}
        for way, constrained in (("unconstrained", False), ("constrained", True)):
            started = time.perf_counter()
            ev = evaluate_model(loaded, adapter, way, "bench", spec, examples, shots, cache, args.batch_size,
                                log=print, constrained=constrained)
            evals[way] = ev
            m = ev.metrics
            out["ways"][way] = {"valid_json_rate": m["valid_json_rate"],
                                "mean_field_exact_match": m["mean_field_exact_match"],
                                spec.primary_metric: m[spec.primary_metric],
                                "latency_p50_s_per_batch": m["latency_p50_s"],
                                "wall_s": round(time.perf_counter() - started, 1)}
    free, held = evals["unconstrained"].predictions, evals["constrained"].predictions
    valid_free = [i for i, p in enumerate(free) if p["valid_json"]]
    out["unconstrained_valid_and_identical_constrained"] = (
        f"{sum(free[i]['prediction'] == held[i]['prediction'] for i in valid_free)}/{len(valid_free)}")
    out["differences_on_valid"] = [{"example_id": free[i]["example_id"], "unconstrained": free[i]["prediction"],
                                    "constrained": held[i]["prediction"]}
                                   for i in valid_free if free[i]["prediction"] != held[i]["prediction"]][:5]
    print(json.dumps(out, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
