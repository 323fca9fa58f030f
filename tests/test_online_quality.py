"""Online quality: deterministic sampling, pointwise judging with per-row failures, the live vs
offline comparison, and one day's materialization over a temporary warehouse."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import pytest
from graph_support import free_port
from judge_standin import StandInJudge, completion

from genops_assets.defs.feedback.assets import request_log
from genops_assets.defs.monitoring.common import daily_partitions
from genops_assets.defs.monitoring.quality import build_quality_assets
from genops_assets.lib.judging import BUILTIN_RUBRICS, ChatJudge, load_rubrics
from genops_assets.lib.online_quality import (
    ScoreItem,
    compare,
    load_offline_predictions,
    sample_hash,
    sample_rows,
    score_pointwise,
    scores_of,
    unpaired_difference_ci,
)
from genops_assets.lib.tasks import TaskRef
from resources.feedback_store import DuckDBFeedbackStore
from resources.judge import JudgeResource
from resources.paths import GenopsHome
from resources.tracking import MlflowTracking
from resources.warehouse import DuckDBWarehouse, monitoring_schema

REPO = Path(__file__).resolve().parents[1]
TASK = TaskRef("support_triage", str(REPO / "tasks"))
(online_quality,) = build_quality_assets(TASK, daily_partitions("2026-01-01"))
MONITORING = monitoring_schema(TASK.name)
RUBRICS = load_rubrics(BUILTIN_RUBRICS)


# -- sampling -----------------------------------------------------------------------------

def test_sampling_is_deterministic_and_takes_the_share():
    ids = [f"chatcmpl-{i:05d}" for i in range(4000)]
    first = sample_rows(ids, str, 0.2)
    assert first == sample_rows(ids, str, 0.2)  # a re-run picks the same rows
    shuffled = ids[:]
    random.Random(7).shuffle(shuffled)
    assert set(sample_rows(shuffled, str, 0.2)) == set(first)  # membership depends on the id alone
    # 4000 draws at p = 0.2: sd of the share is sqrt(0.2 * 0.8 / 4000) = 0.0063; +-0.03 is ~5 sd.
    assert abs(len(first) / len(ids) - 0.2) < 0.03
    assert set(sample_rows(ids, str, 0.05)) <= set(first)  # a smaller share is a subset
    assert sample_rows(ids, str, 0.0) == [] and sample_rows(ids, str, 1.0) == ids
    assert all(0.0 <= sample_hash(i) < 1.0 for i in ids[:100])
    assert sample_hash("a") != sample_hash("a", salt="other")


def test_sampling_cap_keeps_the_smallest_hashes_in_original_order():
    ids = [f"r{i}" for i in range(500)]
    capped = sample_rows(ids, str, 0.5, max_count=10)
    assert len(capped) == 10
    expected = sorted(sorted((i for i in ids if sample_hash(i) < 0.5), key=sample_hash)[:10], key=ids.index)
    assert capped == expected
    assert sample_rows(ids, str, 0.5, max_count=0) == []
    with pytest.raises(ValueError, match="share must be within"):
        sample_rows(ids, str, 1.5)


# -- comparison ---------------------------------------------------------------------------

def test_comparison_means_and_difference_by_hand():
    live = [2.0, 3.0, 4.0, 3.0]  # sum 12 / 4 = 3.0
    offline = [4.0, 5.0, 4.0, 5.0, 3.0, 3.0]  # sum 24 / 6 = 4.0
    c = compare(live, offline, min_samples=1)
    assert c.live.estimate == pytest.approx(3.0) and c.offline.estimate == pytest.approx(4.0)
    assert c.delta.estimate == pytest.approx(-1.0)  # 3.0 - 4.0
    assert c.delta.low <= -1.0 <= c.delta.high
    assert (c.live_n, c.offline_n) == (4, 6)


def test_unpaired_interval_by_hand():
    # a is constant 1, so every resample of a has mean 1. A resample of b = [0, 1] (2 draws) has
    # mean 0 (p 1/4), 0.5 (p 1/2) or 1 (p 1/4), so mean(a) - mean(b) is 1, 0.5 or 0; over 2000
    # resamples both extremes occur (each has p 1/4), so the 2.5% and 97.5% quantiles are 0 and 1.
    iv = unpaired_difference_ci([1.0, 1.0, 1.0, 1.0], [0.0, 1.0])
    assert iv.estimate == pytest.approx(0.5)  # 1 - (0 + 1) / 2
    assert (iv.low, iv.high) == (pytest.approx(0.0), pytest.approx(1.0))
    with pytest.raises(ValueError, match="non-empty"):
        unpaired_difference_ci([], [1.0])


def test_regression_flagged_when_live_is_clearly_lower_not_when_equal():
    # Constant scores: every resample has the same means, so the interval of the difference is
    # the point 2.0 - 4.5 = -2.5; its upper bound -2.5 < -0.0, a regression.
    low = compare([2.0] * 12, [4.5] * 12)
    assert low.delta.estimate == pytest.approx(-2.5)
    assert (low.delta.low, low.delta.high) == (pytest.approx(-2.5), pytest.approx(-2.5))
    assert low.decided and low.regression and not low.improvement
    # With a margin of 3 the interval (-2.5) does not lie below -3: no regression.
    assert not compare([2.0] * 12, [4.5] * 12, margin=3.0).regression
    # The same scores on both sides: difference 0, interval around 0, nothing flagged.
    same = [3.0, 4.0, 5.0, 2.0] * 5
    equal = compare(same, list(same))
    assert equal.delta.estimate == pytest.approx(0.0)
    assert equal.delta.low < 0.0 < equal.delta.high
    assert equal.decided and not equal.regression and not equal.improvement
    # Live clearly higher: an improvement, reported as such, not a regression.
    better = compare([4.8] * 12, [3.1] * 12)
    assert better.improvement and not better.regression
    # Too few live scores: clearly lower, but undecided.
    few = compare([1.0] * 5, [5.0] * 12, min_samples=10)
    assert not few.decided and not few.regression and "too few" in few.reason
    with pytest.raises(ValueError, match="margin"):
        compare([1.0], [1.0], margin=-0.1)


# -- judging ------------------------------------------------------------------------------

def scripted_judge(call: int, body: dict) -> tuple[int, dict]:
    """Scores by what the answer says: GOOD 4.8, BAD 1.7; BOOM is a client error, GARBAGE an
    answer outside the scale."""
    assert body["guided_choice"] == ["1", "2", "3", "4", "5"]
    user = body["messages"][-1]["content"]
    answer = user.split("Response:\n", 1)[1]
    if "BOOM" in answer:
        return 400, {"error": {"message": "bad request", "type": "invalid_request_error"}}
    if "GARBAGE" in answer:
        return 200, completion("maybe")
    if "GOOD" in answer:
        return 200, completion("5", {"5": 0.8, "4": 0.2})  # 5 * 0.8 + 4 * 0.2 = 4.8
    return 200, completion("2", {"2": 0.7, "1": 0.3})  # 2 * 0.7 + 1 * 0.3 = 1.7


def test_judge_failures_are_recorded_per_row_not_scored():
    items = [ScoreItem("a", "my order is late", "GOOD: it ships tomorrow"),
             ScoreItem("b", "refund?", "BOOM"),
             ScoreItem("c", "password reset", "GARBAGE"),
             ScoreItem("d", "hello", "BAD")]
    with StandInJudge(scripted_judge, free_port()) as standin:
        client = ChatJudge(standin.url, "judge", max_retries=0, max_concurrency=2)
        scored = score_pointwise(client, RUBRICS["helpfulness"], items)
        # The judge is shown the task input and the answer, and no reference.
        sent = {b["messages"][-1]["content"] for b in standin.bodies}
    assert any("Request:\nmy order is late" in s and "(none)" in s for s in sent)
    by_id = {s.item_id: s for s in scored}
    assert by_id["a"].score == pytest.approx(4.8) and by_id["a"].choice == "5" and by_id["a"].error is None
    assert by_id["d"].score == pytest.approx(1.7)
    assert by_id["b"].score is None and "BadRequestError" in by_id["b"].error
    assert by_id["c"].score is None and "not one of" in by_id["c"].error
    assert scores_of(scored) == [pytest.approx(4.8), pytest.approx(1.7)]
    assert client.usage.failures == 2
    with pytest.raises(ValueError, match="not pointwise"):
        score_pointwise(client, RUBRICS["pairwise_quality"], items)


def test_offline_predictions_by_version_and_bad_lines(tmp_path):
    p = tmp_path / "predictions.jsonl"
    rows = [{"model": "base (0-shot)", "example_id": "e1", "input": "x", "prediction": "p0"},
            {"model": "candidate v3", "example_id": "e1", "input": "x", "prediction": "p3"},
            {"model": "champion v2", "example_id": "e1", "input": "x", "prediction": "p2"},
            {"model": "candidate v3 + prompt v5", "example_id": "e1", "input": "x", "prediction": "p35"}]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = load_offline_predictions(p, {"candidate v3": "3", "champion v2": "2"})
    assert got == {"3": [ScoreItem("e1", "x", "p3")], "2": [ScoreItem("e1", "x", "p2")]}
    p.write_text(json.dumps(rows[1]) + "\n" + json.dumps({"model": "candidate v3", "example_id": "e2"}) + "\n")
    with pytest.raises(ValueError, match=r"predictions\.jsonl, line 2: .*'input'"):
        load_offline_predictions(p, {"candidate v3": "3"})
    with pytest.raises(FileNotFoundError, match=r"missing.jsonl"):
        load_offline_predictions(tmp_path / "missing.jsonl", {})


# -- one day materialized -----------------------------------------------------------------

DAY = datetime(2026, 3, 1, tzinfo=UTC).timestamp()
NEXT_DAY = DAY + 86400


def served(i: int, ts: float, version: str | None, response: str, **kw) -> dict:
    """A request record the way genops' server writes it."""
    return {"ts": ts, "request_id": f"chatcmpl-{i:04d}", "model": "champion",
            "served_by": "champion" if version else "base", "version": version, "prompt_version": "1",
            "status": 200, "prompt_tokens": 20, "completion_tokens": 8, "latency_s": 0.3, "finish_reason": "stop",
            "prompt_variables": {"message": f"ticket {i}: my invoice is wrong"}, "response": response, **kw}


