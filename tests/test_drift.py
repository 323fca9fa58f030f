"""Prompt drift on real all-MiniLM-L6-v2 embeddings: unrelated prompts are flagged, held-out
support tickets are not, flagged topics form separate clusters, the projector export parses, and
the daily asset writes its tables, files and the metadata sensors read."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from genops_assets.lib import drift as d
from genops_assets.lib.tasks import load_task, read_raw_file

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]

COOKING = [
    "What is a good recipe for banana bread that stays moist?",
    "How long should I roast a whole chicken at 200C in the oven?",
    "Can I swap butter for olive oil in a chocolate cake recipe?",
    "Best way to cook basmati rice so it is fluffy and not sticky?",
    "Give me a vegetarian lasagna recipe with spinach and ricotta.",
    "How do I make a sourdough starter from scratch with flour and water?",
    "What spices go into a classic chicken tikka masala recipe?",
    "How many minutes do I boil an egg for a runny yolk?",
    "Easy pancake recipe without eggs for breakfast?",
    "How do I caramelize onions properly in a frying pan?",
]
SPORTS = [
    "Who won the football world cup final in 2014?",
    "How many players are on a basketball team on court at once?",
    "What is the offside rule in soccer, explained simply?",
    "Which tennis player has won the most Wimbledon titles?",
    "How long is a marathon race in kilometres?",
]
DAY = "2026-03-02"
OTHER_DAY = "2026-03-03"
EMPTY_DAY = "2026-03-05"


@pytest.fixture(scope="session")
def drift_home(tmp_path_factory) -> Path:
    """A data directory whose embedding cache the lib tests fill and the asset test reuses."""
    return tmp_path_factory.mktemp("drift-home")


@pytest.fixture(scope="session")
def corpus(drift_home):
    """support_triage inputs split at random: a training reference, a calibration set, and
    held-out tickets never used for either; all embedded with the real model."""
    from genops_assets.lib.embeddings import Embedder

    spec = load_task(ROOT / "tasks", "support_triage")
    texts = list(dict.fromkeys(ex.input_text for path in spec.raw_files() for ex in read_raw_file(path, spec)))
    order = np.random.default_rng(7).permutation(len(texts))
    train = [texts[i] for i in order[:450]]
    calib = [texts[i] for i in order[450:600]]
    test = [texts[i] for i in order[600:660]]
    embedder = Embedder(cache_path=drift_home / "cache" / "embeddings.sqlite")
    emb = {name: embedder.embed(group) for name, group in
           (("train", train), ("calib", calib), ("test", test), ("cooking", COOKING), ("sports", SPORTS))}
    return {"train": train, "calib": calib, "test": test, "emb": emb}


@pytest.fixture(scope="session")
def calibration(corpus):
    return d.calibrate(corpus["emb"]["train"], corpus["emb"]["calib"], k=5, quantile=0.99)


def test_unrelated_prompts_are_flagged_and_held_out_tickets_are_not(corpus, calibration):
    emb = corpus["emb"]
    assert 0.0 < calibration.threshold < 1.0
    assert calibration.n_heldout == 150 and calibration.n_reference == 450
    assert calibration.false_flag_rate <= 0.05  # measured on folds the threshold was not fitted on

    ood = np.concatenate([emb["cooking"], emb["sports"]])
    ood_flagged = d.flag(d.knn_distances(ood, emb["train"]), calibration.threshold)
    in_domain_flagged = d.flag(d.knn_distances(emb["test"], emb["train"]), calibration.threshold)
    assert ood_flagged.mean() >= 0.9
    assert in_domain_flagged.mean() <= 0.1

    # A window of in-domain traffic: no drift, no significant shift.
    quiet = d.summarize(d.knn_distances(emb["test"], emb["train"]), calibration, drift_share=0.2, min_prompts=20)
    assert quiet.live == 60 and not quiet.drift and quiet.p_value > 0.01
    # The same window with unrelated prompts mixed in: a clear shift and drift.
    mixed_scores = d.knn_distances(np.concatenate([emb["test"][:30], ood]), emb["train"])
    mixed = d.summarize(mixed_scores, calibration, drift_share=0.2, min_prompts=20)
    assert mixed.live == 45 and mixed.flagged >= 14 and mixed.flagged_share > 0.2 and mixed.drift
    assert mixed.p_value < 0.01 and mixed.live_mean > mixed.heldout_mean
    # Too few prompts is never drift, however odd they are.
    few = d.summarize(d.knn_distances(ood[:5], emb["train"]), calibration, drift_share=0.2, min_prompts=20)
    assert few.flagged_share >= 0.8 and not few.drift
    # A larger factor raises the threshold and flags less.
    loose = d.calibrate(emb["train"], emb["calib"], k=5, quantile=0.99, factor=1.5)
    assert loose.threshold == pytest.approx(1.5 * calibration.threshold)
    assert d.flag(mixed_scores, loose.threshold).sum() <= mixed.flagged


def test_empty_window_is_not_an_error(calibration):
    s = d.summarize([], calibration)
    assert (s.live, s.flagged, s.flagged_share, s.drift) == (0, 0, 0.0, False)
    assert np.isnan(s.p_value) and not np.isnan(s.heldout_mean)
    labels, clusters = d.cluster_prompts([], np.zeros((0, 384)))
    assert labels.shape == (0,) and clusters == []
    assert d.clusters_markdown(clusters).startswith("No flagged prompts")


def test_flagged_cooking_and_sports_prompts_form_separate_clusters(corpus):
    emb = corpus["emb"]
    texts = COOKING + SPORTS
    labels, clusters = d.cluster_prompts(texts, np.concatenate([emb["cooking"], emb["sports"]]),
                                         background=corpus["train"])
    cooking_ids = set(labels[: len(COOKING)].tolist())
    sports_ids = set(labels[len(COOKING):].tolist())
    assert not cooking_ids & sports_ids, (labels, [c.top_terms for c in clusters])
    assert sum(c.size for c in clusters) == len(texts)
    assert [c.size for c in clusters] == sorted((c.size for c in clusters), reverse=True)
    biggest = clusters[0]
    assert set(biggest.members) <= set(range(len(COOKING)))  # the ten cooking prompts outnumber sports
    assert all(r in COOKING for r in biggest.representatives) and len(biggest.representatives) == 3
    assert "recipe" in biggest.top_terms
    md = d.clusters_markdown(clusters)
    assert md.count("\n") == len(clusters) + 1 and "recipe" in md

    # Small n: one prompt is one cluster; two unrelated prompts are two; a repeated one is one.
    one_labels, one = d.cluster_prompts(COOKING[:1], emb["cooking"][:1])
    assert one_labels.tolist() == [0] and one[0].representatives == (COOKING[0],)
    two_labels, _ = d.cluster_prompts([COOKING[0], SPORTS[0]], np.stack([emb["cooking"][0], emb["sports"][0]]))
    assert two_labels.tolist() == [0, 1]
    same_labels, same = d.cluster_prompts([SPORTS[1]] * 2, np.stack([emb["sports"][1]] * 2))
    assert same_labels.tolist() == [0, 0] and same[0].representatives == (SPORTS[1],)


def _parse_projector_config(text: str):
    """Parse with a ProjectorConfig message built from TensorBoard's field numbers and types."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format

    F = descriptor_pb2.FieldDescriptorProto
    fd = descriptor_pb2.FileDescriptorProto(name="projector_config_test.proto", package="tbtest", syntax="proto3")
    sprite = fd.message_type.add(name="SpriteMetadata")
    sprite.field.add(name="image_path", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    sprite.field.add(name="single_image_dim", number=2, type=F.TYPE_UINT32, label=F.LABEL_REPEATED)
    info = fd.message_type.add(name="EmbeddingInfo")
    for name, number, kind, label in (("tensor_name", 1, F.TYPE_STRING, F.LABEL_OPTIONAL),
                                      ("metadata_path", 2, F.TYPE_STRING, F.LABEL_OPTIONAL),
                                      ("bookmarks_path", 3, F.TYPE_STRING, F.LABEL_OPTIONAL),
                                      ("tensor_shape", 4, F.TYPE_UINT32, F.LABEL_REPEATED),
                                      ("tensor_path", 6, F.TYPE_STRING, F.LABEL_OPTIONAL)):
        info.field.add(name=name, number=number, type=kind, label=label)
    info.field.add(name="sprite", number=5, type=F.TYPE_MESSAGE, label=F.LABEL_OPTIONAL,
                   type_name=".tbtest.SpriteMetadata")
    config = fd.message_type.add(name="ProjectorConfig")
    config.field.add(name="model_checkpoint_path", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    config.field.add(name="embeddings", number=2, type=F.TYPE_MESSAGE, label=F.LABEL_REPEATED,
                     type_name=".tbtest.EmbeddingInfo")
    config.field.add(name="model_checkpoint_dir", number=3, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fd)
    cls = message_factory.GetMessageClass(pool.FindMessageTypeByName("tbtest.ProjectorConfig"))
    return text_format.Parse(text, cls())


def check_projector(folder: Path, expected_rows: int | None = None) -> list[list[str]]:
    """Assert the export is one TensorBoard can load; return the metadata rows (without header)."""
    config = _parse_projector_config((folder / d.PROJECTOR_CONFIG).read_text())
    assert len(config.embeddings) == 1
    info = config.embeddings[0]
    tensor_rows = [line.split("\t") for line in (folder / info.tensor_path).read_text().splitlines()]
    meta_lines = (folder / info.metadata_path).read_text(encoding="utf-8").split("\n")
    assert meta_lines[-1] == ""  # newline-terminated, no stray blank rows
    header, rows = meta_lines[0].split("\t"), [line.split("\t") for line in meta_lines[1:-1]]
    assert header == ["text", "label", "cluster"]
    assert all(len(r) == 3 for r in rows) and {r[1] for r in rows} <= set(d.PROJECTOR_LABELS)
    assert len(rows) == len(tensor_rows) == info.tensor_shape[0]
    assert {len(r) for r in tensor_rows} == {info.tensor_shape[1]}
    assert np.isfinite(np.array(tensor_rows, dtype=np.float32)).all()
    if expected_rows is not None:
        assert len(rows) == expected_rows
    return rows


def test_projector_export_parses(tmp_path, corpus):
    emb = corpus["emb"]
    x = np.concatenate([emb["train"][:20], emb["test"][:5], emb["cooking"][:3]])
    texts = corpus["train"][:20] + corpus["test"][:5] + ["tab\there", "line\nbreak", "plain"]
    labels = ["train"] * 20 + ["golden"] * 5 + ["flagged", "flagged", "live"]
    out = d.write_projector(tmp_path / "proj", x, texts, labels, [None] * 25 + [0, 1, None])
    assert out["rows"] == 28 and out["dim"] == 384
    rows = check_projector(tmp_path / "proj", 28)
    assert rows[25] == ["tab here", "flagged", "0"] and rows[26] == ["line break", "flagged", "1"]
    assert rows[27] == ["plain", "live", "-"]
    with pytest.raises(d.DriftError, match="row 2: label 'odd'"):
        d.write_projector(tmp_path / "bad", x[:3], texts[:3], ["train", "live", "odd"])
    with pytest.raises(d.DriftError, match="must all match"):
        d.write_projector(tmp_path / "bad", x[:3], texts[:2], ["train", "live"])


def test_bad_inputs_are_named(corpus):
    emb = corpus["emb"]
    with pytest.raises(d.DriftError, match="k must be between 1 and the reference size 3"):
        d.knn_distances(emb["test"][:2], emb["train"][:3], k=5)
    with pytest.raises(d.DriftError, match="at least 10 held-out"):
        d.calibrate(emb["train"], emb["test"][:4])
    with pytest.raises(d.DriftError, match="quantile"):
        d.calibrate(emb["train"], emb["calib"], quantile=1.0)
    bad = emb["test"][:3].copy()
    bad[1, 0] = np.nan
    with pytest.raises(d.DriftError, match="row 1 holds NaN"):
        d.knn_distances(bad, emb["train"])


# -- the daily asset --------------------------------------------------------------------------


def _epoch(day: str, hour: int, minute: int = 0) -> float:
    return datetime.fromisoformat(day).replace(hour=hour, minute=minute, tzinfo=UTC).timestamp()


def _write_requests(home: Path, corpus) -> dict[str, list[str]]:
    """A day of traffic: 25 held-out tickets, 10 cooking and 5 sports questions; plus cooking
    questions on the next day and a reload event, which the day's window must leave out."""
    day = corpus["test"][:25] + COOKING + SPORTS
    records, ids = [], {"day": [], "other": [], "ood": []}
    for i, text in enumerate(day):
        rid = f"d{i}"
        ids["day"].append(rid)
        if i >= 25:
            ids["ood"].append(rid)
        records.append({"ts": _epoch(DAY, 1 + i % 22, i % 60), "request_id": rid, "model": "champion",
                        "version": "3", "status": 200, "prompt_version": "1",
                        "prompt_variables": {"message": text}, "response": "{}"})
    records.append({"ts": _epoch(DAY, 12), "event": "reload", "request_id": "reload-1", "version": "4"})
    for i, text in enumerate(COOKING[:3]):
        ids["other"].append(f"o{i}")
        records.append({"ts": _epoch(OTHER_DAY, 3, i), "request_id": f"o{i}", "model": "champion", "version": "3",
                        "status": 200, "prompt_variables": {"message": text}})
    log = home / "endpoint" / "requests.jsonl"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    return ids


def test_prompt_drift_asset_for_one_day(tmp_path, drift_home, corpus):
    import dagster as dg
    import duckdb

    from genops_assets.defs.feedback.assets import request_log
    from genops_assets.defs.monitoring.common import daily_partitions
    from genops_assets.defs.monitoring.drift import DriftConfig, build_drift_assets
    from genops_assets.lib.tasks import TaskRef
    from resources.feedback_store import DuckDBFeedbackStore
    from resources.paths import GenopsHome
    from resources.tracking import MlflowTracking
    from resources.warehouse import DuckDBWarehouse, mart_schema, monitoring_schema

    task = TaskRef("support_triage", str(ROOT / "tasks"))
    drift_calibration, prompt_drift = build_drift_assets(task, daily_partitions("2026-01-01"))
    marts, monitoring = mart_schema(task.name), monitoring_schema(task.name)

    db = tmp_path / "w.duckdb"
    con = duckdb.connect(str(db))
    con.execute(f"create schema if not exists {marts}")
    con.execute(f"create table {marts}.sft_dataset (example_id varchar, input_text varchar, split varchar)")
    con.executemany(f"insert into {marts}.sft_dataset values (?, ?, ?)",
                    [(f"t{i}", t, "train") for i, t in enumerate(corpus["train"])]
                    + [(f"v{i}", t, "validation") for i, t in enumerate(corpus["calib"][:75])])
    con.execute(f"create table {marts}.golden_eval_dataset (example_id varchar, input_text varchar)")
    con.executemany(f"insert into {marts}.golden_eval_dataset values (?, ?)",
                    [(f"g{i}", t) for i, t in enumerate(corpus["calib"][75:])])
    con.close()

    ids = _write_requests(drift_home, corpus)
    resources = {
        "warehouse": DuckDBWarehouse(path=str(db)),
        "feedback_store": DuckDBFeedbackStore(warehouse=DuckDBWarehouse(path=str(db))),
        "home": GenopsHome(root=str(drift_home)),
        "mlflow": MlflowTracking(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                                 artifact_root=(tmp_path / "artifacts").as_uri()),
        "io_manager": dg.FilesystemIOManager(base_dir=str(tmp_path / "io")),
    }
    assert dg.materialize([request_log], resources=resources).success
    # The calibration depends on the marts only: computed once, then every day is measured against it.
    calibrated = dg.materialize([drift_calibration], resources=resources)
    assert calibrated.success
    calibration = calibrated.output_for_node(task.step("drift_calibration"))
    assert calibration["n_reference"] == len(corpus["train"]) and calibration["n_heldout"] == 75 + 75
    reference = d.DriftReference.load(calibration["path"])
    assert sorted(reference.train_texts) == sorted(corpus["train"])
    assert reference.calibration.threshold == calibration["threshold"]

    def run(partition: str) -> dict:
        result = dg.materialize([drift_calibration, prompt_drift], selection=[prompt_drift], partition_key=partition,
                                resources=resources,
                                run_config=dg.RunConfig({task.step("prompt_drift"):
                                                         DriftConfig(projector_train_rows=200)}))
        assert result.success
        (mat,) = result.asset_materializations_for_node(task.step("prompt_drift"))
        return {k: v.value for k, v in mat.metadata.items()}

    meta = run(DAY)
    assert meta["threshold"] == calibration["threshold"]
    assert meta["live"] == 40
    assert isinstance(meta["drift"], bool) and meta["drift"] is True
    assert isinstance(meta["flagged_share"], float) and meta["flagged_share"] == meta["flagged"] / 40
    assert 14 <= meta["flagged"] <= 18
    assert meta["in_domain_false_flag_rate"] <= 0.05 and meta["p_value"] < 0.01
    assert meta["n_clusters"] >= 2 and "recipe" in meta["clusters"]
    assert meta["score_histogram"].startswith("![scores](data:image/png;base64,")

    wh = resources["warehouse"]
    flagged = wh.query_df(f"select * from {monitoring}.flagged_prompts where partition_key = ? "
                          "order by request_id", [DAY])
    assert len(flagged) == meta["flagged"]
    assert set(flagged["request_id"]) <= set(ids["day"]) and len(set(flagged["request_id"]) & set(ids["ood"])) >= 14
    assert (flagged["score"] > flagged["threshold"]).all()
    clusters = wh.query_df(f"select * from {monitoring}.prompt_clusters where partition_key = ? order by cluster_id",
                           [DAY])
    assert clusters["size"].sum() == meta["flagged"] == len(flagged)
    assert set(flagged["cluster_id"]) == set(clusters["cluster_id"])
    assert all(json.loads(r) for r in clusters["representatives"])

    projector = drift_home / "monitoring" / task.name / "projector"
    rows = check_projector(projector / DAY, 200 + 75 + 40)  # train sample, golden set, the day's prompts
    live_rows = rows[-40:]
    assert sum(r[1] == "flagged" for r in live_rows) == meta["flagged"]
    assert all(r[2] != "-" for r in live_rows if r[1] == "flagged")
    assert (projector / "latest" / d.METADATA_FILE).read_bytes() == (projector / DAY / d.METADATA_FILE).read_bytes()

    from mlflow.tracking import MlflowClient

    run_info = MlflowClient(resources["mlflow"].tracking_uri).get_run(meta["mlflow_run_id"])
    assert run_info.data.metrics["flagged"] == meta["flagged"]

    # Re-running the day replaces its rows; a day without traffic is zero, not an error.
    again = run(DAY)
    assert again["flagged"] == meta["flagged"]
    assert (len(wh.query_df(f"select * from {monitoring}.flagged_prompts where partition_key = ?", [DAY]))
            == meta["flagged"])
    empty = run(EMPTY_DAY)
    assert (empty["live"], empty["flagged"], empty["flagged_share"], empty["drift"]) == (0, 0, 0.0, False)
    assert json.loads((projector / "latest" / "export.json").read_text())["partition"] == EMPTY_DAY
    # A backfill of an older day leaves `latest` on the newest day.
    assert run(DAY)["projector_latest_updated"] is False
    assert json.loads((projector / "latest" / "export.json").read_text())["partition"] == EMPTY_DAY
