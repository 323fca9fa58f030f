"""Prompt drift: how far live prompts sit from what the model was trained on.

The reference is the unit-length embeddings of the training inputs. A prompt's score is its
mean cosine distance (1 - cosine similarity) to its ``k`` nearest reference rows: in-domain
prompts have close neighbours, unrelated ones do not. The threshold is a high quantile of the
scores of held-out in-domain inputs (never seen in training), optionally scaled, so the rate at
which in-domain prompts get flagged is known; it is estimated on folds the threshold was not
fitted on, so the reported rate is not flattered by fitting and measuring on the same rows.

Flagged prompts are grouped (k-means on the unit-length embeddings, the number of groups
chosen by cosine silhouette) and each group is described by the prompts nearest its centre
and the terms that set it apart from the training inputs, ready to become new training or
preference data. Everything can be exported for TensorBoard's embedding projector as plain
TSV files and a text-format ``projector_config.pbtxt``; TensorFlow is not needed.

numpy only at module top; scipy, scikit-learn and matplotlib are imported where used.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

PROJECTOR_CONFIG = "projector_config.pbtxt"
TENSORS_FILE = "tensors.tsv"
METADATA_FILE = "metadata.tsv"
METADATA_HEADER = ("text", "label", "cluster")
PROJECTOR_LABELS = ("train", "golden", "live", "flagged")
NO_CLUSTER = "-"
MIN_HELDOUT = 10

_TOKEN = re.compile(r"[a-z][a-z0-9']+")
_CONTROL = re.compile(r"[\t\r\n\x0b\x0c]+")


class DriftError(ValueError):
    """Inputs to the drift computation are unusable; the message names what and where."""


def unit_rows(x: Any, what: str = "embeddings") -> np.ndarray:
    """``x`` as float32 (n, d) with every row scaled to unit length.

    A row of zeros stays zero (it is then at distance 1 from everything); a row holding NaN or
    infinity is an error naming the row.
    """
    arr = np.asarray(x, dtype=np.float32)
    if arr.ndim != 2:
        raise DriftError(f"{what} must be a 2-D array (rows, dimensions), got shape {arr.shape}")
    bad = np.flatnonzero(~np.isfinite(arr).all(axis=1)) if arr.size else np.array([], dtype=int)
    if bad.size:
        raise DriftError(f"{what} row {int(bad[0])} holds NaN or infinity ({bad.size} such row(s))")
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    return arr / np.where(norms == 0, 1.0, norms)


def knn_distances(queries: Any, reference: Any, k: int = 5, chunk: int = 1024) -> np.ndarray:
    """Mean cosine distance from each query row to its ``k`` nearest ``reference`` rows.

    Returns float64 of shape (n_queries,), values in [0, 2]. Work is done ``chunk`` queries at
    a time so memory stays at chunk x n_reference floats.
    """
    ref = unit_rows(reference, "reference embeddings")
    q = unit_rows(queries, "query embeddings")
    if ref.shape[0] == 0:
        raise DriftError("the reference holds no embeddings: there is nothing to compare prompts with")
    if not 1 <= k <= ref.shape[0]:
        raise DriftError(f"k must be between 1 and the reference size {ref.shape[0]}, got {k}")
    if q.shape[0] and q.shape[1] != ref.shape[1]:
        raise DriftError(f"query embeddings have {q.shape[1]} dimensions but the reference has {ref.shape[1]}")
    n = ref.shape[0]
    out = np.empty(q.shape[0], dtype=np.float64)
    for start in range(0, q.shape[0], chunk):
        sims = q[start : start + chunk] @ ref.T
        top = np.partition(sims, n - k, axis=1)[:, n - k :]
        out[start : start + chunk] = 1.0 - top.astype(np.float64).mean(axis=1)
    return np.clip(out, 0.0, 2.0)


@dataclass(frozen=True)
class Calibration:
    """The flagging threshold and how often it flags in-domain prompts.

    ``false_flag_rate`` is cross-fitted: each held-out fold is scored against a threshold fitted
    on the other folds. ``in_sample_flag_rate`` is the share of all held-out scores above the
    final threshold (close to 1 - quantile by construction).
    """

    k: int
    quantile: float
    factor: float
    threshold: float
    n_reference: int
    n_heldout: int
    false_flag_rate: float
    in_sample_flag_rate: float
    heldout_scores: np.ndarray = field(repr=False, compare=False)

    def as_dict(self) -> dict[str, Any]:
        return {"k": self.k, "quantile": self.quantile, "factor": self.factor, "threshold": self.threshold,
                "n_reference": self.n_reference, "n_heldout": self.n_heldout,
                "false_flag_rate": self.false_flag_rate, "in_sample_flag_rate": self.in_sample_flag_rate}


def _threshold(scores: np.ndarray, quantile: float, factor: float) -> float:
    return float(np.quantile(scores, quantile)) * factor


def calibrate(reference: Any, heldout: Any, k: int = 5, quantile: float = 0.99, factor: float = 1.0,
              folds: int = 5, seed: int = 0) -> Calibration:
    """Threshold = ``quantile`` of the held-out in-domain scores, times ``factor``.

    ``heldout`` must be in-domain inputs that are not in ``reference`` (a validation split, a
    golden set): scoring training rows against themselves would give distances near zero and
    a threshold far too low.
    """
    if not 0.0 < quantile < 1.0:
        raise DriftError(f"quantile must be strictly between 0 and 1, got {quantile}")
    if not factor > 0.0:
        raise DriftError(f"threshold factor must be positive, got {factor}")
    scores = knn_distances(heldout, reference, k)
    n = scores.shape[0]
    if n < MIN_HELDOUT:
        raise DriftError(f"calibration needs at least {MIN_HELDOUT} held-out in-domain inputs, got {n}")
    threshold = _threshold(scores, quantile, factor)
    order = np.random.default_rng(seed).permutation(n)
    parts = np.array_split(order, min(max(folds, 2), n))
    flagged = 0
    for part in parts:
        rest = np.setdiff1d(order, part, assume_unique=True)
        flagged += int((scores[part] > _threshold(scores[rest], quantile, factor)).sum())
    ref_rows = np.asarray(reference).shape[0]
    return Calibration(k=k, quantile=quantile, factor=factor, threshold=threshold, n_reference=int(ref_rows),
                       n_heldout=int(n), false_flag_rate=flagged / n,
                       in_sample_flag_rate=float((scores > threshold).mean()), heldout_scores=scores)


def flag(scores: Any, threshold: float) -> np.ndarray:
    """True where a score lies strictly above the threshold."""
    return np.asarray(scores, dtype=np.float64) > threshold


@dataclass(frozen=True)
class DriftSummary:
    """One window of live prompts against the held-out in-domain scores.

    Scores and test results are NaN when the window has no live prompts. The test asks whether
    live scores are stochastically larger than held-out ones (one-sided Mann-Whitney U); the
    two-sided Kolmogorov-Smirnov statistic is given beside it.
    """

    live: int
    flagged: int
    flagged_share: float
    threshold: float
    live_mean: float
    live_median: float
    heldout_mean: float
    heldout_median: float
    u_statistic: float
    p_value: float
    ks_statistic: float
    ks_p_value: float
    drift: bool
    drift_share: float
    min_prompts: int
    test: str = "mann-whitney-u, live > held-out"

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def summarize(live_scores: Any, calibration: Calibration, drift_share: float = 0.2,
              min_prompts: int = 20) -> DriftSummary:
    """Share flagged, score location against held-out, and a two-sample test.

    ``drift`` is True only when at least ``min_prompts`` live prompts were seen and more than
    ``drift_share`` of them were flagged: a handful of odd prompts on a quiet day is not drift.
    """
    if not 0.0 <= drift_share < 1.0:
        raise DriftError(f"drift share must be in [0, 1), got {drift_share}")
    if min_prompts < 1:
        raise DriftError(f"min_prompts must be at least 1, got {min_prompts}")
    live = np.asarray(live_scores, dtype=np.float64).reshape(-1)
    held = calibration.heldout_scores
    n = int(live.shape[0])
    flagged = int(flag(live, calibration.threshold).sum())
    share = flagged / n if n else 0.0
    nan = float("nan")
    u = p = ks = ks_p = nan
    if n:
        from scipy import stats

        mw = stats.mannwhitneyu(live, held, alternative="greater")
        u, p = float(mw.statistic), float(mw.pvalue)
        two = stats.ks_2samp(live, held)
        ks, ks_p = float(two.statistic), float(two.pvalue)
    return DriftSummary(
        live=n, flagged=flagged, flagged_share=float(share), threshold=calibration.threshold,
        live_mean=float(live.mean()) if n else nan, live_median=float(np.median(live)) if n else nan,
        heldout_mean=float(held.mean()), heldout_median=float(np.median(held)),
        u_statistic=u, p_value=p, ks_statistic=ks, ks_p_value=ks_p,
        drift=bool(n >= min_prompts and share > drift_share), drift_share=drift_share, min_prompts=min_prompts,
    )


# -- the reference a day is measured against --------------------------------------------------

REFERENCE_FILES = ("reference.json", "train.npy", "golden.npy", "heldout_scores.npy")


@dataclass(frozen=True)
class DriftReference:
    """What live prompts are measured against: the training inputs and their embeddings, the
    calibrated threshold, and the golden set (shown beside live prompts in the projector). It
    depends on the marts, not on the day, so it is computed once per training set."""

    train_texts: tuple[str, ...]
    train_embeddings: np.ndarray = field(repr=False, compare=False)
    golden_texts: tuple[str, ...]
    golden_embeddings: np.ndarray = field(repr=False, compare=False)
    calibration: Calibration
    embedding_model: str

    def save(self, folder: str | Path) -> None:
        """Into an empty folder (write to a temporary folder and rename it: see ``atomic_dir``)."""
        import json

        out = Path(folder)
        np.save(out / "train.npy", self.train_embeddings)
        np.save(out / "golden.npy", self.golden_embeddings)
        np.save(out / "heldout_scores.npy", self.calibration.heldout_scores)
        (out / "reference.json").write_text(json.dumps(
            {"train_texts": list(self.train_texts), "golden_texts": list(self.golden_texts),
             "calibration": self.calibration.as_dict(), "embedding_model": self.embedding_model},
            ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, folder: str | Path) -> DriftReference:
        import json

        src = Path(folder)
        missing = [name for name in REFERENCE_FILES if not (src / name).is_file()]
        if missing:
            raise DriftError(f"{src} is not a drift reference: {missing} missing (materialize drift_calibration)")
        meta = json.loads((src / "reference.json").read_text(encoding="utf-8"))
        calibration = Calibration(**meta["calibration"], heldout_scores=np.load(src / "heldout_scores.npy"))
        return cls(tuple(meta["train_texts"]), np.load(src / "train.npy"), tuple(meta["golden_texts"]),
                   np.load(src / "golden.npy"), calibration, meta["embedding_model"])


@dataclass(frozen=True)
class DayDrift:
    """One window of live prompts scored against a reference: the per-prompt scores and flags,
    the summary, and the clusters of the flagged prompts."""

    scores: np.ndarray
    flagged: np.ndarray  # bool per live prompt
    summary: DriftSummary
    clusters: list  # PromptCluster
    cluster_of: dict[int, int]  # live prompt index -> cluster id, for flagged prompts

    @property
    def flagged_indices(self) -> list[int]:
        return [i for i, f in enumerate(self.flagged.tolist()) if f]


def score_window(reference: DriftReference, texts: Sequence[str], embeddings: Any, drift_share: float = 0.2,
                 min_prompts: int = 20, max_clusters: int = 8) -> DayDrift:
    """Score, flag, summarize and cluster a window's live prompts (embedded like the reference)."""
    calibration = reference.calibration
    scores = knn_distances(embeddings, reference.train_embeddings, calibration.k)
    summary = summarize(scores, calibration, drift_share=drift_share, min_prompts=min_prompts)
    flagged = flag(scores, calibration.threshold)
    indices = [i for i, f in enumerate(flagged.tolist()) if f]
    labels, clusters = cluster_prompts([texts[i] for i in indices], np.asarray(embeddings)[indices], scores[indices],
                                       max_clusters=max_clusters, background=list(reference.train_texts))
    return DayDrift(scores, flagged, summary, clusters,
                    {i: int(label) for i, label in zip(indices, labels, strict=True)})


