"""Preference tuning on the real model with a seeded preference set: does DPO from the champion
move the held-out preference win rate?

    python -m genops_assets.bench.preference [--task support_triage] [--train 64] [--heldout 60]

Needs a data directory (``GENOPS_HOME``) where the loop has run: the task's marts in the
warehouse and a registered `champion` (or ``--champion-adapter``, a LoRA adapter folder on the
same base model). The preference set is seeded the way raters would fill it: the champion answers
each prompt greedily; where it is wrong, the reference answer is chosen over the champion's own
answer; where it is right, the reference is chosen over a corrupted copy of it (a wrong label,
else a truncated answer, as in the objective probes). Training pairs come from the SFT train
split; held-out pairs from the golden set, whose prompts never reach training. DPO runs through
``train_dpo`` as the asset runs it, in ``<home>/bench/preference/`` (nothing is registered), and
the held-out win rates of champion and tuned adapter are printed with Wilson intervals and the
paired change, and written to ``<home>/bench/preference.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from pathlib import Path


def _log(msg: str) -> None:
    print(f"[preference] {msg}", flush=True)


def seed_pairs(loaded, spec, prompt, examples, kinds: dict[str, str], batch_size: int = 8):
    """One pair per example: the reference answer over the champion's greedy answer when that is
    wrong (a label field differs or it is not valid JSON), else over a corrupted reference.
    ``kinds`` receives each pair's kind by pair id."""
    import random

    from genops_assets.lib.formatting import build_messages, format_target, parse_prediction
    from genops_assets.lib.preference import PreferencePair
    from genops_assets.lib.probes import corrupt
    from genops_assets.serving.generation import generate

    messages = [build_messages(spec, ex.input_text, prompt=prompt, contexts=ex.contexts) for ex in examples]
    answers, started = [], time.monotonic()
    for start in range(0, len(messages), batch_size):
        answers += generate(loaded, messages[start:start + batch_size], "champion",
                            max_new_tokens=prompt.max_new_tokens, batch_size=batch_size)
        done = len(answers)
        eta = (time.monotonic() - started) / done * (len(messages) - done)
        _log(f"seeding: the champion answered {done}/{len(messages)} prompts, ETA {eta:.0f}s")
    pairs = []
    for ex, msgs, answer in zip(examples, messages, answers, strict=True):
        chosen = format_target(ex.reference, spec.output_fields)
        parsed = parse_prediction(answer.text, spec.output_fields)
        wrong = parsed is None or any(parsed.get(f) != ex.reference.get(f) for f in spec.label_fields)
        if wrong and answer.text.strip() != chosen:
            rejected, kind = answer.text, "champion_wrong"
        else:
            rng = random.Random(f"bench:{ex.example_id}")
            kind = "wrong_label"
            rejected = corrupt(ex.reference, spec, kind, rng)
            if rejected is None:
                kind = "truncated"
                rejected = corrupt(ex.reference, spec, kind, rng)
            if rejected is None:
                continue
        kinds[ex.example_id] = kind
        pairs.append(PreferencePair(ex.example_id, msgs, chosen, rejected))
    return pairs


