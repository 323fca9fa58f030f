"""Tune a task's judge on the embedded model with seeded human choices and compare its certificate
with the base judge's, on the same held-out labels:

    python -m genops_assets.bench.judge_tuning --task support_triage --steps 200

Seeded choices: simulated raters (three per item, each picking the better answer with
probability ``--rater-accuracy``, a tie now and then) compare a task example's reference answer
with a weaker one, the two shown in random order: another ticket's answer (well-formed, wrong
for this message), the reference with one label field changed, or with a vague summary. Items
on golden inputs are split ``certify``, the others by a hash half (the ``human_judgements``
mart's rule). The choices are written as the ``human_judgements`` mart (what ``human_ratings``
and dbt build from real ratings); then

1. the configured judge (by default the base model on the local judge server) is certified on
   the ``certify`` rows and the golden probes;
2. ``judge_adapter`` trains the LoRA judge on the ``train`` rows and probe pairs from the SFT
   split, registers it and certifies it on the same rows and probes;
3. both certificates are printed side by side and written to ``<home>/bench/judge_tuning.json``.

Expected runtime with the embedded SmolLM2-135M and the defaults (every golden example and 300
SFT examples seeded: about 235 held-out labels; 40 golden examples give 120 probes): data and
base model 1-2 minutes; each certificate about 1,100 judge calls (both orders, a repeat, the
probes): a minute on a GPU, 10-20 minutes on 2 shared CPU cores; training 200 steps of 4 judge
prompts: a minute on a GPU, about 20-25 minutes on 2 CPU cores. ``--items 100 --steps 60`` is
a quicker CPU run (about 25 minutes in all).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from genops_assets.lib.hashing import sha256_json
from genops_assets.lib.probes import answer_text

WEAKER = ("other_ticket", "wrong_field", "vague_summary")
VAGUE_SUMMARY = "Customer needs help."


def weaker_answer(output: Mapping[str, Any], others: Sequence[Mapping[str, Any]], spec, rng: random.Random
                  ) -> tuple[str, str] | None:
    """A worse answer than ``output`` and its kind, or None when no kind applies."""
    kinds = list(WEAKER)
    rng.shuffle(kinds)
    for kind in kinds:
        if kind == "other_ticket":
            different = [o for o in others if any(o.get(f) != output.get(f) for f in spec.label_fields)]
            if different:
                return answer_text(rng.choice(different)), kind
        elif kind == "wrong_field":
            fields = [(f, [v for v in spec.schema["properties"][f].get("enum", []) if v != output.get(f)])
                      for f in spec.label_fields]
            fields = [(f, vs) for f, vs in fields if vs]
            if fields:
                f, values = rng.choice(fields)
                return answer_text({**output, f: rng.choice(values)}), kind
        elif spec.text_fields:
            return answer_text({**output, spec.text_fields[0]: VAGUE_SUMMARY}), kind
    return None


def simulated_choice(reference_slot: str, raters: int, accuracy: float, tie_rate: float, rng: random.Random
                     ) -> tuple[str, float]:
    """The majority of ``raters`` simulated choices (response numbers) and its agreement."""
    other = "2" if reference_slot == "1" else "1"
    votes = []
    for _ in range(raters):
        u = rng.random()
        votes.append("tie" if u < tie_rate else reference_slot if u < tie_rate + accuracy * (1 - tie_rate) else other)
    choice, n = Counter(votes).most_common(1)[0]
    return choice, n / raters


def seeded_judgements(spec, rows: Sequence[tuple[str, str, Mapping[str, Any]]], golden_ids: set[str],
                      seed: int = 0, raters: int = 3, accuracy: float = 0.9, tie_rate: float = 0.03):
    """Rows of the ``human_judgements`` mart from simulated raters over ``(example_id, input,
    reference output)`` rows."""
    import pandas as pd

    outputs = [o for _, _, o in rows]
    out = []
    for example_id, text, output in rows:
        rng = random.Random(f"{seed}:{example_id}")
        weaker = weaker_answer(output, outputs, spec, rng)
        if weaker is None:
            continue
        bad, kind = weaker
        good = answer_text(output)
        slot = rng.choice(("1", "2"))
        choice, agreement = simulated_choice(slot, raters, accuracy, tie_rate, rng)
        golden = example_id in golden_ids
        split = "certify" if golden or int(sha256_json({"item": example_id})[:8], 16) % 2 else "train"
        first, second = (good, bad) if slot == "1" else (bad, good)
        out.append({"item_id": f"seed-{example_id}", "example_id": example_id, "input_text": text,
                    "reference_json": good, "response_1": first, "response_2": second,
                    "model_1": "reference" if slot == "1" else f"weaker:{kind}",
                    "model_2": f"weaker:{kind}" if slot == "1" else "reference", "human_choice": choice,
                    "n_ratings": raters, "agreement": agreement, "source": "golden" if golden else "live",
                    "split": split})
    return pd.DataFrame(out)


def _checks(certificate: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {k: v for k, v in (certificate.get("checks") or {}).items() if isinstance(v, Mapping)}


def side_by_side(base: Mapping[str, Any], tuned: Mapping[str, Any]) -> str:
    """The two certificates' checks as a table: value (pass/FAIL) of each, and the threshold."""
    def cell(check):
        if check is None:
            return "-"
        value = check.get("value")
        shown = "not computed" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)
        return f"{shown} ({'pass' if check.get('passed') else 'FAIL'})"

    b, t = _checks(base), _checks(tuned)
    names = list(dict.fromkeys([*b, *t]))
    lines = [f"{'check':<28}{'base judge':>22}{'tuned judge':>22}{'threshold':>12}"]
    for n in names:
        threshold = (b.get(n) or t.get(n) or {}).get("threshold")
        lines.append(f"{n:<28}{cell(b.get(n)):>22}{cell(t.get(n)):>22}{threshold!s:>12}")
    lines.append(f"{'certified':<28}{bool(base.get('passed'))!s:>22}{bool(tuned.get('passed'))!s:>22}")
    return "\n".join(lines)


