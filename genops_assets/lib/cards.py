"""Model and dataset cards (Markdown) of a registered version.

A model card says what the version is (base model and digests, adapter files, training config),
what it was trained and evaluated on (the marts with row counts and digests), how it scored (with
95% intervals), how it fared against the red-team suite when a safety report exists, what it is
for and where it falls short, and where it came from (its prompt, the champion it was compared
with, the parent it was tuned from). A dataset card describes one mart: source files and their
sha256, rows, splits, the PII scan, origin and licence. Cards are rendered from
``templates/cards/*.md.j2`` and hold no timestamps: the same inputs give the same card (and the
same digest).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from genops_assets.lib.hashing import sha256_file, sha256_json, sha256_text
from genops_assets.lib.report import render

MODEL_CARD_TEMPLATE = "cards/model_card.md.j2"
DATASET_CARD_TEMPLATE = "cards/dataset_card.md.j2"
MODEL_CARD_PATH = "cards/model_card.md"
DATASET_CARDS_DIR = "cards/datasets"
NOT_DECLARED = "not declared (task.yaml has no licence field)"


@dataclass(frozen=True)
class MartSummary:
    """One dbt mart as a card lists it."""

    name: str
    table: str
    rows: int | None                          # None: the mart is not built
    digest: str | None                        # sha256 of the rows, in id order
    splits: dict[str, int] = field(default_factory=dict)
    pii_findings: list[dict] | None = None    # None: not scanned
    origin: str = ""
    licence: str = NOT_DECLARED
    sources: dict[str, str] = field(default_factory=dict)   # source file -> sha256
    description: str = ""

    @property
    def built(self) -> bool:
        return self.rows is not None


def frame_digest(df) -> str:
    """sha256 of a frame's rows (values as text, columns in order), the order as given."""
    return sha256_json({"columns": [str(c) for c in df.columns],
                        "rows": [[None if v is None else str(v) for v in row] for row in df.itertuples(index=False)]})


def summarize_mart(name: str, table: str, df, *, origin: str, sources: Mapping[str, str] | None = None,
                   pii_findings: Sequence[dict] | None = None, licence: str = NOT_DECLARED,
                   description: str = "") -> MartSummary:
    """A built mart: rows, digest, split counts (when it has a ``split`` column)."""
    splits = ({str(k): int(v) for k, v in df["split"].value_counts().sort_index().items()}
              if "split" in df.columns else {})
    return MartSummary(name, table, len(df), frame_digest(df), splits,
                       None if pii_findings is None else list(pii_findings), origin, licence,
                       dict(sources or {}), description)


def source_digests(root: Path, files: Sequence[Path]) -> dict[str, str]:
    """sha256 of each source file, named relative to ``root``."""
    return {Path(p).relative_to(root).as_posix(): sha256_file(p) for p in files}


def limits(spec, eval_report: Mapping[str, Any], safety: Mapping[str, Any] | None,
           data: Sequence[MartSummary]) -> list[str]:
    """The generated limits section: what the evidence behind this version does not cover."""
    out = []
    cand = eval_report.get("candidate", {})
    n = cand.get("golden_examples")
    gate = eval_report.get("gate", {})
    out.append(f"Evaluated on {n if n is not None else 'an unknown number of'} held-out golden example(s) of "
               f"task '{spec.name}' only; answers on other inputs are not measured.")
    lo, hi = gate.get("improvement_low"), gate.get("improvement_high")
    if lo is not None and hi is not None:
        out.append(f"The {gate.get('primary_metric')} improvement over {gate.get('baseline_name')} is known only "
                   f"within [{lo:.3f}, {hi:.3f}] (95%); small golden sets give wide intervals.")
    if spec.input_length:
        out.append(f"Inputs are expected to be {spec.input_length[0]}-{spec.input_length[1]} characters long; "
                   "longer or shorter ones were not trained or evaluated on.")
    out.append("Answers must be JSON by the task's output schema; free-text fields can be wrong even when valid.")
    out.append("PII screening (data checks, guardrails) uses pattern recognizers only: e-mail addresses, phone "
               "numbers, card numbers, SSNs, IBANs, IP addresses. Names and street addresses are not detected.")
    if safety is None:
        out.append("No safety report: robustness to jailbreaks, prompt injection and harmful requests is not "
                   "measured for this version.")
    elif not safety.get("gate", {}).get("passed", False):
        out.append(f"The safety gate did not pass: {safety.get('gate', {}).get('reason')}.")
    missing = [m.name for m in data if not m.built]
    if missing:
        out.append(f"Marts not built when the card was written: {', '.join(missing)}.")
    return out


def model_card(*, spec, tuned_adapter: Mapping[str, Any], base_model: Mapping[str, Any],
               eval_report: Mapping[str, Any], training_params: Mapping[str, Any], data: Sequence[MartSummary],
               safety: Mapping[str, Any] | None = None) -> str:
    """The model card of one registered version (Markdown)."""
    cand = eval_report["candidate"]
    if str(cand["version"]) != str(tuned_adapter["version"]):
        raise ValueError(f"eval_report is for v{cand['version']}, tuned_adapter is v{tuned_adapter['version']}")
    intervals = cand.get("intervals") or {}
    baseline = (eval_report.get("champion") or eval_report.get("previous_champion") or eval_report.get("base") or {})
    metrics = [{"name": m, "value": v, "interval": intervals.get(m), "baseline": (baseline.get("metrics") or {}).get(m)}
               for m, v in sorted(cand["metrics"].items()) if isinstance(v, (int, float))]
    return render(
        MODEL_CARD_TEMPLATE, spec=spec, adapter=tuned_adapter, base=base_model, eval=eval_report,
        metrics=metrics, baseline_name=eval_report.get("gate", {}).get("baseline_name", "baseline"),
        params=dict(sorted((str(k), v) for k, v in training_params.items())), data=list(data), safety=safety,
        limits=limits(spec, eval_report, safety, data), tuning=tuned_adapter.get("tuning", "sft"),
        parent_version=tuned_adapter.get("parent_version"))


def dataset_card(mart: MartSummary, task: str) -> str:
    """The dataset card of one mart (Markdown)."""
    return render(DATASET_CARD_TEMPLATE, mart=mart, task=task)


def card_digest(text: str) -> str:
    return sha256_text(text)