def projector_rows(reference: DriftReference, live_texts: Sequence[str], live_embeddings: Any, day: DayDrift,
                   train_rows: int) -> tuple[np.ndarray, list[str], list[str], list[int | None]]:
    """The projector's rows: a sample of ``train_rows`` training inputs, the golden set, and every
    live prompt of the window (labelled live or flagged, with its cluster): embeddings, texts,
    labels and clusters."""
    pick = subsample(len(reference.train_texts), train_rows)
    golden = list(reference.golden_texts)
    texts = [reference.train_texts[i] for i in pick] + golden + list(live_texts)
    labels = (["train"] * len(pick) + ["golden"] * len(golden)
              + ["flagged" if f else "live" for f in day.flagged.tolist()])
    clusters = [None] * (len(pick) + len(golden)) + [day.cluster_of.get(i) for i in range(len(live_texts))]
    embeddings = np.concatenate([reference.train_embeddings[pick], reference.golden_embeddings,
                                 np.asarray(live_embeddings, dtype=reference.train_embeddings.dtype)])
    return embeddings, texts, labels, clusters


# -- clusters of flagged prompts ------------------------------------------------------------


@dataclass(frozen=True)
class PromptCluster:
    """A group of flagged prompts: ``members`` index the texts given to :func:`cluster_prompts`."""

    cluster_id: int
    size: int
    mean_score: float
    representatives: tuple[str, ...]
    top_terms: tuple[str, ...]
    members: tuple[int, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"cluster_id": self.cluster_id, "size": self.size, "mean_score": self.mean_score,
                "representatives": list(self.representatives), "top_terms": list(self.top_terms),
                "members": list(self.members)}


