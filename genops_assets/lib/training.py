"""LoRA supervised fine-tuning with PEFT on the Hugging Face Trainer (accelerate underneath).

Loss is computed on the response tokens only: the rows carry their labels. By default a batch is
one padding-free row whose examples share their prompt prefix (``lib/packing.py``); with
``packing=False`` TRL's collator pads length-grouped batches. Every knob lives in ``LoraTrainConfig``;
``to_lora_config`` is the one place that turns it into a PEFT ``LoraConfig``. Progress and
losses go to a callback so the caller (a Dagster asset) decides where they are logged.

Training is resumable. The Trainer writes ``checkpoint-N`` folders file by file, so a process
killed mid-save leaves a folder that looks like a checkpoint but is not one. After each save a
completion marker (``genops-complete.json``: step and sha256 of every file) is written
atomically into the folder; on the next call with the same ``work_dir`` only checkpoints whose
marker exists and whose files still match it are resumed from, the others are removed.
``work_dir/resume.json`` records what the checkpoints were trained on (caller's data digest,
examples, config, code); a checkpoint trained on something else is never resumed from.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from genops_assets.lib.hashing import atomic_dir, atomic_write_json, sha256_file, sha256_json
from genops_assets.lib.integrity import verify_model_folder, write_manifest
from genops_assets.lib.packing import sft_batching
from genops_assets.lib.quantization import (
    COMPUTE_DTYPES,
    check_quantization_name,
    require_quantization,
    resolve_compute_dtype,
    to_bnb_config,
)

TRAINING_CODE_VERSION = "sft-1"
IGNORE_INDEX = -100
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CHECKPOINTS_DIR = "checkpoints"
RESUME_FILE = "resume.json"
COMPLETE_MARKER = "genops-complete.json"
# Two kept checkpoints: the Trainer deletes old ones before the new one gets its marker, so the
# previous complete checkpoint must survive that rotation.
KEEP_CHECKPOINTS = 2
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
SHARD_INDEX = ".metadata"  # torch.distributed.checkpoint's index of a sharded save
QUANTIZATION_FIELDS = ("quantization", "compute_dtype", "double_quant")


class TrainingInputError(ValueError):
    """Training cannot start with these inputs; retrying will not help."""


class ResumeMismatchError(TrainingInputError):
    """The checkpoints in the work folder were trained on other data, config or code."""


@dataclass(frozen=True)
class LoraTrainConfig:
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    learning_rate: float = 1e-3
    max_steps: int = 100
    epochs: float = 1.0
    max_length: int = 384
    batch_size: int = 4
    grad_accum: int = 1
    warmup_steps: int = 5
    weight_decay: float = 0.0
    seed: int = 0
    eval_every: int = 50
    save_every: int = 50
    log_every: int = 5
    bf16: bool = False
    gradient_checkpointing: bool = False
    deepspeed_config: str | None = None
    quantization: str = "none"  # none | nf4 | int8: the frozen base loaded through bitsandbytes (QLoRA)
    compute_dtype: str = "auto"  # nf4 matmul dtype; auto: bfloat16 on a GPU that has it, else float32
    double_quant: bool = True  # nf4: quantize the quantization constants too
    packing: bool = True  # padding-free batches sharing the prompt prefix (lib/packing.py); False: padded batches

    def __post_init__(self) -> None:
        check_quantization_name(self.quantization)
        if self.quantization != "none" and self.deepspeed_config:
            raise ValueError(f"quantization={self.quantization!r} with deepspeed_config: a quantized base is trained "
                             "on one device here; drop one of the two")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype: unknown '{self.compute_dtype}' (use one of {', '.join(COMPUTE_DTYPES)})")

    def as_params(self) -> dict[str, Any]:
        """The config as MLflow params and version-key input. The quantization fields appear for a
        quantized run only, so an unquantized run keeps the version key (and the resumable
        checkpoints) it had before quantization was an option; the tuning asset logs
        ``quantization`` for every run."""
        d = asdict(self)
        d["target_modules"] = ",".join(self.target_modules)
        if self.quantization == "none":
            for key in QUANTIZATION_FIELDS:
                d.pop(key)
        elif self.quantization == "int8":
            for key in ("compute_dtype", "double_quant"):  # nf4 only
                d.pop(key)
        return d


@dataclass(frozen=True)
class SftExample:
    example_id: str
    messages: list[dict[str, str]]
    target: str


@dataclass
class TrainResult:
    adapter_dir: str
    steps: int
    train_examples: int
    skipped_too_long: list[str]
    history: list[dict[str, float]] = field(default_factory=list)
    runtime_s: float = 0.0
    resumed_from_step: int | None = None
    skipped_checkpoints: list[str] = field(default_factory=list)

    def last(self, key: str) -> float | None:
        values = [h[key] for h in self.history if key in h]
        return values[-1] if values else None


ProgressFn = Callable[[dict[str, float]], None]
MessageFn = Callable[[str], None]


def to_lora_config(cfg: LoraTrainConfig):
    from peft import LoraConfig, TaskType

    return LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
        task_type=TaskType.CAUSAL_LM,
    )


def tokenize_example(tokenizer, ex: SftExample, max_length: int) -> dict[str, list[int]] | None:
    """Prompt (chat template + generation prompt) followed by the target and end-of-turn token.

    Prompt tokens get label -100 so the loss covers only the answer (TRL's collator pads the
    rows and keeps these labels). Returns None when the whole sequence does not fit in
    ``max_length``: cutting, as TRL's own dataset preparation would, drops the answer or the
    instructions; the caller reports the skipped ids.
    """
    prompt = tokenizer.apply_chat_template(ex.messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(ex.target + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    if len(prompt_ids) + len(answer_ids) > max_length:
        return None
    return {
        "input_ids": prompt_ids + answer_ids,
        "attention_mask": [1] * (len(prompt_ids) + len(answer_ids)),
        "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids,
    }


def examples_digest(train: Sequence[SftExample], validation: Sequence[SftExample]) -> str:
    """Digest of the examples themselves, so the library notices changed data on its own."""
    def rows(part):
        return [[ex.example_id, ex.messages, ex.target] for ex in part]

    return sha256_json({"train": rows(train), "validation": rows(validation)})


def checkpoint_step(path: str | Path) -> int | None:
    m = _CHECKPOINT_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


def _checkpoint_files(ckpt: Path) -> dict[str, str]:
    # Dot files are temp files of an interrupted atomic write, not part of the checkpoint; except
    # the index torch.distributed.checkpoint writes beside the shards of a sharded (FSDP) save.
    return {
        p.relative_to(ckpt).as_posix(): sha256_file(p)
        for p in sorted(ckpt.rglob("*"))
        if p.is_file() and p.name != COMPLETE_MARKER and (not p.name.startswith(".") or p.name == SHARD_INDEX)
    }


def write_checkpoint_marker(ckpt: str | Path, step: int) -> Path:
    """Record that ``ckpt`` is fully written: its step and the sha256 of each of its files."""
    ckpt = Path(ckpt)
    return atomic_write_json(ckpt / COMPLETE_MARKER, {"step": step, "code": TRAINING_CODE_VERSION,
                                                      "files": _checkpoint_files(ckpt)})


def checkpoint_problem(ckpt: str | Path) -> str | None:
    """Why ``ckpt`` cannot be resumed from, or None when it is complete.

    Complete means: a readable completion marker for this step, every file the Trainer needs
    to resume (adapter weights, optimizer, scheduler, trainer state, RNG state) present, and
    every recorded file still matching its sha256.
    """
    ckpt = Path(ckpt)
    step = checkpoint_step(ckpt)
    marker_path = ckpt / COMPLETE_MARKER
    if not marker_path.is_file():
        return "no completion marker (the save was interrupted)"
    try:
        marker = json.loads(marker_path.read_text(encoding="utf-8"))
        recorded: dict[str, str] = marker["files"]
        marker_step = int(marker["step"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{COMPLETE_MARKER} unreadable: {exc}"
    if marker_step != step:
        return f"{COMPLETE_MARKER} is for step {marker_step}, the folder is step {step}"
    names = set(recorded)
    # FSDP with sharded state dicts writes the weights and the optimizer as one shard per rank in
    # pytorch_model_fsdp_0/ and optimizer_0/, each with its index.
    sharded = {prefix: f"{prefix}0/{SHARD_INDEX}" in names for prefix in ("pytorch_model_fsdp_", "optimizer_")}
    needed = {
        "adapter weights": any(n.endswith("adapter_model.safetensors") or n.endswith("adapter_model.bin")
                               for n in names) or sharded["pytorch_model_fsdp_"],
        "trainer_state.json": "trainer_state.json" in names,
        "RNG state": any(re.fullmatch(r"rng_state(_\d+)?\.pth", n) for n in names),
        # DeepSpeed keeps optimizer and scheduler in its own global_step* folder.
        "optimizer.pt": "optimizer.pt" in names or any(n.startswith("global_step") for n in names)
                        or sharded["optimizer_"],
        "scheduler.pt": "scheduler.pt" in names or any(n.startswith("global_step") for n in names),
    }
    missing = [what for what, ok in needed.items() if not ok]
    if missing:
        return "missing " + ", ".join(missing)
    for name, digest in recorded.items():
        path = ckpt / name
        if not path.is_file():
            return f"{name} is gone"
        try:
            actual = sha256_file(path)
        except OSError as exc:
            return f"{name} unreadable: {exc}"
        if actual != digest:
            return f"{name} does not match its recorded sha256 (truncated or changed after the save)"
    try:
        state_step = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))["global_step"]
    except (OSError, ValueError, KeyError) as exc:
        return f"trainer_state.json unreadable: {exc}"
    if state_step != step:
        return f"trainer_state.json says step {state_step}"
    return None


def find_resume_checkpoint(checkpoints_dir: str | Path, remove_incomplete: bool = True
                           ) -> tuple[Path | None, list[str]]:
    """The newest complete checkpoint under ``checkpoints_dir`` (or None) and one line per
    newer checkpoint that was skipped, with the reason. Skipped checkpoints are deleted unless
    ``remove_incomplete`` is False (they could never be resumed from). Checkpoints older than
    the chosen one are not read (verifying means hashing every file) and are left to the
    Trainer's rotation."""
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return None, []
    folders = sorted((p for p in root.iterdir() if p.is_dir() and checkpoint_step(p) is not None),
                     key=checkpoint_step, reverse=True)
    chosen: Path | None = None
    skipped: list[str] = []
    for ckpt in folders:
        problem = checkpoint_problem(ckpt)
        if problem is None:
            chosen = ckpt
            break
        if remove_incomplete:
            shutil.rmtree(ckpt, ignore_errors=True)
        skipped.append(f"skipped {ckpt.name}: {problem}" + ("; removed" if remove_incomplete else ""))
    return chosen, skipped


