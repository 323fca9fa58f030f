"""A distilled student: a smaller model that learns the tuned teacher's answers.

Three steps, each a plain function:

- ``prune_layers``: a layer-pruned copy of a Llama-family model folder (the embedded setup's
  student). Decoder layers are dropped, the kept ones renumbered, ``num_hidden_layers`` set;
  embeddings, final norm and head are kept. With every layer kept the copy is the original.
- ``teacher_labels``: the teacher (the genops engine with base + adapter, or any
  OpenAI-compatible endpoint) answers unlabelled prompts. Answers are cached in the call cache
  keyed by the teacher's identity, the messages and the decoding, so a re-run asks the teacher
  nothing it already answered. Answers that are not valid JSON for the task's output schema are
  dropped and counted, never trained on.
- ``train_student``: the project's SFT training (``training.train_lora``) on the student, the
  LoRA weights then merged, so the student is a plain safetensors model folder.

Why LoRA on the pruned student rather than full fine-tuning. Measured on the embedded
SmolLM2-135M pruned evenly to 20 of 30 layers, 80 task examples with their reference answers,
batch 4, 10 steps each, 2 shared CPU cores: the pruned model starts far off (loss 9.43 on the
answers); LoRA (rank 64 on every projection, lr warming up towards 1e-3) reached loss 4.39
after 10 steps, full fine-tuning (AdamW, lr 5e-5, cosine) 5.59. Full fine-tuning took 38 s/step
against LoRA's 72 s/step, but the LoRA run shared the cores with other work, so the step times
are no clean comparison. LoRA learnt more per step, and it reuses tuning's training path
(resume, checkpoints, progress, manifests) instead of a second one. Rank and rate are
``STUDENT_LORA``.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from genops_assets.lib.cache import CallCache, cache_key
from genops_assets.lib.formatting import build_messages, format_target
from genops_assets.lib.hashing import atomic_dir, sha256_json
from genops_assets.lib.integrity import MANIFEST, folder_files, verify_model_folder, write_manifest
from genops_assets.lib.metrics import aggregate, score_example
from genops_assets.lib.monitoring import answer_object
from genops_assets.lib.training import LoraTrainConfig, SftExample, TrainResult, train_lora

DISTILL_CODE_VERSION = "distill-1"
LABEL_KIND = "distill_label"
PRUNING_FILE = "genops-pruning.json"
_LAYER_KEY = re.compile(r"^(model\.layers\.)(\d+)(\..+)$")
# LoRA on the student: a high rank on every projection, since the pruned model has to relearn
# what the dropped layers did, not just adapt its style.
STUDENT_LORA = LoraTrainConfig(rank=64, alpha=128, dropout=0.0, learning_rate=1e-3, max_steps=200,
                               batch_size=4, warmup_steps=10, eval_every=0, save_every=50, log_every=5)


class DistillError(ValueError):
    """The student cannot be built from these inputs (names what is wrong)."""


# -- pruning ---------------------------------------------------------------------------------


def default_keep(num_layers: int) -> int:
    """Two thirds of the layers, rounded, and at least two (first and last)."""
    return max(2, round(num_layers * 2 / 3))


def evenly_kept_layers(num_layers: int, keep: int) -> list[int]:
    """``keep`` layer indices spread evenly over ``num_layers``, first and last always kept."""
    if num_layers < 1:
        raise DistillError(f"a model with {num_layers} layers cannot be pruned")
    if not 1 <= keep <= num_layers:
        raise DistillError(f"cannot keep {keep} of {num_layers} layers (keep between 1 and {num_layers})")
    if keep == 1:
        return [0]
    return sorted({round(i * (num_layers - 1) / (keep - 1)) for i in range(keep)})


@dataclass(frozen=True)
class PrunedModel:
    path: str
    kept_layers: list[int]
    source_layers: int
    size_bytes: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise DistillError(f"{folder}: no .safetensors weights to prune")
    return files


def prune_layers(base_dir: str | Path, keep: int | Sequence[int], out_dir: str | Path) -> PrunedModel:
    """Write a copy of the model folder ``base_dir`` with only some decoder layers to ``out_dir``.

    ``keep``: a number of layers (spread evenly, first and last kept) or the layer indices.
    Weights are written as one ``model.safetensors`` with the kept layers renumbered 0..k-1,
    ``config.json`` gets ``num_hidden_layers`` = k (and ``layer_types`` cut to match when the
    config has it), tokenizer and other files are copied, ``genops-pruning.json`` records the
    kept indices and the folder gets its sha256 manifest. Written atomically."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    base = Path(base_dir)
    verify_model_folder(base)
    cfg_path = base / "config.json"
    if not cfg_path.is_file():
        raise DistillError(f"{base}: not a Hugging Face model folder (no config.json)")
    config = json.loads(cfg_path.read_text(encoding="utf-8"))
    n = config.get("num_hidden_layers")
    if not isinstance(n, int):
        raise DistillError(f"{cfg_path}: no integer num_hidden_layers; only decoder stacks with numbered layers "
                           "(Llama family) can be pruned")
    if isinstance(keep, int):
        kept = evenly_kept_layers(n, keep)
    else:
        kept = sorted(set(int(i) for i in keep))
        bad = [i for i in kept if not 0 <= i < n]
        if bad or not kept:
            raise DistillError(f"layer indices {bad or list(keep)} are not within the model's {n} layers")
    new_index = {old: new for new, old in enumerate(kept)}

    tensors: dict[str, Any] = {}
    seen_layers: set[int] = set()
    for path in _weight_files(base):
        with safe_open(str(path), framework="pt") as fh:
            for name in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                m = _LAYER_KEY.match(name)
                if m is None:
                    tensors[name] = fh.get_tensor(name)
                    continue
                old = int(m.group(2))
                seen_layers.add(old)
                if old in new_index:
                    tensors[f"{m.group(1)}{new_index[old]}{m.group(3)}"] = fh.get_tensor(name)
    if seen_layers != set(range(n)):
        raise DistillError(f"{base}: config says {n} layers but the weights hold layers "
                           f"{sorted(seen_layers)[:5]}... ({len(seen_layers)} in all)")
    new_config = dict(config, num_hidden_layers=len(kept))
    if isinstance(config.get("layer_types"), list):
        new_config["layer_types"] = [config["layer_types"][i] for i in kept]
    with atomic_dir(out_dir) as tmp:
        for item in base.iterdir():
            if item.is_file() and item.suffix != ".safetensors" and item.name not in (MANIFEST, "config.json",
                                                                                       "model.safetensors.index.json"):
                shutil.copy2(item, tmp / item.name)
        # Tied embeddings share storage; safetensors refuses shared tensors, so copy each one.
        save_file({k: v.contiguous().clone() for k, v in tensors.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(new_config, indent=2), encoding="utf-8")
        (tmp / PRUNING_FILE).write_text(json.dumps({"source_layers": n, "kept_layers": kept,
                                                    "code": DISTILL_CODE_VERSION}, indent=2), encoding="utf-8")
        write_manifest(tmp)
    size = (Path(out_dir) / "model.safetensors").stat().st_size
    return PrunedModel(str(out_dir), kept, n, size)


# -- teacher labels --------------------------------------------------------------------------


@dataclass(frozen=True)
class UnlabelledPrompt:
    prompt_id: str  # "<source>:<id>": sft:<example_id>, incoming:<file>:<row>, request:<request_id>
    input_text: str
    contexts: tuple[str, ...] = ()


def unique_prompts(prompts: Iterable[UnlabelledPrompt]) -> list[UnlabelledPrompt]:
    """The prompts without repeats of the same input (and passages), first occurrence kept."""
    seen: set[tuple[str, tuple[str, ...]]] = set()
    out = []
    for p in prompts:
        k = (p.input_text.strip(), p.contexts)
        if p.input_text.strip() and k not in seen:
            seen.add(k)
            out.append(p)
    return out


class Teacher:
    """Answers chat conversations greedily. ``identity`` names it in cache keys: same identity,
    same messages, same decoding -> the cached answer."""

    identity: dict[str, Any]

    def answer(self, messages_batch: Sequence[Sequence[Mapping[str, str]]], max_new_tokens: int) -> list[str]:
        raise NotImplementedError


class EngineTeacher(Teacher):
    """The genops engine in this process: ``base_dir`` with the adapter ``adapter_dir`` (None:
    the base alone). The model is loaded on the first call only."""

    def __init__(self, base_dir: str | Path, adapter_dir: str | Path | None, base_digest: str,
                 adapter_digest: str | None, batch_size: int = 8):
        self.base_dir, self.adapter_dir, self.batch_size = str(base_dir), adapter_dir, batch_size
        self.identity = {"engine": "genops", "base": base_digest, "adapter": adapter_digest}
        self._loaded = None

    def loaded(self):
        if self._loaded is None:
            from genops_assets.serving.adapters import load_model

            adapters = {"teacher": self.adapter_dir} if self.adapter_dir else {}
            self._loaded = load_model(self.base_dir, adapters)
        return self._loaded

    def answer(self, messages_batch, max_new_tokens):
        from genops_assets.serving.generation import generate

        adapter = "teacher" if self.adapter_dir else None
        results = generate(self.loaded(), list(messages_batch), adapter=adapter, max_new_tokens=max_new_tokens,
                           batch_size=self.batch_size)
        return [r.text for r in results]


class EndpointTeacher(Teacher):
    """Any OpenAI-compatible endpoint (the genops endpoint, vLLM, a hosted model), through the
    openai client, one request per conversation at temperature 0."""

    def __init__(self, base_url: str, model: str, api_key: str = "none", timeout_s: float = 120.0):
        from openai import OpenAI

        self.client = OpenAI(base_url=base_url, api_key=api_key or "none", timeout=timeout_s, max_retries=2)
        self.identity = {"endpoint": base_url.rstrip("/"), "model": model}
        self.model = model

    def answer(self, messages_batch, max_new_tokens):
        out = []
        for messages in messages_batch:
            resp = self.client.chat.completions.create(model=self.model, messages=list(messages),
                                                       max_tokens=max_new_tokens, temperature=0.0)
            out.append(resp.choices[0].message.content or "")
        return out


@dataclass
class TeacherLabels:
    examples: list[SftExample]  # the valid answers as training examples (canonical JSON targets)
    answers: dict[str, dict[str, Any]]  # prompt_id -> the teacher's parsed answer (valid ones only)
    invalid: list[tuple[str, str]]  # (prompt_id, why it was dropped)
    texts: dict[str, str]  # prompt_id -> the teacher's answer as it came (valid or not)
    teacher_calls: int  # conversations sent to the teacher in this call
    cached: int  # answers taken from the cache

    def counts(self) -> dict[str, int]:
        return {"labels_valid": len(self.examples), "labels_invalid": len(self.invalid),
                "teacher_calls": self.teacher_calls, "labels_cached": self.cached}


def label_problem(text: str, spec) -> tuple[dict[str, Any] | None, str | None]:
    """The teacher's answer as the task's fields, or the reason it cannot be a label: not a JSON
    object (strict: the answer must start with it) or not valid for the task's output schema."""
    from genops_assets.lib.formatting import parse_prediction

    parsed = parse_prediction(text, spec.output_fields)
    if parsed is None:
        return None, "not a JSON object"
    obj = answer_object(parsed)
    errors = spec.output_schema.errors(obj)
    if errors:
        return None, "schema: " + "; ".join(str(e) for e in errors)
    return {f: parsed.get(f) for f in spec.output_fields}, None


def label_key(teacher_identity: Mapping[str, Any], messages, max_new_tokens: int) -> str:
    """The call-cache key of one teacher answer (greedy decoding)."""
    return cache_key(kind=LABEL_KIND, teacher=dict(teacher_identity), messages=list(messages),
                     max_new_tokens=max_new_tokens, temperature=0.0)


def teacher_labels(prompts: Sequence[UnlabelledPrompt], spec, teacher: Teacher, cache: CallCache,
                   prompt=None, max_new_tokens: int | None = None, batch_size: int = 8,
                   on_progress: Callable[[int, int], None] | None = None) -> TeacherLabels:
    """The teacher's answers to ``prompts`` rendered with ``prompt`` (the production template; None:
    the task folder's). Cached answers are reused; the others are asked in batches of
    ``batch_size`` and cached as they come. ``on_progress(done, total)`` after each batch."""
    max_new = max_new_tokens or spec.max_new_tokens
    messages = [build_messages(spec, p.input_text, prompt=prompt, contexts=p.contexts) for p in prompts]
    keys = [label_key(teacher.identity, m, max_new) for m in messages]
    texts: list[str | None] = [None] * len(prompts)
    cached = 0
    for i, k in enumerate(keys):
        hit = cache.get(k)
        if hit is not None:
            texts[i], cached = hit["text"], cached + 1
    todo = [i for i, t in enumerate(texts) if t is None]
    for start in range(0, len(todo), max(1, batch_size)):
        idx = todo[start:start + batch_size]
        answers = teacher.answer([messages[i] for i in idx], max_new)
        if len(answers) != len(idx):
            raise RuntimeError(f"the teacher answered {len(answers)} of {len(idx)} conversations")
        for i, text in zip(idx, answers, strict=True):
            texts[i] = text
            cache.put(keys[i], LABEL_KIND, {"text": text})
        if on_progress:
            on_progress(cached + start + len(idx), len(prompts))
    examples, answers_by_id, invalid = [], {}, []
    for p, m, text in zip(prompts, messages, texts, strict=True):
        fields, problem = label_problem(text or "", spec)
        if problem is not None:
            invalid.append((p.prompt_id, problem))
            continue
        answers_by_id[p.prompt_id] = fields
        examples.append(SftExample(p.prompt_id, m, format_target(fields, spec.output_fields)))
    raw = {p.prompt_id: text or "" for p, text in zip(prompts, texts, strict=True)}
    return TeacherLabels(examples, answers_by_id, invalid, raw, len(todo), cached)


# -- training --------------------------------------------------------------------------------


@dataclass
class StudentResult:
    path: str  # the student: a safetensors model folder with its manifest
    train: TrainResult
    method: str
    kept_layers: list[int] = field(default_factory=list)


def train_student(student_dir: str | Path, train: Sequence[SftExample], validation: Sequence[SftExample],
                  cfg: LoraTrainConfig, out_dir: str | Path, work_dir: str | Path,
                  on_progress: Callable[[dict[str, float]], None] | None = None, *, data_digest: str = "",
                  on_message: Callable[[str], None] | None = None) -> StudentResult:
    """Train the (pruned) student on the teacher's labels with the SFT training, then merge the
    LoRA weights: ``out_dir`` is a full safetensors model folder. Resumable like tuning
    (checkpoints in ``work_dir``)."""
    adapter_dir = Path(work_dir) / "adapter"
    result = train_lora(student_dir, train, validation, cfg, adapter_dir, work_dir, on_progress,
                        data_digest=data_digest, on_message=on_message)
    from genops_assets.lib.variants import merge_adapter

    merge_adapter(student_dir, adapter_dir, out_dir, log=on_message or print, name="distilled",
                  keep_files=(PRUNING_FILE,))
    pruning = Path(student_dir) / PRUNING_FILE
    kept = json.loads(pruning.read_text(encoding="utf-8"))["kept_layers"] if pruning.is_file() else []
    return StudentResult(str(out_dir), result, "lora_merged", kept)


def student_config(steps: int, base: LoraTrainConfig = STUDENT_LORA) -> LoraTrainConfig:
    return replace(base, max_steps=steps, save_every=min(base.save_every, max(1, steps)))


# -- comparison ------------------------------------------------------------------------------


def agreement(spec, predictions: Mapping[str, str], references: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """Field exact match (and the other evaluation metrics) of ``predictions`` (id -> answer text)
    against ``references`` (id -> fields), over the ids both have; raises when none."""
    ids = sorted(set(predictions) & set(references))
    if not ids:
        raise DistillError("no example has both an answer and a reference: agreement not computed")
    scores = [score_example(i, predictions[i], references[i], spec.label_fields, (), spec.output_fields)
              for i in ids]
    return aggregate(scores)


@dataclass(frozen=True)
class Speed:
    tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


def generation_speed(loaded, messages_batch, adapter: str | None, max_new_tokens: int,
                     batch_size: int = 8) -> tuple[Speed, list[str]]:
    """Completion tokens per second of the genops engine's ``generate`` on ``messages_batch``
    (wall time of the whole call), and the answers."""
    from genops_assets.serving.generation import generate

    started = time.perf_counter()
    results = generate(loaded, list(messages_batch), adapter=adapter, max_new_tokens=max_new_tokens,
                       batch_size=batch_size)
    seconds = time.perf_counter() - started
    return Speed(sum(r.completion_tokens for r in results), seconds), [r.text for r in results]


def student_digest(student_dir: str | Path) -> str:
    return sha256_json(folder_files(student_dir))