def _tokens(text: str, stop: frozenset[str]) -> set[str]:
    return {t for t in _TOKEN.findall(text.lower()) if len(t) > 2 and t not in stop}


def _choose_labels(x: np.ndarray, max_clusters: int, min_silhouette: float, merge_distance: float) -> np.ndarray:
    n = x.shape[0]
    if n <= 1:
        return np.zeros(n, dtype=int)
    if n == 2:
        apart = 1.0 - float(x[0] @ x[1]) > merge_distance
        return np.array([0, 1 if apart else 0])
    import warnings

    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    distinct = len(np.unique(np.round(x, 6), axis=0))
    best: tuple[float, np.ndarray] | None = None
    for k in range(2, min(max_clusters, n - 1, distinct) + 1):
        with warnings.catch_warnings():  # repeated prompts: fewer distinct points than k is handled below
            warnings.simplefilter("ignore")
            labels = KMeans(n_clusters=k, n_init=10, random_state=0).fit_predict(x.astype(np.float64))
        if not 2 <= len(set(labels.tolist())) <= n - 1:
            continue
        score = float(silhouette_score(x, labels, metric="cosine"))
        if best is None or score > best[0] + 1e-12:
            best = (score, labels)
    if best is None or best[0] < min_silhouette:
        return np.zeros(n, dtype=int)
    return best[1]


