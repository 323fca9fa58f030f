"""What the tuning asset computes around a training run: the data digests and version key that
make training idempotent, the SFT examples, progress lines, and the value it registers."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from genops_assets.lib.evaluation import examples_from_frame
from genops_assets.lib.formatting import build_messages, format_target
from genops_assets.lib.hashing import sha256_json
from genops_assets.lib.training import SftExample

# Training log keys recorded per step; the trainer's "loss" is the training loss.
LOGGED_KEYS = ("loss", "eval_loss", "learning_rate", "grad_norm")
THROUGHPUT_KEY = "tokens_per_s"  # non-padding tokens per second since the (resumed) run began


def frame_digest(df) -> str:
    """Content digest of an SFT split: ids, inputs and targets (and passages when it has them)."""
    cols = ["example_id", "input_text", "output_json"]
    # The passages are part of what is trained on; a task without them keeps its digests.
    if "contexts_json" in df.columns and df["contexts_json"].notna().any():
        cols += ["contexts_json", "reference_contexts_json"]
    return sha256_json(df[cols].to_dict(orient="records"))


def to_sft_examples(spec, df, prompt=None) -> list[SftExample]:
    return [
        SftExample(ex.example_id, build_messages(spec, ex.input_text, prompt=prompt, contexts=ex.contexts),
                   format_target(ex.reference, spec.output_fields))
        for ex in examples_from_frame(df)
    ]


@dataclass(frozen=True)
class TuningPlan:
    """The data of one training and the key that names it: same base model, splits, prompt,
    config and code -> same key -> the registered version is reused."""

    train: Any  # DataFrame rows of the train split
    validation: Any
    digests: dict[str, str]  # base_model, train, validation, prompt
    version_key: str


def plan_tuning(sft_df, base_model_digest: str, prompt_digest: str, params: Mapping[str, Any], code_version: str,
                max_train_examples: int | None = None) -> TuningPlan:
    """Split the sft_dataset mart (optionally capped: validation at a quarter of the train cap,
    at least 2) and derive the version key."""
    train = sft_df[sft_df["split"] == "train"]
    validation = sft_df[sft_df["split"] == "validation"]
    if max_train_examples:
        train = train.head(max_train_examples)
        validation = validation.head(max(2, max_train_examples // 4))
    digests = {"base_model": base_model_digest, "train": frame_digest(train),
               "validation": frame_digest(validation), "prompt": prompt_digest}
    key = sha256_json({**digests, "config": dict(params), "code": code_version})[:32]
    return TuningPlan(train, validation, digests, key)


def tracked_metrics(record: Mapping[str, float]) -> dict[str, float]:
    """The MLflow metrics of one training log record (``loss`` recorded as ``train_loss``)."""
    return {("train_loss" if k == "loss" else k): record[k] for k in (*LOGGED_KEYS, THROUGHPUT_KEY) if k in record}


class ProgressLine:
    """One progress line per training log record that is due: at most every ``every_s`` seconds,
    and always at an evaluation and at the last step."""

    def __init__(self, every_s: float = 2.0, clock: Callable[[], float] = time.monotonic,
                 keys: Sequence[str] = LOGGED_KEYS, label: str = "tuning"):
        self.every_s = every_s
        self.clock = clock
        self.last_at = float("-inf")
        self.keys = keys  # the record's numbers shown, in this order (the learning rate never)
        self.label = label

    def __call__(self, record: Mapping[str, float]) -> str | None:
        step, total = int(record["step"]), int(record["total_steps"])
        now = self.clock()
        if now - self.last_at <= self.every_s and "eval_loss" not in record and step != total:
            return None
        self.last_at = now
        parts = [f"step {step}/{total}"]
        parts += [f"{k} {record[k]:.4f}" for k in self.keys if k in record and k != "learning_rate"]
        if THROUGHPUT_KEY in record:
            parts.append(f"{record[THROUGHPUT_KEY]:.0f} tokens/s")
        eta = record.get("eta_s")
        if eta is not None:
            parts.append(f"ETA {int(eta) // 60}m{int(eta) % 60:02d}s")
        return f"{self.label}: " + ", ".join(parts)


def history_until(history: Sequence[Mapping[str, float]], step: int) -> list[Mapping[str, float]]:
    """The log records up to ``step`` (a resumed run's curve before its checkpoint)."""
    return [rec for rec in history if rec["step"] <= step]


@dataclass(frozen=True)
class TunedAdapter:
    """The tuned_adapter asset's value (before registration gives it a version)."""

    model_name: str
    version_key: str
    adapter_dir: str
    adapter_digest: str
    adapter_files: dict[str, str]
    run_id: str
    base_model_digest: str
    base_model_path: str
    dataset_digests: dict[str, str]
    prompt: dict[str, Any]
    steps: int
    final_train_loss: float | None
    final_eval_loss: float | None
    model_id: str | None = None  # the version's MLflow model (LoggedModel) in the tuning run

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