def certificate_value(state: dict) -> dg.AssetsDefinition:
    """judge_certificate's value as an upstream asset of the same key, read from ``state``."""
    @dg.asset(key=[TASK.name, "judge_certificate"])
    def judge_certificate_value() -> dict:
        return dict(state)
    return judge_certificate_value


def test_online_quality_flags_a_live_regression_for_one_day(tmp_path):
    # Live answers of version 3 on the day: 60 of them, all judged BAD (1.7), one of the sampled
    # ones a judge failure. Noise the asset must leave out: a failed request, a reload event,
    # version 2 (not evaluated offline), the base model, and version 3 on the next day.
    v3 = [served(i, DAY + 60 * i, "3", "BAD answer") for i in range(60)]
    picked = sample_rows(v3, lambda r: r["request_id"], 0.5, 20)
    assert len(picked) == 20  # 60 rows at share 0.5: 20 pass the cap
    picked[0]["response"] = "BOOM"
    next_day = next(r for r in (served(i, NEXT_DAY + 5, "3", "GOOD") for i in range(400, 500))
                    if sample_hash(r["request_id"]) < 0.5)  # one answer the next day, in the sample
    records = [*v3,
               served(100, DAY + 10, "3", "GOOD", status=500, error="boom"),
               {"ts": DAY + 20, "event": "reload", "model": "champion", "version": "3"},
               *[served(200 + i, DAY + 30 + i, "2", "GOOD") for i in range(5)],
               served(300, DAY + 40, None, "GOOD"),
               next_day]
    home = tmp_path / "home"
    (home / "endpoint").mkdir(parents=True)
    (home / "endpoint" / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    # Offline: eval_report's golden-set answers, all GOOD (4.8) for version 3. The upstream
    # eval_report and base_model values come from two small assets under the same keys.
    preds = tmp_path / "predictions.jsonl"
    preds.write_text("".join(json.dumps({"model": m, "example_id": f"g{i}", "input": f"golden {i}",
                                         "prediction": p, "reference": {}}) + "\n"
                             for i in range(12) for m, p in (("candidate v3", "GOOD"), ("base (0-shot)", "BAD"))))

    @dg.asset(key=[TASK.name, "eval_report"])
    def eval_report_value() -> dict:
        return {"candidate": {"version": "3"}, "champion": None, "predictions_file": str(preds),
                "mlflow_run_id": "offline-run"}

    @dg.asset(name="base_model")
    def base_model_value() -> dict:
        return {"path": None}

    warehouse = DuckDBWarehouse(path=str(home / "warehouse.duckdb"))
    io = dg.FilesystemIOManager(base_dir=str(tmp_path / "io"))
    certificate: dict = {}
    cert_asset = certificate_value(certificate)
    with StandInJudge(scripted_judge, free_port()) as standin:
        # The judge's certificate (judge_certificate's value): this judge, certified.
        certificate.update(certified=True, judge_model="judge", judge_url=standin.url, rubric="pairwise_quality@x",
                           rubric_digest="x", certificate={"failures": []}, mlflow_run_id="cert-run")
        res = {"warehouse": warehouse, "feedback_store": DuckDBFeedbackStore(warehouse=warehouse),
               "home": GenopsHome(root=str(home)), "io_manager": io,
               "judge": JudgeResource(base_url=standin.url, model="judge", max_retries=0),
               "mlflow": MlflowTracking(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                                        artifact_root=(tmp_path / "artifacts").as_uri())}
        assert dg.materialize([request_log, eval_report_value, base_model_value, cert_asset], resources=res).success
        cfg = {"ops": {TASK.step("online_quality"): {"config": {"share": 0.5, "max_samples": 20, "min_samples": 10}}}}

        def run(day: str):
            result = dg.materialize([eval_report_value, base_model_value, cert_asset, online_quality], resources=res,
                                    selection=[online_quality], partition_key=day, run_config=cfg)
            assert result.success
            return {k: v.value for k, v in result.asset_materializations_for_node(TASK.step("online_quality"))[0]
                    .metadata.items()}

        meta = run("2026-03-01")
        assert standin.calls == 20 + 12  # one call per sampled live answer and per golden answer
        again = run("2026-03-01")
        assert standin.calls == 32 + 1  # a re-run is answered from the cache; only the failure is retried
        other = run("2026-03-02")  # the next day has one version-3 answer: too few to decide
        assert standin.calls == 33 + 1
        # The same day judged by a judge whose certificate failed: the same numbers, marked, and
        # nothing decided on them (the rollback sensor reads judge_certified).
        certificate.update(certified=False, certificate={"failures": ["position_consistency: 0.000"]})
        assert dg.materialize([cert_asset], resources=res).success
        uncertified = run("2026-03-01")
        certificate.update(certified=True, judge_model="another-judge")
        assert dg.materialize([cert_asset], resources=res).success
        other_judge = run("2026-03-01")

    # live: 19 judged at 1.7 (one failure); offline: 12 at 4.8; 1.7 - 4.8 = -3.1, a point interval.
    assert meta["version"] == "3" and meta["regression"] is True and meta["improvement"] is False
    assert meta["judge_certified"] is True and "certified" in meta["judge_status"]
    assert uncertified["judge_certified"] is False and uncertified["delta"] == pytest.approx(-3.1)
    assert uncertified["reason"].startswith("UNCERTIFIED judge, not a result")
    assert "position_consistency: 0.000" in uncertified["judge_status"]
    assert other_judge["judge_certified"] is False and "is for another-judge" in other_judge["judge_status"]
    assert (meta["live_n"], meta["offline_n"], meta["live_failures"]) == (19, 12, 1)
    assert meta["live_mean"] == pytest.approx(1.7) and meta["offline_mean"] == pytest.approx(4.8)
    assert meta["delta"] == pytest.approx(-3.1)
    assert meta["ci_low"] == pytest.approx(-3.1) and meta["ci_high"] == pytest.approx(-3.1)
    # 31 answered calls (the failed one is counted as a failure), 10 prompt tokens each.
    assert meta["judge_calls"] == 31 and meta["judge_failures"] == 1 and meta["judge_prompt_tokens"] == 310
    assert meta["live_versions"] == "2, 3"
    assert {k: again[k] for k in ("version", "regression", "delta", "live_n")} == \
        {k: meta[k] for k in ("version", "regression", "delta", "live_n")}
    assert again["judge_calls"] == 0 and again["judge_cached"] == 31 and again["judge_failures"] == 1

    rows = warehouse.query_df(f"select * from {MONITORING}.online_quality where partition_key = '2026-03-01' "
                              "order by side, item_id")
    assert len(rows) == 32  # replaced, not appended, by the re-run
    assert not rows.judge_certified.any()  # the last run of the day was judged by an uncertified judge
    live = rows[rows.side == "live"]
    assert set(live.item_id) == {r["request_id"] for r in picked}
    failed = live[live.error.notna()]
    assert list(failed.item_id) == [picked[0]["request_id"]] and failed.score.isna().all()
    assert "BadRequestError" in failed.error.iloc[0]
    assert (live.served_by == "champion").all() and (rows.rubric == "helpfulness").all()
    summary = warehouse.query_df(f"select * from {MONITORING}.online_quality_summary order by partition_key")
    assert list(summary.partition_key) == ["2026-03-01", "2026-03-02"]
    assert bool(summary.regression.iloc[0]) and summary.live_failures.iloc[0] == 1
    assert list(summary.judge_certified) == [False, True]

    assert other["version"] == "3" and other["live_n"] == 1 and other["regression"] is False
    assert other["decided"] is False

    out = home / "runs" / TASK.name / "online_quality" / "2026-03-01"
    assert (out / "online_quality.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "summary.json").read_text())["versions"]["3"]["regression"] is True
    client = res["mlflow"].client()
    run_info = client.get_run(meta["mlflow_run_id"])
    assert run_info.data.metrics["v3.regression"] == 1.0
    assert client.get_run(uncertified["mlflow_run_id"]).data.tags["genops.judge_certified"] == "false"
    assert client.get_experiment(run_info.info.experiment_id).name == "genops/support_triage/monitoring"
    assert {a.path for a in client.list_artifacts(meta["mlflow_run_id"], "online_quality")} >= \
        {"online_quality/online_quality.png", "online_quality/summary.json", "online_quality/rows.jsonl"}


def test_online_quality_without_an_evaluated_version_compares_nothing(tmp_path):
    home = tmp_path / "home"
    (home / "endpoint").mkdir(parents=True)
    (home / "endpoint" / "requests.jsonl").write_text(
        "".join(json.dumps(served(i, DAY + i, "2", "GOOD")) + "\n" for i in range(30)))
    preds = tmp_path / "predictions.jsonl"
    preds.write_text(json.dumps({"model": "candidate v3", "example_id": "g1", "input": "x", "prediction": "GOOD"})
                     + "\n")

    @dg.asset(key=[TASK.name, "eval_report"])
    def eval_report_value() -> dict:
        return {"candidate": {"version": "3"}, "champion": None, "predictions_file": str(preds)}

    @dg.asset(name="base_model")
    def base_model_value() -> dict:
        return {"path": None}

    warehouse = DuckDBWarehouse(path=str(home / "warehouse.duckdb"))
    res = {"warehouse": warehouse, "feedback_store": DuckDBFeedbackStore(warehouse=warehouse),
           "home": GenopsHome(root=str(home)),
           "io_manager": dg.FilesystemIOManager(base_dir=str(tmp_path / "io")),
           # Nothing is judged, so no judge is reachable at this address.
           "judge": JudgeResource(base_url=f"http://127.0.0.1:{free_port()}/v1", model="judge", max_retries=0),
           "mlflow": MlflowTracking(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                                    artifact_root=(tmp_path / "artifacts").as_uri())}
    cert_asset = certificate_value({"certified": False, "mlflow_run_id": "cert-run"})
    assert dg.materialize([request_log, eval_report_value, base_model_value, cert_asset], resources=res).success
    result = dg.materialize([eval_report_value, base_model_value, cert_asset, online_quality], resources=res,
                            selection=[online_quality], partition_key="2026-03-01")
    assert result.success
    (mat,) = result.asset_materializations_for_node(TASK.step("online_quality"))
    meta = {k: v.value for k, v in mat.metadata.items()}
    assert meta["compared"] is False and meta["regression"] is False and meta["version"] == ""
    assert "live: ['2']" in meta["reason"] and "offline: ['3']" in meta["reason"]
    assert len(warehouse.query_df(f"select * from {MONITORING}.online_quality")) == 0