def cluster_prompts(
    texts: Sequence[str],
    embeddings: Any,
    scores: Any | None = None,
    *,
    max_clusters: int = 8,
    min_silhouette: float = 0.1,
    merge_distance: float = 0.6,
    n_representatives: int = 3,
    n_terms: int = 5,
    background: Sequence[str] = (),
) -> tuple[np.ndarray, list[PromptCluster]]:
    """Group prompts by meaning: (cluster id per prompt, clusters largest first).

    Three or more prompts: k-means on the unit-length embeddings (so on cosine geometry) for
    every k in 2..``max_clusters``, keeping the k with the best cosine silhouette; one group when
    no k reaches ``min_silhouette``. Two prompts: two groups when their cosine distance exceeds
    ``merge_distance``. Representatives are the distinct prompts nearest the group's centre;
    top terms are words frequent in the group but rare in the other prompts and ``background``
    (e.g. the training inputs).
    """
    texts = list(texts)
    x = unit_rows(embeddings, "prompt embeddings") if len(texts) else np.zeros((0, 1), dtype=np.float32)
    if x.shape[0] != len(texts):
        raise DriftError(f"{len(texts)} texts but {x.shape[0]} embedding rows")
    score_arr = np.zeros(len(texts)) if scores is None else np.asarray(scores, dtype=np.float64).reshape(-1)
    if score_arr.shape[0] != len(texts):
        raise DriftError(f"{len(texts)} texts but {score_arr.shape[0]} scores")
    if max_clusters < 1:
        raise DriftError(f"max_clusters must be at least 1, got {max_clusters}")
    if not texts:
        return np.zeros(0, dtype=int), []

    raw = _choose_labels(x, max_clusters, min_silhouette, merge_distance)
    groups: dict[int, list[int]] = {}
    for i, lab in enumerate(raw.tolist()):
        groups.setdefault(int(lab), []).append(i)
    ordered = sorted(groups.values(), key=lambda m: (-len(m), m[0]))

    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    stop = frozenset(ENGLISH_STOP_WORDS)
    doc_tokens = [_tokens(t, stop) for t in texts]
    corpus_df: Counter[str] = Counter()
    for toks in doc_tokens:
        corpus_df.update(toks)
    for t in background:
        corpus_df.update(_tokens(t, stop))
    n_corpus = len(texts) + len(background)

    labels = np.empty(len(texts), dtype=int)
    clusters: list[PromptCluster] = []
    for cid, members in enumerate(ordered):
        labels[members] = cid
        centre = x[members].mean(axis=0)
        centre = centre / (np.linalg.norm(centre) or 1.0)
        near = sorted(members, key=lambda i: (-float(x[i] @ centre), i))
        reps: list[str] = []
        for i in near:
            if texts[i] not in reps:
                reps.append(texts[i])
            if len(reps) == n_representatives:
                break
        in_cluster: Counter[str] = Counter()
        for i in members:
            in_cluster.update(doc_tokens[i])
        need = min(2, len(members))
        weights = {
            term: (c / len(members)) * (math.log((1 + n_corpus) / (1 + corpus_df[term])) + 1.0)
            for term, c in in_cluster.items() if c >= need
        }
        terms = [t for t, _ in sorted(weights.items(), key=lambda kv: (-kv[1], kv[0]))[:n_terms]]
        clusters.append(PromptCluster(cluster_id=cid, size=len(members),
                                      mean_score=float(score_arr[members].mean()),
                                      representatives=tuple(reps), top_terms=tuple(terms),
                                      members=tuple(members)))
    return labels, clusters