def main(argv: list[str] | None = None) -> int:
    from genops_assets.lib.preference import DpoTrainConfig  # no heavy imports at its top

    p = argparse.ArgumentParser(prog="python -m genops_assets.bench.preference", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default=os.environ.get("GENOPS_TASK", "support_triage"))
    p.add_argument("--train", type=int, default=64, help="training pairs (SFT train split)")
    p.add_argument("--heldout", type=int, default=60, help="held-out pairs (golden set)")
    p.add_argument("--steps", type=int, default=DpoTrainConfig.max_steps, help="DPO optimizer steps")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=DpoTrainConfig.learning_rate, help="peak learning rate")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--champion-adapter", default=None,
                   help="a LoRA adapter folder instead of the registry's champion (then the task folder's prompt)")
    p.add_argument("--base-model", default=None, help="a Hugging Face folder instead of the embedded model")
    args = p.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from genops_assets.lib.base_model import convert_gguf, find_embedded_gguf, resolve_local_folder
    from genops_assets.lib.evaluation import examples_from_frame
    from genops_assets.lib.hashing import atomic_write_json
    from genops_assets.lib.preference import (
        heldout_win_rates,
        preference_shift,
        train_dpo,
        win_rate_change,
    )
    from genops_assets.lib.tasks import load_task
    from genops_assets.serving.adapters import load_model
    from resources import build_resources
    from resources.settings import GenopsSettings
    from resources.tracking import CHAMPION, registered_model_name
    from resources.warehouse import mart_schema

    started = time.monotonic()
    settings = GenopsSettings.from_env()
    res = build_resources()
    home, tracking, warehouse = res["home"], res["mlflow"], res["warehouse"]
    spec = load_task(settings.tasks_dir, args.task)
    schema = mart_schema(spec.name)
    for mart in ("sft_dataset", "golden_eval_dataset"):
        if not warehouse.table_exists(schema, mart):
            _log(f"{schema}.{mart} is missing in {warehouse.path}: run the loop first (make demo)")
            return 2
    if args.champion_adapter:
        champion_dir, champion_name, prompt = Path(args.champion_adapter), args.champion_adapter, spec.prompt
    else:
        model_name = registered_model_name(spec.name)
        champion = tracking.alias(model_name, CHAMPION)
        if champion is None:
            _log(f"{model_name} has no champion in {tracking.tracking_uri}: run the loop first (make demo), "
                 "or pass --champion-adapter")
            return 2
        champion_dir = tracking.fetch_registered_adapter(home.registry_cache, model_name, champion.version)
        champion_name = f"{model_name} v{champion.version}"
        prompt = tracking.resolve_prompt(spec).template
    base = (resolve_local_folder(Path(args.base_model).resolve()) if args.base_model
            else convert_gguf(find_embedded_gguf(), home.models_dir / "base", log=_log))
    _log(f"base {base.path}, champion {champion_name}")

    sft = warehouse.query_df(f"select * from {schema}.sft_dataset where split = 'train' order by example_id")
    golden = warehouse.query_df(f"select * from {schema}.golden_eval_dataset order by example_id")
    loaded = load_model(base.path, {"champion": champion_dir}, dtype="float32")
    kinds: dict[str, dict[str, str]] = {"train": {}, "heldout": {}}
    t0 = time.monotonic()
    train = seed_pairs(loaded, spec, prompt, examples_from_frame(sft.head(args.train)), kinds["train"])
    heldout = seed_pairs(loaded, spec, prompt, examples_from_frame(golden.head(args.heldout)), kinds["heldout"])
    del loaded
    counts = {split: dict(Counter(k.values())) for split, k in kinds.items()}
    _log(f"seeded {len(train)} train and {len(heldout)} held-out pairs in {time.monotonic() - t0:.0f}s: {counts}")

    cfg = DpoTrainConfig(beta=args.beta, learning_rate=args.lr, max_steps=args.steps, batch_size=args.batch_size,
                         seed=args.seed, log_every=max(1, args.steps // 12))
    work = home.sub("bench", "preference")

    def progress(rec: dict[str, float]) -> None:
        _log(f"step {int(rec['step'])}/{int(rec['total_steps'])} loss {rec.get('loss', float('nan')):.4f} "
             f"reward accuracy {rec.get('reward_accuracy', float('nan')):.3f} "
             f"margin {rec.get('reward_margin', float('nan')):.3f} ETA {rec.get('eta_s', 0):.0f}s")

    result = train_dpo(base.path, champion_dir, train, cfg, work / "adapter", work / "run", on_progress=progress,
                       on_message=_log)
    _log(f"DPO: {result.steps} steps in {result.runtime_s:.0f}s")
    rates = heldout_win_rates(base.path, {"champion": champion_dir, "dpo": work / "adapter"}, heldout)
    before, after = rates["champion"], rates["dpo"]
    change = win_rate_change(before, after, seed=args.seed)
    shift = preference_shift(before, after, seed=args.seed)
    report = {
        "task": spec.name, "champion": champion_name, "base_model": base.path, "config": cfg.as_params(),
        "train_pairs": result.train_pairs, "heldout_pairs": len(heldout), "pair_kinds": counts,
        "heldout_win_rate": {"before": before.as_dict(), "after": after.as_dict(), "change": change.as_dict()},
        "heldout_shift": shift,
        # Where the champion was wrong (its own answer rejected) and where a corrupted copy was.
        "heldout_by_kind": {kind: {"n": len(ids), "before": sum(before.outcomes[i] for i in ids) / len(ids),
                                   "after": sum(after.outcomes[i] for i in ids) / len(ids)}
                            for kind in sorted(set(kinds["heldout"].values()))
                            for ids in [[i for i, k in kinds["heldout"].items() if k == kind]]},
        "steps": result.steps, "train_s": round(result.runtime_s, 1),
        "total_s": round(time.monotonic() - started, 1),
        "last_train_loss": result.last("loss"), "last_reward_accuracy": result.last("reward_accuracy"),
    }
    out = atomic_write_json(home.sub("bench") / "preference.json", report)
    print(f"\nheld-out human-preference win rate on {len(heldout)} golden-prompt pairs ({spec.name}):")
    print(f"  champion ({champion_name}): {before.interval}  ({before.wins}/{before.n}, 95% Wilson)")
    print(f"  after DPO ({result.steps} steps, beta {cfg.beta}): {after.interval}  ({after.wins}/{after.n})")
    print(f"  change: {change.estimate:+.3f} [{change.low:+.3f}, {change.high:+.3f}] (paired bootstrap)")
    for kind, row in report["heldout_by_kind"].items():
        print(f"  {kind}: {row['before']:.3f} -> {row['after']:.3f} ({row['n']} pairs)")
    share, mean = shift["share_moved"], shift["mean_margin_change"]
    print(f"  pairs moved towards the chosen answer: {share['estimate']:.3f} [{share['low']:.3f}, {share['high']:.3f}]"
          f" ({shift['moved']}/{shift['n']}); mean margin change {mean['estimate']:+.3f} nats/token "
          f"[{mean['low']:+.3f}, {mean['high']:+.3f}]")
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