def _differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    out = []
    for key in ("data_digest", "examples_digest", "code"):
        if recorded.get(key) != current.get(key):
            out.append(f"{key}: checkpoints {recorded.get(key)!r}, this run {current.get(key)!r}")
    old_cfg, new_cfg = recorded.get("config") or {}, current["config"]
    for key in sorted(set(old_cfg) | set(new_cfg)):
        if old_cfg.get(key) != new_cfg.get(key):
            out.append(f"config.{key}: checkpoints {old_cfg.get(key)!r}, this run {new_cfg.get(key)!r}")
    return out


def prepare_work_dir(work_dir: str | Path, inputs: dict[str, Any], resume: bool = True
                     ) -> tuple[Path | None, list[str]]:
    """Check that the checkpoints in ``work_dir`` belong to ``inputs``, record ``inputs`` in
    ``work_dir/resume.json`` and return the checkpoint to resume from (or None) with the
    skipped-checkpoint lines.

    ``resume=False`` deletes the checkpoints and starts over. Raises ResumeMismatchError when
    complete checkpoints exist that were trained on other inputs (nothing is deleted then).
    """
    work = Path(work_dir)
    ckpt_root = work / CHECKPOINTS_DIR
    resume_file = work / RESUME_FILE
    if not resume and ckpt_root.exists():
        shutil.rmtree(ckpt_root)
    has_checkpoints = ckpt_root.is_dir() and any(checkpoint_step(p) is not None for p in ckpt_root.iterdir())
    if has_checkpoints:
        fix = (f"To start fresh, delete {ckpt_root} (or the whole {work}) or call with resume=False; "
               f"to continue those checkpoints, run with the inputs they were trained on.")
        if resume_file.is_file():
            try:
                recorded = json.loads(resume_file.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ResumeMismatchError(f"{resume_file}: unreadable ({exc}). {fix}") from exc
            diffs = _differences(recorded, inputs)
            if diffs:
                raise ResumeMismatchError(
                    f"{ckpt_root} holds checkpoints trained on other inputs than this run "
                    f"(recorded in {resume_file}): " + "; ".join(diffs) + f". {fix}")
        elif any(checkpoint_problem(p) is None for p in ckpt_root.iterdir() if checkpoint_step(p) is not None):
            raise ResumeMismatchError(
                f"{ckpt_root} holds checkpoints but {resume_file} is missing, so the data they were trained "
                f"on is unknown. {fix}")
    chosen, skipped = find_resume_checkpoint(ckpt_root)
    atomic_write_json(resume_file, inputs)
    return chosen, skipped


def _restored_history(ckpt: Path, total_steps: int) -> list[dict[str, float]]:
    """The logged losses up to the checkpoint, from its trainer_state.json."""
    state = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
    out = []
    for entry in state.get("log_history", []):
        rec = {"step": float(entry.get("step", 0)), "total_steps": float(total_steps)}
        rec.update({k: float(entry[k]) for k in ("loss", "eval_loss", "learning_rate", "grad_norm") if k in entry})
        if len(rec) > 2:
            out.append(rec)
    return out


def _gathered_adapter_state(trainer):
    """The trained weights where ranks hold shards of them (FSDP, DeepSpeed ZeRO-3), gathered
    onto rank 0 with every rank taking part, as the Trainer gathers them for its own saves; None
    where each process holds the whole model."""
    if trainer.is_fsdp_enabled:
        return trainer.accelerator.get_state_dict(trainer.model)
    if trainer.is_deepspeed_enabled and trainer.accelerator.deepspeed_config["zero_optimization"].get("stage") == 3:
        return trainer.accelerator.get_state_dict(trainer.deepspeed)
    return None


def process_state(has_cuda: bool):
    """This process's place in a launch (accelerate's reading of the rank and world size that
    ``accelerate launch`` / torchrun set), with the process group set up when there are several,
    before the work folder is touched, so that rank 0 alone prepares it. The Trainer's arguments
    later find the group already there."""
    from accelerate import PartialState

    return PartialState(cpu=not has_cuda)


def train_lora(
    base_dir: str | Path,
    train: Sequence[SftExample],
    validation: Sequence[SftExample],
    cfg: LoraTrainConfig,
    adapter_dir: str | Path,
    work_dir: str | Path,
    on_progress: ProgressFn | None = None,
    *,
    data_digest: str = "",
    resume: bool = True,
    on_message: MessageFn | None = None,
) -> TrainResult:
    """Train a LoRA adapter and write it (safetensors, with its sha256 manifest) atomically to
    ``adapter_dir``.

    Checkpoints go to ``work_dir/checkpoints`` every ``save_every`` steps. Called again with
    the same ``work_dir`` (after a crash or a kill), training continues from the newest
    complete checkpoint and ends with the same weights as an uninterrupted run: the Trainer
    restores optimizer, scheduler and RNG state and skips the batches already seen.
    ``data_digest`` names what the caller trains on beyond the examples (base model, prompt,
    dataset versions); checkpoints trained on another digest, other examples or another config
    raise ResumeMismatchError. ``resume=False`` discards existing checkpoints. ``on_message``
    receives one line per skipped checkpoint and the resume point.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        set_seed,
    )

    has_cuda = torch.cuda.is_available()
    device = "cuda" if has_cuda else "cpu"
    # Before any data or checkpoint work: a quantized run that cannot be quantized here fails
    # now, never trains the full-precision base instead.
    require_quantization(cfg.quantization, "quantization", device)
    if not train:
        raise TrainingInputError("no training examples: the sft_dataset train split is empty")

    def say(msg: str) -> None:
        if on_message:
            on_message(msg)

    inputs = {"data_digest": data_digest, "examples_digest": examples_digest(train, validation),
              "config": cfg.as_params(), "code": TRAINING_CODE_VERSION}
    state = process_state(has_cuda)
    world_size = state.num_processes
    dist = state if world_size > 1 else None
    is_main = dist is None or dist.is_main_process
    if is_main:
        if not resume and (Path(work_dir) / CHECKPOINTS_DIR).exists():
            say(f"resume=False: removing the checkpoints in {Path(work_dir) / CHECKPOINTS_DIR} and starting over")
        resume_ckpt, skipped_ckpts = prepare_work_dir(work_dir, inputs, resume=resume)
    if dist is not None:
        dist.wait_for_everyone()  # rank 0 has checked, cleaned and recorded the work folder
        if not is_main:
            resume_ckpt, skipped_ckpts = find_resume_checkpoint(Path(work_dir) / CHECKPOINTS_DIR,
                                                                remove_incomplete=False)
    for line in skipped_ckpts:
        say(line)
    set_seed(cfg.seed)
    started = time.monotonic()
    verify_model_folder(base_dir)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    bnb_config = to_bnb_config(cfg.quantization, cfg.compute_dtype, cfg.double_quant, device)
    if bnb_config is None:
        dtype = torch.bfloat16 if cfg.bf16 else torch.float32
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype, use_safetensors=True)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            model.enable_input_require_grads()
    else:
        # bitsandbytes quantizes while placing the weights, so they go straight to the device.
        # prepare_model_for_kbit_training freezes the base, keeps norms and embeddings in fp32
        # and makes the inputs carry gradients (needed with gradient checkpointing).
        from accelerate import PartialState

        placement = {"": PartialState().local_process_index if has_cuda else "cpu"}
        model = AutoModelForCausalLM.from_pretrained(
            base_dir, dtype=resolve_compute_dtype(cfg.compute_dtype, device), quantization_config=bnb_config,
            device_map=placement, use_safetensors=True)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
        if not has_cuda:
            # bitsandbytes' CPU backend repacks 4-bit weights into an inference-only layout the
            # first time a layer runs without grad (an evaluation) and keeps it when training
            # resumes; no gradient flows back through that layout, so the adapters of the layers
            # below would silently stop learning after the first evaluation.
            for module in model.modules():
                if hasattr(module, "support_avx512bf16_for_cpu"):
                    module.support_avx512bf16_for_cpu = False
    model = get_peft_model(model, to_lora_config(cfg))

    skipped: list[str] = []
    train_rows = []
    for ex in train:
        row = tokenize_example(tokenizer, ex, cfg.max_length)
        if row is None:
            skipped.append(ex.example_id)
        else:
            train_rows.append(row)
    val_rows = [r for r in (tokenize_example(tokenizer, ex, cfg.max_length) for ex in validation) if r]
    if not train_rows:
        raise TrainingInputError(f"every training example is longer than max_length={cfg.max_length} tokens")
    data_collator, sampling = sft_batching(cfg.packing, tokenizer.pad_token_id)

    steps_per_epoch = math.ceil(len(train_rows) / (cfg.batch_size * cfg.grad_accum))
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(steps_per_epoch * cfg.epochs)
    start_step = checkpoint_step(resume_ckpt) if resume_ckpt is not None else 0
    history: list[dict[str, float]] = []
    if resume_ckpt is not None:
        history.extend(_restored_history(resume_ckpt, total_steps))
        say(f"resuming from {resume_ckpt.name} (step {start_step}/{total_steps})")

    class _Progress(TrainerCallback):
        began: float | None = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.began = time.monotonic()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs:
                return
            elapsed = time.monotonic() - started
            step = state.global_step
            rec = {"step": float(step), "total_steps": float(total_steps)}
            for key in ("loss", "eval_loss", "learning_rate", "grad_norm"):
                if key in logs:
                    rec[key] = float(logs[key])
            if step > start_step:
                rec["eta_s"] = elapsed / (step - start_step) * max(total_steps - step, 0)
            if self.began is not None and data_collator.tokens:
                # The examples' own tokens this process batched since training (re)started, for
                # every rank (each takes an equal share of every step).
                rec["tokens_per_s"] = data_collator.tokens * world_size / (time.monotonic() - self.began)
            history.append(rec)
            if on_progress:
                on_progress(rec)

    class _MarkComplete(TrainerCallback):
        """Runs after the Trainer has written every file of the checkpoint."""

        def on_save(self, args, state, control, **kwargs):
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.barrier()  # every rank has written its RNG state
            if state.is_world_process_zero:
                write_checkpoint_marker(Path(args.output_dir) / f"checkpoint-{state.global_step}",
                                        state.global_step)

    args = TrainingArguments(
        output_dir=str(Path(work_dir) / CHECKPOINTS_DIR),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size * 2,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_steps,
        lr_scheduler_type="cosine",
        max_steps=total_steps,
        logging_steps=cfg.log_every,
        eval_strategy="steps" if val_rows and cfg.eval_every > 0 else "no",
        eval_steps=cfg.eval_every if cfg.eval_every > 0 else None,
        save_strategy="steps",
        save_steps=cfg.save_every,
        save_total_limit=KEEP_CHECKPOINTS,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=cfg.bf16 and has_cuda,
        use_cpu=not has_cuda,
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        train_sampling_strategy=sampling,
        deepspeed=cfg.deepspeed_config,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_rows,
        eval_dataset=val_rows or None,
        data_collator=data_collator,
        callbacks=[_Progress(), _MarkComplete()],
    )
    if resume_ckpt is not None and start_step >= total_steps:
        # The run had finished (the caller failed afterwards). Resuming through the Trainer
        # would take one step past max_steps, so take the final weights and state directly.
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file
        from transformers import TrainerState

        set_peft_model_state_dict(model, load_file(str(resume_ckpt / "adapter_model.safetensors")))
        trainer.state = TrainerState.load_from_json(str(resume_ckpt / "trainer_state.json"))
    else:
        trainer.train(resume_from_checkpoint=str(resume_ckpt) if resume_ckpt is not None else None)
    evaluated_last_step = any(h.get("eval_loss") is not None and h["step"] == trainer.state.global_step
                              for h in history)
    if val_rows and not evaluated_last_step:
        # The Trainer already evaluates on the last step when eval_every divides max_steps. The
        # final evaluation reaches the history through the progress callback, like the others.
        trainer.evaluate()
    gathered = _gathered_adapter_state(trainer)
    if is_main:
        with atomic_dir(adapter_dir) as tmp:
            model.save_pretrained(tmp, safe_serialization=True, state_dict=gathered)
            write_manifest(tmp)
    if dist is not None:
        dist.wait_for_everyone()  # no rank ends before the adapter is in place
    return TrainResult(
        adapter_dir=str(adapter_dir),
        steps=trainer.state.global_step,
        train_examples=len(train_rows),
        skipped_too_long=skipped,
        history=history,
        runtime_s=time.monotonic() - started,
        resumed_from_step=start_step if resume_ckpt is not None else None,
        skipped_checkpoints=skipped_ckpts,
    )
