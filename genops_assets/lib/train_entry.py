"""The SFT training program Dagster Pipes launches: ``python -m genops_assets.lib.train_entry``,
or ``accelerate launch --config_file <file> -m genops_assets.lib.train_entry`` for several
processes (data parallel, DeepSpeed, FSDP).

The request arrives in the Pipes context's extras under ``train`` (a :class:`TrainRequest`: the
base model folder, the examples as JSON Lines files the tuning asset wrote, the
``LoraTrainConfig`` fields, the adapter and work folders, the data digest, resume). Every rank
reads it and calls ``train_lora``; rank 0 alone talks back to Dagster:

- a progress line (step/total, losses, non-padding tokens/s, ETA) through the Pipes log when due;
- each training log record as a custom message ``{"kind": "record", "record": {...}}``, which the
  tuning asset logs to its MLflow run as it arrives (this process never writes to MLflow, so a
  training pod needs no tracking-server credentials);
- at the end ``{"kind": "result", "result": {...}}`` (what ``TrainResult`` carries), or
  ``{"kind": "input_error", "message": ...}`` when the inputs cannot be trained on (bad data,
  foreign checkpoints, a quantization this machine cannot run), so the asset fails without
  retrying.

The orchestration side (``resources/trainer.py``) imports this module for the request and
message shapes only: nothing here imports torch at module level.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from genops_assets.lib.hashing import atomic_write_text
from genops_assets.lib.jsonl import read_jsonl
from genops_assets.lib.quantization import QuantizationUnavailable
from genops_assets.lib.training import LoraTrainConfig, SftExample, TrainingInputError, TrainResult, process_state

REQUEST_KEY = "train"  # the Pipes extras key of the request
RECORD, RESULT, INPUT_ERROR = "record", "result", "input_error"  # custom message kinds


class TrainRequestError(ValueError):
    """A training request that is missing a field or carries an unknown one."""


@dataclass(frozen=True)
class TrainRequest:
    """What one training needs, JSON-able: the Pipes extras of the launched program."""

    base_dir: str
    train_file: str  # JSON Lines of SftExample (example_id, messages, target)
    validation_file: str
    config: dict[str, Any]  # LoraTrainConfig fields
    adapter_dir: str
    work_dir: str
    data_digest: str = ""
    resume: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainRequest:
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        unknown, missing = set(data) - names, required - set(data)
        if unknown or missing:
            raise TrainRequestError(f"training request: missing {sorted(missing)}, unknown {sorted(unknown)}")
        return cls(**dict(data))

    def train_config(self) -> LoraTrainConfig:
        fields = {f.name for f in dataclasses.fields(LoraTrainConfig)}
        unknown = set(self.config) - fields
        if unknown:
            raise TrainRequestError(f"training request config: unknown LoraTrainConfig fields {sorted(unknown)}")
        values = dict(self.config)
        if "target_modules" in values:
            values["target_modules"] = tuple(values["target_modules"])
        return LoraTrainConfig(**values)


def config_dict(cfg: LoraTrainConfig) -> dict[str, Any]:
    """``cfg`` as the request's JSON-able ``config``."""
    return {**asdict(cfg), "target_modules": list(cfg.target_modules)}


def write_examples(path: str | Path, examples: Sequence[SftExample]) -> Path:
    """The examples as JSON Lines, written atomically (the file the launched program reads)."""
    lines = (json.dumps({"example_id": ex.example_id, "messages": ex.messages, "target": ex.target},
                        ensure_ascii=False) for ex in examples)
    return atomic_write_text(path, "".join(line + "\n" for line in lines))


def read_examples(path: str | Path) -> list[SftExample]:
    """The examples :func:`write_examples` wrote; a row without its fields is named by line."""
    out = []
    for i, row in enumerate(read_jsonl(path), start=1):
        try:
            out.append(SftExample(str(row["example_id"]), list(row["messages"]), str(row["target"])))
        except (KeyError, TypeError) as exc:
            raise TrainingInputError(f"{path}, example {i}: not an SFT example ({exc!r})") from exc
    return out


def die_with_launcher() -> None:
    """Under a launcher (``accelerate launch`` starts the ranks as its children), end this rank
    when the launcher ends, even by SIGKILL: a rank left running would go on writing checkpoints
    beside the retry that resumes from them. Linux only (prctl)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() == 1:  # the launcher was gone before the request took effect
        os._exit(1)


def run_request(request: TrainRequest, report: Callable[[str, dict[str, Any]], None] | None = None,
                log: Callable[[str], None] | None = None,
                after_record: Callable[[dict[str, float]], None] | None = None) -> TrainResult:
    """Train what ``request`` asks for. ``report(kind, payload)`` and ``log(line)`` are given on
    rank 0 only; ``after_record`` runs on every rank after each log record."""
    from genops_assets.lib.training import train_lora
    from genops_assets.lib.tuning import ProgressLine

    line = ProgressLine()

    def on_progress(record: dict[str, float]) -> None:
        if report is not None:
            report(RECORD, {"record": record})
        text = line(record)
        if text and log is not None:
            log(text)
        if after_record is not None:
            after_record(record)

    return train_lora(
        request.base_dir, read_examples(request.train_file), read_examples(request.validation_file),
        request.train_config(), adapter_dir=request.adapter_dir, work_dir=request.work_dir, on_progress=on_progress,
        data_digest=request.data_digest, resume=request.resume, on_message=log,
    )


def _request_from_context() -> TrainRequest:
    """The request from the Pipes context, read without opening a message channel (ranks > 0)."""
    from dagster_pipes import PipesDefaultContextLoader, PipesEnvVarParamsLoader

    params = PipesEnvVarParamsLoader().load_context_params()
    with PipesDefaultContextLoader().load_context(params) as data:
        return TrainRequest.from_dict(data["extras"][REQUEST_KEY])


def main(after_record: Callable[[dict[str, float]], None] | None = None) -> None:
    """Rank 0 opens Dagster Pipes and reports; the other ranks only read the request and train."""
    import torch

    state = process_state(torch.cuda.is_available())
    if state.num_processes > 1:
        die_with_launcher()
    if not state.is_main_process:
        run_request(_request_from_context(), after_record=after_record)
        return
    from dagster_pipes import open_dagster_pipes

    with open_dagster_pipes() as pipes:
        request = TrainRequest.from_dict(pipes.get_extra(REQUEST_KEY))

        def report(kind: str, payload: dict[str, Any]) -> None:
            pipes.report_custom_message({"kind": kind, **payload})

        try:
            result = run_request(request, report, pipes.log.info, after_record)
        except (TrainingInputError, QuantizationUnavailable) as exc:  # a retry would fail the same way
            report(INPUT_ERROR, {"message": str(exc)})
            raise
        report(RESULT, {"result": asdict(result)})


if __name__ == "__main__":
    main()