def _cell(text: str, limit: int = 160) -> str:
    flat = " ".join(_CONTROL.sub(" ", text).split()).replace("|", "\\|")
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def clusters_markdown(clusters: Sequence[PromptCluster]) -> str:
    """A Markdown table of the clusters, one row each, for people to read and act on."""
    if not clusters:
        return "No flagged prompts in this window."
    lines = ["| cluster | size | mean score | top terms | representative prompts |",
             "|---:|---:|---:|---|---|"]
    for c in clusters:
        reps = "<br>".join(_cell(r) for r in c.representatives)
        lines.append(f"| {c.cluster_id} | {c.size} | {c.mean_score:.3f} | {_cell(', '.join(c.top_terms))} | {reps} |")
    return "\n".join(lines)


# -- TensorBoard embedding projector export --------------------------------------------------


def subsample(n: int, max_rows: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of at most ``max_rows`` of ``n`` rows, the same for the same seed."""
    if max_rows < 0:
        raise DriftError(f"max_rows must not be negative, got {max_rows}")
    if n <= max_rows:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_rows, replace=False))


def _meta_text(text: str, limit: int = 200) -> str:
    flat = " ".join(_CONTROL.sub(" ", text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def write_projector(folder: str | Path, embeddings: Any, texts: Sequence[str], labels: Sequence[str],
                    clusters: Sequence[Any] | None = None, tensor_name: str = "prompts") -> dict[str, Any]:
    """Write ``tensors.tsv``, ``metadata.tsv`` and ``projector_config.pbtxt`` into ``folder``.

    Point TensorBoard's ``--logdir`` at ``folder``: with no event files there, the projector
    reads the config from the log directory itself, and the config's paths are relative to it.
    ``metadata.tsv`` has a header row (text, label, cluster) and then one row per tensor row;
    tabs and line breaks inside texts become spaces. ``clusters`` entries of None show as "-".
    """
    x = np.asarray(embeddings, dtype=np.float32)
    texts = list(texts)
    labels = list(labels)
    cluster_col = [NO_CLUSTER] * len(texts) if clusters is None else [
        NO_CLUSTER if c is None else str(c) for c in clusters]
    if x.ndim != 2 or x.shape[0] == 0:
        raise DriftError(f"projector export needs a non-empty 2-D embedding array, got shape {x.shape}")
    if not len(texts) == len(labels) == len(cluster_col) == x.shape[0]:
        raise DriftError(f"projector export: {x.shape[0]} embedding rows, {len(texts)} texts, {len(labels)} "
                         f"labels and {len(cluster_col)} cluster ids must all match")
    for i, lab in enumerate(labels):
        if lab not in PROJECTOR_LABELS:
            raise DriftError(f"projector export row {i}: label {lab!r} is not one of {PROJECTOR_LABELS}")
    if not np.isfinite(x).all():
        raise DriftError("projector export: embeddings hold NaN or infinity")
    if not re.fullmatch(r"[A-Za-z0-9_.:-]+", tensor_name):
        raise DriftError(f"tensor name {tensor_name!r} may hold only letters, digits and _ . : -")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / TENSORS_FILE, "w", encoding="utf-8", newline="\n") as fh:
        for row in x:
            fh.write("\t".join(f"{v:.6g}" for v in row.tolist()) + "\n")
    with open(out / METADATA_FILE, "w", encoding="utf-8", newline="\n") as fh:
        fh.write("\t".join(METADATA_HEADER) + "\n")
        for text, lab, cid in zip(texts, labels, cluster_col, strict=True):
            fh.write(f"{_meta_text(text) or '(empty)'}\t{lab}\t{_meta_text(cid)}\n")
    config = (
        "embeddings {\n"
        f'  tensor_name: "{tensor_name}"\n'
        f'  tensor_path: "{TENSORS_FILE}"\n'
        f'  metadata_path: "{METADATA_FILE}"\n'
        f"  tensor_shape: {x.shape[0]}\n"
        f"  tensor_shape: {x.shape[1]}\n"
        "}\n"
    )
    (out / PROJECTOR_CONFIG).write_text(config, encoding="utf-8")
    return {"rows": int(x.shape[0]), "dim": int(x.shape[1]), "labels": dict(Counter(labels)),
            "files": [PROJECTOR_CONFIG, TENSORS_FILE, METADATA_FILE]}


# -- chart ------------------------------------------------------------------------------------


def score_histogram_png(live_scores: Any, heldout_scores: Any, threshold: float) -> bytes:
    """Density histograms of live and held-out scores on shared bins, with the threshold line."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    live = np.asarray(live_scores, dtype=np.float64).reshape(-1)
    held = np.asarray(heldout_scores, dtype=np.float64).reshape(-1)
    both = np.concatenate([live, held, [threshold]])
    bins = np.linspace(float(both.min()), float(both.max()) + 1e-9, 31)
    fig, ax = plt.subplots(figsize=(6.4, 3.4), dpi=110)
    try:
        ax.hist(held, bins=bins, density=True, alpha=0.55, label=f"held-out in-domain (n={held.size})")
        if live.size:
            ax.hist(live, bins=bins, density=True, alpha=0.55, label=f"live (n={live.size})")
        ax.axvline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold:.3f}")
        ax.set_xlabel("mean cosine distance to nearest training inputs")
        ax.set_ylabel("density")
        ax.set_title("Prompt drift scores")
        ax.legend(fontsize=8)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()
    finally:
        plt.close(fig)
