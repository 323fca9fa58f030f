"""Preference tuning (DPO) of the champion's LoRA adapter on people's chosen / rejected answers,
and the held-out preference win rate that says whether it worked.

The policy is the base model with the champion's adapter loaded trainable; the reference is
the same champion, frozen. The result is again one LoRA adapter of the champion's shape, which
the endpoint serves like any SFT adapter. Prompts are rendered as SFT renders them (the task's
prompt through the chat template, answer followed by the end-of-turn token), so a pair teaches
the model in the very context it answers in.

The held-out win rate (``preference_accuracy``) is the share of held-out pairs whose chosen
answer the model finds more likely, per token, than the rejected one, with a Wilson interval.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from genops_assets.lib.formatting import build_messages
from genops_assets.lib.hashing import atomic_dir, sha256_json
from genops_assets.lib.integrity import verify_folder, verify_model_folder, write_manifest
from genops_assets.lib.stats import Interval, bootstrap_ci, paired_difference_ci, wilson_interval
from genops_assets.lib.training import SftExample, TrainingInputError, tokenize_example

PREFERENCE_CODE_VERSION = "dpo-1"
PAIR_COLUMNS = ("pair_id", "input_text", "chosen_json", "rejected_json", "split")
TRAIN, HELDOUT = "train", "heldout"
# What one DPO log record holds, in the order progress lines show it.
DPO_LOGGED_KEYS = ("loss", "reward_accuracy", "reward_margin", "learning_rate", "grad_norm")
_TRL_KEYS = {"loss": "loss", "rewards/accuracies": "reward_accuracy", "rewards/margins": "reward_margin",
             "learning_rate": "learning_rate", "grad_norm": "grad_norm"}
# Longest prompt+answer scored for the win rate; far beyond any task answer, a guard against a runaway row.
SCORE_MAX_LENGTH = 4096


class PreferenceInputError(TrainingInputError):
    """The preference pairs cannot be trained on or scored as given; retrying will not help."""


@dataclass(frozen=True)
class DpoTrainConfig:
    # Learning rate and steps as measured on the embedded model (genops_assets/bench/preference.py):
    # 64 steps at 2e-4 moved 51 of 60 held-out pairs towards the chosen answer; 32 at 1e-4 barely moved it.
    beta: float = 0.1
    loss_type: str = "sigmoid"
    learning_rate: float = 2e-4
    max_steps: int = 64
    epochs: float = 1.0
    batch_size: int = 4
    grad_accum: int = 1
    warmup_steps: int = 3
    max_length: int = 512
    seed: int = 0
    log_every: int = 1
    bf16: bool = False
    gradient_checkpointing: bool = False

    def as_params(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PreferencePair:
    pair_id: str
    messages: list[dict[str, str]]
    chosen: str
    rejected: str

    def as_sft(self, answer: str) -> SftExample:
        return SftExample(self.pair_id, self.messages, answer)


@dataclass
class DpoResult:
    adapter_dir: str
    steps: int
    train_pairs: int
    skipped_too_long: list[str]
    # pair_id -> (chosen, rejected) summed log-probs under the reference the loss was computed against
    reference_logps: dict[str, tuple[float, float]]
    history: list[dict[str, float]] = field(default_factory=list)
    runtime_s: float = 0.0

    def last(self, key: str) -> float | None:
        values = [h[key] for h in self.history if key in h]
        return values[-1] if values else None


@dataclass(frozen=True)
class PreferenceAccuracy:
    """How often a model prefers the chosen answer (length-normalised log-likelihood)."""

    n: int
    wins: int
    interval: Interval
    outcomes: dict[str, int]  # pair_id -> 1 when chosen scored higher than rejected, else 0
    margins: dict[str, float]  # pair_id -> per-token log-likelihood of chosen minus rejected

    def as_dict(self) -> dict[str, Any]:
        return {"n": self.n, "wins": self.wins, **self.interval.as_dict()}


@dataclass(frozen=True)
class PreferencePlan:
    """The pairs of one preference tuning and the key that names it: same base model, champion,
    pairs, prompt, config and code -> same key -> the registered version is reused."""

    train: Any  # DataFrame rows of the train split (capped)
    heldout: Any
    digests: dict[str, str]
    version_key: str


def pairs_digest(df) -> str:
    """Content digest of preference pairs: ids, inputs and both answers."""
    return sha256_json(df[["pair_id", "input_text", "chosen_json", "rejected_json"]].to_dict(orient="records"))


def plan_preference(pairs_df, base_model_digest: str, parent: Mapping[str, str], prompt_digest: str,
                    params: Mapping[str, Any], code_version: str, max_pairs: int | None = None,
                    min_train_pairs: int = 1, table: str = "preference_pairs") -> PreferencePlan:
    """Split the preference_pairs mart (train capped at ``max_pairs``, by pair id), check there is
    enough to train on, and derive the version key from everything the adapter depends on."""
    missing = [c for c in PAIR_COLUMNS if c not in pairs_df.columns]
    if missing:
        raise PreferenceInputError(f"{table} lacks column(s) {missing} (has {list(pairs_df.columns)})")
    unknown = sorted(set(pairs_df["split"]) - {TRAIN, HELDOUT})
    if unknown:
        raise PreferenceInputError(f"{table}: unknown split value(s) {unknown}; expected '{TRAIN}' or '{HELDOUT}'")
    ordered = pairs_df.sort_values("pair_id", kind="stable")
    train = ordered[ordered["split"] == TRAIN]
    heldout = ordered[ordered["split"] == HELDOUT]
    if max_pairs:
        train = train.head(max_pairs)
    if len(train) < min_train_pairs:
        raise PreferenceInputError(
            f"{table} has {len(train)} '{TRAIN}' pair(s) (of {len(pairs_df)} rows); preference tuning needs at "
            f"least {min_train_pairs}. Collect more agreed ratings (genops rating UI), then run human_ratings and "
            "the preference_pairs model again.")
    digests = {"base_model": base_model_digest, "parent_adapter": parent["adapter_digest"],
               "parent_version": str(parent["version"]), "train": pairs_digest(train),
               "heldout": pairs_digest(heldout), "prompt": prompt_digest}
    key = sha256_json({**digests, "config": dict(params), "code": code_version})[:32]
    return PreferencePlan(train, heldout, digests, key)


def to_preference_pairs(spec, df, prompt=None, contexts: Mapping[str, Sequence[str]] | None = None
                        ) -> list[PreferencePair]:
    """Rows of the preference_pairs mart as pairs whose prompt is rendered as SFT renders it.
    A task that shows retrieved passages needs them for every pair (``contexts`` by example id)."""
    pairs = []
    for row in df.itertuples(index=False):
        shown: Sequence[str] = ()
        if spec.contexts is not None:
            if contexts is None or getattr(row, "example_id", None) not in contexts:
                raise PreferenceInputError(
                    f"pair {row.pair_id}: task '{spec.name}' shows retrieved passages, and example "
                    f"{getattr(row, 'example_id', None)!r} has none in the task's datasets")
            shown = contexts[row.example_id]
        pairs.append(PreferencePair(str(row.pair_id), build_messages(spec, row.input_text, prompt=prompt,
                                                                     contexts=shown),
                                    str(row.chosen_json), str(row.rejected_json)))
    validate_pairs(pairs)
    return pairs


def validate_pairs(pairs: Sequence[PreferencePair]) -> None:
    """Refuse pairs nothing can be learnt from: the same answer twice, an empty chosen answer, a
    pair id twice. An empty rejected answer is a real one (a model that stopped at once)."""
    seen: set[str] = set()
    for p in pairs:
        if p.pair_id in seen:
            raise PreferenceInputError(f"pair {p.pair_id} appears twice")
        seen.add(p.pair_id)
        if not p.chosen.strip():
            raise PreferenceInputError(f"pair {p.pair_id}: the chosen answer is empty")
        if p.chosen.strip() == p.rejected.strip():
            raise PreferenceInputError(f"pair {p.pair_id}: chosen and rejected are the same answer "
                                       f"({p.chosen[:80]!r}); a preference needs two different answers")


# -- scoring ---------------------------------------------------------------------------------


def answer_logprobs(model, tokenizer, pairs: Sequence[PreferencePair], normalise: bool = True,
                    batch_size: int = 4) -> dict[str, tuple[float, float]]:
    """pair_id -> (chosen, rejected) log-likelihood of each answer (and its end-of-turn token)
    after the pair's prompt: summed, or per token with ``normalise``. Rows are right-padded, so
    every real token keeps its position and never attends to padding."""
    import torch

    seqs: list[tuple[list[int], int]] = []  # (ids, answer start)
    for p in pairs:
        for answer in (p.chosen, p.rejected):
            row = tokenize_example(tokenizer, p.as_sft(answer), SCORE_MAX_LENGTH)
            if row is None:
                raise PreferenceInputError(f"pair {p.pair_id}: prompt and answer exceed {SCORE_MAX_LENGTH} tokens")
            seqs.append((row["input_ids"], sum(1 for x in row["labels"] if x < 0)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    scores: list[float] = []
    with torch.inference_mode():
        for i in range(0, len(seqs), batch_size):
            chunk = seqs[i:i + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, (ids, _) in enumerate(chunk):
                input_ids[r, :len(ids)] = torch.tensor(ids)
                mask[r, :len(ids)] = 1
            logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits.float()
            logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
            targets = input_ids[:, 1:].to(device).unsqueeze(-1)
            token_lp = logprobs.gather(-1, targets).squeeze(-1)
            for r, (ids, start) in enumerate(chunk):
                # Token t is predicted by the logits at t - 1.
                span = token_lp[r, start - 1:len(ids) - 1]
                total = float(span.sum())
                scores.append(total / span.numel() if normalise else total)
    return {p.pair_id: (scores[2 * k], scores[2 * k + 1]) for k, p in enumerate(pairs)}


def preference_accuracy(model, tokenizer, pairs: Sequence[PreferencePair], level: float = 0.95,
                        batch_size: int = 4) -> PreferenceAccuracy:
    """Share of ``pairs`` where ``model`` gives the chosen answer a higher per-token
    log-likelihood than the rejected one (ties count as losses), with a Wilson interval."""
    if not pairs:
        raise PreferenceInputError("no held-out pairs to score")
    validate_pairs(pairs)
    scores = answer_logprobs(model, tokenizer, pairs, normalise=True, batch_size=batch_size)
    margins = {pid: c - r for pid, (c, r) in scores.items()}
    outcomes = {pid: int(m > 0) for pid, m in margins.items()}
    wins = sum(outcomes.values())
    return PreferenceAccuracy(len(pairs), wins, wilson_interval(wins, len(pairs), level), outcomes, margins)


def heldout_win_rates(base_dir: str | Path, adapters: Mapping[str, str | Path], pairs: Sequence[PreferencePair],
                      batch_size: int = 4) -> dict[str, PreferenceAccuracy]:
    """``preference_accuracy`` of each adapter (name -> folder), loaded as the endpoint loads them."""
    from genops_assets.serving.adapters import load_model, selected

    loaded = load_model(base_dir, adapters, dtype="float32")
    tokenizer = loaded.tokenizer
    out = {}
    for name in adapters:
        with selected(loaded, name) as model:
            out[name] = preference_accuracy(model, tokenizer, pairs, batch_size=batch_size)
    return out


def win_rate_change(before: PreferenceAccuracy, after: PreferenceAccuracy, seed: int = 0) -> Interval:
    """Paired bootstrap interval of the change in win rate over the same pairs (after - before)."""
    ids = sorted(before.outcomes)
    if sorted(after.outcomes) != ids:
        raise ValueError("before and after were scored on different pairs")
    return paired_difference_ci([after.outcomes[i] for i in ids], [before.outcomes[i] for i in ids], seed=seed)


def preference_shift(before: PreferenceAccuracy, after: PreferenceAccuracy, level: float = 0.95,
                     seed: int = 0) -> dict[str, Any]:
    """How far tuning moved each held-out pair towards the people's choice: the change of the
    chosen-minus-rejected margin (per-token log-likelihood) from ``before`` to ``after``.

    This is DPO's implicit reward accuracy measured on pairs it never saw: the share of pairs
    whose margin grew (Wilson interval) and the mean change (bootstrap interval). It reads the
    direction of the move even where the absolute win rate cannot flip yet: a champion's own
    greedy answer, the rejected side of most seeded pairs, starts far more likely than anything
    else it could say."""
    ids = sorted(before.margins)
    if sorted(after.margins) != ids:
        raise ValueError("before and after were scored on different pairs")
    shifts = [after.margins[i] - before.margins[i] for i in ids]
    moved = sum(1 for d in shifts if d > 0)
    return {"n": len(ids), "moved": moved, "share_moved": wilson_interval(moved, len(ids), level).as_dict(),
            "mean_margin_change": bootstrap_ci(shifts, level=level, seed=seed).as_dict()}


def win_rate_report(base_dir: str | Path, champion_dir: str | Path, tuned_dir: str | Path,
                    pairs: Sequence[PreferencePair], batch_size: int = 4, seed: int = 0) -> dict[str, dict]:
    """The held-out win rate before (champion) and after (tuned adapter), the paired change, and
    how far the pairs moved towards the chosen answers (``preference_shift``)."""
    rates = heldout_win_rates(base_dir, {"champion": champion_dir, "tuned": tuned_dir}, pairs, batch_size)
    change = win_rate_change(rates["champion"], rates["tuned"], seed=seed)
    return {"before": rates["champion"].as_dict(), "after": rates["tuned"].as_dict(), "change": change.as_dict(),
            "shift": preference_shift(rates["champion"], rates["tuned"], seed=seed)}


# -- training --------------------------------------------------------------------------------


def dpo_metrics(record: Mapping[str, float]) -> dict[str, float]:
    """The MLflow metrics of one DPO log record (``loss`` recorded as ``train_loss``)."""
    return {("train_loss" if k == "loss" else k): record[k] for k in DPO_LOGGED_KEYS if k in record}


def _fits(tokenizer, pair: PreferencePair, max_length: int) -> bool:
    return all(tokenize_example(tokenizer, pair.as_sft(answer), max_length) is not None
               for answer in (pair.chosen, pair.rejected))


def train_dpo(
    base_dir: str | Path,
    champion_dir: str | Path,
    train: Sequence[PreferencePair],
    cfg: DpoTrainConfig,
    adapter_dir: str | Path,
    work_dir: str | Path,
    on_progress: Callable[[dict[str, float]], None] | None = None,
    on_message: Callable[[str], None] | None = None,
) -> DpoResult:
    """DPO of the champion adapter (``champion_dir``) on ``train``; the tuned adapter is written
    (safetensors) atomically to ``adapter_dir``. Pairs longer than ``cfg.max_length`` tokens are
    skipped and reported (cutting would drop the answers or the instructions). No checkpoints: a
    run is minutes, an interrupted one starts again."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback, set_seed
    from trl import DPOConfig, DPOTrainer

    validate_pairs(train)
    if not train:
        raise PreferenceInputError("no training pairs")
    if not Path(champion_dir, "adapter_config.json").is_file():
        raise PreferenceInputError(f"{champion_dir}: not a PEFT adapter folder (no adapter_config.json)")
    # The policy and the reference are both loaded from these files: checked once, before either.
    verify_model_folder(base_dir)
    verify_folder(champion_dir)
    set_seed(cfg.seed)
    started = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    kept = [p for p in train if _fits(tokenizer, p, cfg.max_length)]
    kept_ids = {p.pair_id for p in kept}
    skipped = [p.pair_id for p in train if p.pair_id not in kept_ids]
    if skipped and on_message:
        on_message(f"{len(skipped)} pair(s) longer than max_length={cfg.max_length} tokens left out: {skipped[:5]}")
    if not kept:
        raise PreferenceInputError(f"every training pair is longer than max_length={cfg.max_length} tokens")
    dtype = torch.bfloat16 if cfg.bf16 else torch.float32

    def champion(trainable: bool):
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype, use_safetensors=True)
        return PeftModel.from_pretrained(base, str(champion_dir), is_trainable=trainable)

    policy = champion(trainable=True)
    # The reference must be the champion the policy starts from. Without ``ref_model`` TRL takes
    # the reference from the policy itself: adapters disabled (the bare base model) for a new
    # adapter or, depending on the TRL/PEFT versions and adapter config, a copy of the loaded one.
    # Against the bare base, DPO would reward drifting back towards the base model and the
    # "implicit rewards" would measure distance from it, not from the champion. So the reference
    # is given explicitly: the champion merged into its own frozen copy of the base. Its
    # log-probabilities are computed once, before training (``precompute_ref_log_probs``).
    reference = champion(trainable=False).merge_and_unload()
    reference.eval().requires_grad_(False)

    steps_per_epoch = math.ceil(len(kept) / (cfg.batch_size * cfg.grad_accum))
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(steps_per_epoch * cfg.epochs)
    history: list[dict[str, float]] = []

    class _Progress(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:
                return  # the end-of-training summary
            step = state.global_step
            rec = {"step": float(step), "total_steps": float(total_steps)}
            rec.update({ours: float(logs[theirs]) for theirs, ours in _TRL_KEYS.items() if theirs in logs})
            if step > 0:
                rec["eta_s"] = (time.monotonic() - started) / step * max(total_steps - step, 0)
            history.append(rec)
            if on_progress:
                on_progress(rec)

    has_cuda = torch.cuda.is_available()
    args = DPOConfig(
        output_dir=str(Path(work_dir) / "trainer"),
        beta=cfg.beta,
        loss_type=[cfg.loss_type],
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=cfg.warmup_steps,
        max_steps=total_steps,
        logging_steps=cfg.log_every,
        save_strategy="no",
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=cfg.bf16 and has_cuda,
        use_cpu=not has_cuda,
        gradient_checkpointing=cfg.gradient_checkpointing,
        max_length=None,  # over-long pairs were left out above, never cut
        precompute_ref_log_probs=True,
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    # Standard (not conversational) rows: the prompt is the chat-template text SFT trains on and
    # TRL appends the end-of-turn token to each answer, so the token ids equal SFT's.
    rows = [{"prompt": tokenizer.apply_chat_template(p.messages, tokenize=False, add_generation_prompt=True),
             "chosen": p.chosen, "rejected": p.rejected} for p in kept]
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer, callbacks=[_Progress()])
    trainer.remove_callback(PrinterCallback)  # the progress callback reports each log record
    ref = trainer.train_dataset
    reference_logps = {p.pair_id: (float(c), float(r))
                       for p, c, r in zip(kept, ref["ref_chosen_logps"], ref["ref_rejected_logps"], strict=True)}
    trainer.train()
    with atomic_dir(adapter_dir) as tmp:
        policy.save_pretrained(tmp, safe_serialization=True)
        write_manifest(tmp)
    return DpoResult(adapter_dir=str(adapter_dir), steps=trainer.state.global_step, train_pairs=len(kept),
                     skipped_too_long=skipped, reference_logps=reference_logps, history=history,
                     runtime_s=time.monotonic() - started)
