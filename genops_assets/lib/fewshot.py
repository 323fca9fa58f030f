"""Choosing the worked examples (shots) shown to a model before each input.

Three strategies over a pool of labelled examples:

- ``fixed``: the same k shots for every input, taken round-robin across labels (labels in
  sorted order, pool order within a label), so a small k still shows different labels.
- ``stratified``: a random draw per input that still goes round-robin across labels. The
  draw depends only on the seed and the input text, never on call order, so a rerun
  renders the same prompts.
- ``nearest``: the k pool examples whose all-MiniLM-L6-v2 embeddings are closest (cosine)
  to the input's. A pool example whose text equals the input is never chosen: it would hand
  the model its own answer.

The selector's ``digest`` names the choice (strategy, k, seed, pool ids) so prompts built
from it can be cached and compared by version.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from genops_assets.lib.hashing import sha256_json, sha256_text

if TYPE_CHECKING:
    import numpy as np

    from genops_assets.lib.embeddings import Embedder

STRATEGIES = ("fixed", "stratified", "nearest")


@dataclass(frozen=True)
class Shot:
    example_id: str
    input_text: str
    output: dict  # the reference answer's fields
    label: str  # what shots are spread across, e.g. the category


def shots_as_pairs(shots: Sequence[Shot]) -> list[tuple[str, dict]]:
    """``(input_text, output)`` pairs, the form prompt rendering takes."""
    return [(shot.input_text, shot.output) for shot in shots]


def _round_robin(groups: Sequence[Sequence[Shot]], k: int) -> list[Shot]:
    """Take one from each group in turn until k are taken (groups that run out are skipped)."""
    picked: list[Shot] = []
    depth = 0
    while len(picked) < k:
        took = False
        for group in groups:
            if depth < len(group):
                picked.append(group[depth])
                took = True
                if len(picked) == k:
                    break
        if not took:
            break
        depth += 1
    return picked


def _same_text(a: str, b: str) -> bool:
    # Surrounding whitespace does not make a different example.
    return a.strip() == b.strip()


class FewShotSelector:
    """Picks ``k`` shots from ``pool`` for each input with one of :data:`STRATEGIES`.

    ``embedder`` is used by ``nearest`` only; when omitted a default
    :class:`~genops_assets.lib.embeddings.Embedder` is created on first use. Pool embeddings
    are computed once per selector.
    """

    def __init__(
        self,
        pool: Sequence[Shot],
        strategy: str = "fixed",
        k: int = 2,
        seed: int = 0,
        embedder: Embedder | None = None,
    ):
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown few-shot strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if isinstance(k, bool) or not isinstance(k, int):
            raise ValueError(f"k must be an integer, got {k!r}")
        if k < 0:
            raise ValueError(f"k must be 0 or more, got {k}")
        pool = list(pool)
        if not pool and k > 0:
            raise ValueError(f"the few-shot pool is empty, so {k} shots cannot be selected")
        if k > len(pool):
            raise ValueError(f"k={k} shots requested but the few-shot pool holds only {len(pool)} examples")
        seen: set[str] = set()
        for shot in pool:
            if shot.example_id in seen:
                raise ValueError(f"example_id {shot.example_id!r} appears more than once in the few-shot pool")
            seen.add(shot.example_id)

        self.pool = tuple(pool)
        self.strategy = strategy
        self.k = k
        self.seed = seed
        self._embedder = embedder
        self._pool_vectors: np.ndarray | None = None

        by_label: dict[str, list[Shot]] = {}
        for shot in self.pool:
            by_label.setdefault(shot.label, []).append(shot)
        self._labels = sorted(by_label, key=str)
        self._by_label = by_label
        self._fixed = _round_robin([by_label[label] for label in self._labels], k)

    @property
    def digest(self) -> str:
        return sha256_json({
            "strategy": self.strategy,
            "k": self.k,
            "seed": self.seed,
            "pool": [shot.example_id for shot in self.pool],
        })

    def describe(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "k": self.k,
            "seed": self.seed,
            "pool_size": len(self.pool),
            "digest": self.digest,
        }

    def select(self, input_text: str) -> list[Shot]:
        return self.select_many([input_text])[0]

    def select_many(self, inputs: Sequence[str]) -> list[list[Shot]]:
        """Shots for each input, in input order (``nearest`` embeds all inputs in one call)."""
        if isinstance(inputs, str):
            raise TypeError("select_many() takes a sequence of input texts, not a single string")
        inputs = list(inputs)
        if self.k == 0:
            return [[] for _ in inputs]
        if self.strategy == "fixed":
            return [list(self._fixed) for _ in inputs]
        if self.strategy == "stratified":
            return [self._stratified(text) for text in inputs]
        return self._nearest(inputs)

    # -- strategies ---------------------------------------------------------------------------

    def _stratified(self, input_text: str) -> list[Shot]:
        # One generator per (seed, input): the draw for an input never depends on what came before.
        rng = random.Random(int(sha256_json([self.seed, sha256_text(input_text)]), 16))
        labels = list(self._labels)
        rng.shuffle(labels)
        groups = []
        for label in labels:
            members = list(self._by_label[label])
            rng.shuffle(members)
            groups.append(members)
        return _round_robin(groups, self.k)

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            from genops_assets.lib.embeddings import Embedder

            self._embedder = Embedder()
        return self._embedder

    def _nearest(self, inputs: list[str]) -> list[list[Shot]]:
        from genops_assets.lib.embeddings import cosine_top_k

        if not inputs:
            return []
        if self._pool_vectors is None:
            self._pool_vectors = self.embedder.embed([shot.input_text for shot in self.pool])
        queries = self.embedder.embed(inputs)
        # Rank the whole pool (it is small), then drop exact-text matches before taking k.
        order, _ = cosine_top_k(queries, self._pool_vectors, len(self.pool))
        picked: list[list[Shot]] = []
        for text, ranking in zip(inputs, order, strict=True):
            shots = [self.pool[i] for i in ranking if not _same_text(self.pool[i].input_text, text)][: self.k]
            if len(shots) < self.k:
                raise ValueError(
                    f"only {len(shots)} pool examples differ from the input text, fewer than k={self.k} "
                    f"(pool size {len(self.pool)}); the input {text[:60]!r} appears in the few-shot pool"
                )
            picked.append(shots)
        return picked