def run(home: Path, task: str = "support_triage", steps: int = 200, model_path: str | None = None,
        seed: int = 0, rater_accuracy: float = 0.9, items: int = 300,
        judge_config: Mapping[str, Any] | None = None, log=print) -> dict:
    """Build the task's marts in ``home``, seed the human choices (every golden example and
    ``items`` SFT examples), certify the base judge, tune and certify the task's judge; returns
    both certificates (and writes them to ``<home>/bench/judge_tuning.json``)."""
    import dagster as dg
    import duckdb

    os.environ["GENOPS_HOME"] = str(home)
    os.environ.setdefault("DAGSTER_HOME", str(home / "dagster"))
    from genops_assets.cli.home import init_home

    init_home()
    from genops_assets.definitions import graph_definitions
    from genops_assets.lib.cache import CallCache
    from genops_assets.lib.judge_certificate import certify, human_choices_from_frame
    from genops_assets.lib.judging import BUILTIN_RUBRICS, load_rubrics
    from genops_assets.lib.probes import probe_pairs
    from genops_assets.lib.tasks import TaskRef, task_run_config
    from resources import build_resources
    from resources.settings import GenopsSettings
    from resources.warehouse import mart_schema

    defs = dg.Definitions.merge(graph_definitions(), dg.Definitions(resources=build_resources(home=home)))
    job = defs.resolve_implicit_global_asset_job_def()
    marts = dg.AssetSelection.assets(dg.AssetKey([task, "sft_dataset"]), dg.AssetKey([task, "golden_eval_dataset"]))
    datasets = marts.upstream() & dg.AssetSelection.groups(f"{task}_datasets")
    base_key = dg.AssetKey("base_model")
    base_config = {"base_model": {"config": {"model_path": model_path}}} if model_path else {}
    resources = defs.resources
    with dg.DagsterInstance.ephemeral() as instance:
        log(f"[judge bench] building the marts of {task} in {home}")
        built = job.execute_in_process(run_config={"ops": base_config}, instance=instance,
                                       asset_selection=[base_key, *datasets.resolve(job.asset_layer.asset_graph)])
        base_model = built.output_for_node("base_model")
        spec = TaskRef(task, str(GenopsSettings.from_env().tasks_dir)).load()
        schema = mart_schema(task)
        with duckdb.connect(resources["warehouse"].path) as con:
            sft = con.execute(f"select example_id, input_text, output_json from {schema}.sft_dataset "
                              "order by example_id").fetchall()
            golden = con.execute(f"select example_id, input_text, output_json from {schema}.golden_eval_dataset "
                                 "order by example_id").fetchall()
            sample = random.Random(seed).sample(sft, min(items, len(sft)))
            rows = [(i, t, json.loads(o)) for i, t, o in [*golden, *sample]]
            seeded = seeded_judgements(spec, rows, {g[0] for g in golden}, seed=seed, accuracy=rater_accuracy)
            con.register("seeded", seeded)
            con.execute(f"create or replace table {schema}.human_judgements as select * from seeded")
        counts = seeded.groupby(["split", "human_choice"]).size().to_dict()
        log(f"[judge bench] seeded human_judgements: {len(seeded)} items, by split and choice {counts}")

        rubric = load_rubrics(BUILTIN_RUBRICS, spec.root / "rubrics")[
            (judge_config or {}).get("pairwise_rubric", "pairwise_quality")]
        human = human_choices_from_frame(seeded[seeded["split"] == "certify"].reset_index(drop=True))
        probes = probe_pairs([(i, t, json.loads(o)) for i, t, o in golden], spec, seed=seed,
                             limit=spec.judge.max_probe_examples)
        client = resources["judge"].connect(base_model["path"], cache=CallCache(home / "cache" / "calls.sqlite"))
        log(f"[judge bench] certifying the configured judge ({client.model}): {len(human)} held-out labels, "
            f"{len(probes)} golden probes")
        base_cert = certify(client, rubric, human, probes, spec.judge, seed=seed, log=log).as_dict()

        log(f"[judge bench] tuning the judge of {task}: {steps} steps")
        cfg = {"max_steps": steps, **(judge_config or {})}
        tuned = job.execute_in_process(
            run_config=task_run_config(task, {"ops": {**base_config, "judge_adapter": {"config": cfg}}}),
            instance=instance, asset_selection=[base_key, dg.AssetKey([task, "judge_adapter"])])
        value = tuned.output_for_node(f"{task}__judge_adapter")
    resources["judge"].stop_local()
    report = {"task": task, "steps": steps, "seeded": {"items": len(seeded), "by_split_choice":
                                                       {f"{s}/{c}": int(n) for (s, c), n in counts.items()}},
              "base_judge": {"model": client.model, "certificate": base_cert},
              "tuned_judge": {"model": value["judge_model"], "version": value["version"],
                              "certified": value["certified"], "certified_version": value["certified_version"],
                              "final_train_loss": value["final_train_loss"],
                              "final_eval_loss": value["final_eval_loss"], "certificate": value["certificate"]}}
    out = home / "bench" / "judge_tuning.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    log(side_by_side(base_cert, value["certificate"]))
    log(f"[judge bench] written to {out}")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="support_triage")
    parser.add_argument("--steps", type=int, default=200, help="training steps of the judge LoRA")
    parser.add_argument("--home", default=None, help="data directory (default: a new temporary one)")
    parser.add_argument("--model-path", default=None, help="a local HF model folder instead of the embedded model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rater-accuracy", type=float, default=0.9)
    parser.add_argument("--items", type=int, default=300, help="SFT examples seeded (half train, half certify), "
                                                                 "beside every golden example (certify)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--probe-examples", type=int, default=64)
    args = parser.parse_args(argv)
    home = Path(args.home or tempfile.mkdtemp(prefix="genops-judge-bench-")).resolve()
    run(home, args.task, args.steps, args.model_path, args.seed, args.rater_accuracy, args.items,
        {"batch_size": args.batch_size, "probe_examples": args.probe_examples})


if __name__ == "__main__":
    main()
