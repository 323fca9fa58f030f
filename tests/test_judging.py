"""Judges: rubrics, choice mode, position-swap logic, retries, failures and the call cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from graph_support import free_port
from judge_standin import StandInJudge, completion

from genops_assets.lib.cache import CallCache
from genops_assets.lib.judging import (
    BUILTIN_RUBRICS,
    MAX_RETRY_AFTER_S,
    ChatJudge,
    Failure,
    RubricError,
    expected_score,
    load_rubric,
    load_rubrics,
    pairwise_outcome,
    retry_after_s,
)
from genops_assets.lib.sxs import SxsRow, run_sxs
from genops_assets.serving import control

pytestmark = pytest.mark.server

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("first,second,outcome,consistent", [
    ("A", "B", "win", True),     # candidate preferred in both orders
    ("B", "A", "loss", True),
    ("C", "C", "tie", True),
    ("A", "A", "tie", False),    # the judge always picks the first slot: position bias
    ("B", "B", "tie", False),
    ("A", "C", "tie", False),
])
def test_pairwise_outcome_controls_position_bias(first, second, outcome, consistent):
    assert pairwise_outcome(first, second) == (outcome, consistent)


def test_pairwise_outcome_rejects_other_verdicts():
    with pytest.raises(ValueError, match="A, B or C"):
        pairwise_outcome("yes", "B")


def test_builtin_and_task_rubrics_load(tmp_path):
    rubrics = load_rubrics(BUILTIN_RUBRICS, REPO / "tasks" / "support_triage" / "rubrics")
    assert {"pairwise_quality", "instruction_following", "helpfulness", "groundedness", "safety",
            "triage_correctness"} <= set(rubrics)
    assert rubrics["pairwise_quality"].choices == ("A", "B", "C")
    assert rubrics["helpfulness"].choices == ("1", "2", "3", "4", "5")
    msgs = rubrics["helpfulness"].render(input="q", reference="r", response="a")
    assert msgs[0]["role"] == "system" and "Response:\na" in msgs[1]["content"]

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nkind: pointwise\nsystem: s\ntemplate: '{input} {answer}'\n")
    with pytest.raises(RubricError, match=r"bad\.yaml: unknown template variable\(s\) \['answer'\]"):
        load_rubric(bad)
    bad.write_text("name: x\nkind: ranking\nsystem: s\ntemplate: t\n")
    with pytest.raises(RubricError, match="kind must be"):
        load_rubric(bad)
    # Editing a rubric changes its version, so cached verdicts are not reused.
    good = tmp_path / "good.yaml"
    good.write_text("name: g\nkind: pointwise\nsystem: s\ntemplate: '{response}'\n")
    v1 = load_rubric(good).version
    good.write_text("name: g\nkind: pointwise\nsystem: s2\ntemplate: '{response}'\n")
    assert load_rubric(good).version != v1


def test_flaky_judge_is_retried_then_answers(tmp_path):
    def script(n, body):
        assert body["guided_choice"] == ["A", "B", "C"] and body["logprobs"] is True
        if n <= 2:
            return 503, {"error": {"message": "overloaded"}}
        return 200, completion("A", {"A": 0.7, "B": 0.2, "C": 0.1})

    slept: list[float] = []
    with StandInJudge(script, free_port()) as judge:
        client = ChatJudge(judge.url, "judge", max_retries=3, backoff_s=0.1, sleep=slept.append)
        v = client.choose([{"role": "user", "content": "which?"}], ["A", "B", "C"])
        assert judge.calls == 3
    assert v.choice == "A" and v.probabilities["A"] == pytest.approx(0.7)
    assert client.usage.retries == 2 and client.usage.calls == 1
    assert slept[1] > slept[0] >= 0.1, "exponential backoff"


def test_rate_limited_judge_waits_as_long_as_retry_after_says():
    """A 429 with ``Retry-After: 1`` is retried after a second, not after the 10 ms backoff."""
    def script(n, body):
        if n == 1:
            return 429, {"error": {"message": "Rate limit reached; retry in 1 s"}}, {"Retry-After": "1"}
        return 200, completion("B", {"A": 0.1, "B": 0.8, "C": 0.1})

    with StandInJudge(script, free_port()) as judge:
        client = ChatJudge(judge.url, "judge", max_retries=2, backoff_s=0.01)
        v = client.choose([{"role": "user", "content": "which?"}], ["A", "B", "C"])
        assert judge.calls == 2 and judge.arrivals[1] - judge.arrivals[0] >= 1.0
    assert v.choice == "B" and client.usage.retries == 1 and client.usage.calls == 1


def test_rate_limit_without_retry_after_backs_off_then_gives_up():
    def script(n, body):
        return 429, {"error": {"message": "slow down"}}

    slept: list[float] = []
    with StandInJudge(script, free_port()) as judge:
        client = ChatJudge(judge.url, "judge", max_retries=2, backoff_s=0.05, sleep=slept.append)
        [out] = client.choose_many([([{"role": "user", "content": "q"}], ["A", "B"], "v1")])
        assert judge.calls == 3
    assert isinstance(out, Failure) and "RateLimitError" in out.error
    assert client.usage.retries == 2 and client.usage.failures == 1
    assert 0.05 <= slept[0] < slept[1], "exponential backoff when the server names no wait"


def test_retry_after_forms():
    import httpx

    def error(headers):
        exc = Exception("rate limited")
        exc.response = httpx.Response(429, headers=headers)
        return exc

    assert retry_after_s(error({"Retry-After": "2"})) == 2.0
    assert retry_after_s(error({"retry-after-ms": "250"})) == 0.25
    assert retry_after_s(error({"Retry-After": "86400"})) == MAX_RETRY_AFTER_S
    assert retry_after_s(error({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"})) == 0.0  # a date already past
    assert retry_after_s(error({"Retry-After": "soon"})) is None
    assert retry_after_s(error({})) is None and retry_after_s(Exception("no response")) is None


def test_garbage_and_unreachable_judges_are_recorded_per_row(tmp_path):
    with StandInJudge(lambda n, b: (200, completion("I think the first one")), free_port()) as judge:
        client = ChatJudge(judge.url, "judge", max_retries=0)
        [out] = client.choose_many([([{"role": "user", "content": "q"}], ["A", "B", "C"], "v1")])
    assert isinstance(out, Failure) and "not one of ['A', 'B', 'C']" in out.error
    assert client.usage.failures == 1

    client = ChatJudge(f"http://127.0.0.1:{free_port()}/v1", "judge", max_retries=2, backoff_s=0.01,
                       sleep=lambda s: None, timeout_s=2)
    [out] = client.choose_many([([{"role": "user", "content": "q"}], ["1", "2"], "v1")])
    assert isinstance(out, Failure) and "APIConnectionError" in out.error
    assert client.usage.retries == 2


def test_sxs_on_the_real_server_then_fully_cached(tmp_path, tiny_model_dir):
    """AutoSxS against genops' own endpoint (tiny model) in choice mode; the re-run makes no call."""
    state_dir = tmp_path / "judge"
    state = control.start_server(str(tiny_model_dir), {}, {}, state_dir, port=free_port(), ready_timeout_s=180)
    try:
        rubrics = load_rubrics(BUILTIN_RUBRICS)
        rows = [SxsRow(f"ex_{i}", f"Message {i}: my camera is offline", '{"category": "technical_issue"}',
                       f'{{"category": "technical_issue", "n": {i}}}', f"no idea {i}") for i in range(6)]
        cache = CallCache(tmp_path / "calls.sqlite")
        client = ChatJudge(f"{state.url}/v1", "base", cache=cache, max_concurrency=4)
        first = run_sxs(client, rubrics["pairwise_quality"], [rubrics["instruction_following"]], rows,
                        log=lambda m: None)
        assert client.usage.calls == 6 * 4 and not first.failures
        s = first.summary
        assert s["judged_pairs"] == 6
        assert s["win_rate"]["estimate"] + s["tie_rate"]["estimate"] + s["loss_rate"]["estimate"] == pytest.approx(1.0)
        assert 0 <= s["position_consistency"]["low"] <= s["position_consistency"]["estimate"] <= 1
        assert 1.0 <= s["pointwise"]["instruction_following"]["candidate"]["estimate"] <= 5.0
        served = [json.loads(x) for x in (state_dir / "requests.jsonl").read_text().splitlines()]
        assert sum(1 for e in served if e.get("guided")) == 24

        again = ChatJudge(f"{state.url}/v1", "base", cache=CallCache(tmp_path / "calls.sqlite"))
        second = run_sxs(again, rubrics["pairwise_quality"], [rubrics["instruction_following"]], rows,
                         log=lambda m: None)
        assert again.usage.calls == 0 and again.usage.cached == 24
        assert len((state_dir / "requests.jsonl").read_text().splitlines()) == len(served), (
            "no request reached the server")
        assert second.summary == first.summary
    finally:
        control.stop_server(state_dir)


def test_expected_score_is_the_scale_mean():
    from genops_assets.lib.judging import Verdict

    assert expected_score(Verdict("4", {"1": 0.0, "2": 0.0, "3": 0.5, "4": 0.5, "5": 0.0})) == pytest.approx(3.5)


def test_judge_human_agreement_and_position_bias_with_a_scripted_judge():
    """The stand-in prefers the response containing 'good', whatever its slot; one human label disagrees."""
    def script(n, body):
        text = body["messages"][-1]["content"]
        a = text.split("Response A:")[1].split("Response B:")[0]
        return 200, completion("A" if "good" in a else "B",
                               {"A": 0.9, "B": 0.1} if "good" in a else {"B": 0.9, "A": 0.1})

    rub = load_rubrics(BUILTIN_RUBRICS)["pairwise_quality"]
    rows = [SxsRow("1", "q1", "", "good answer", "bad answer", human="win"),
            SxsRow("2", "q2", "", "bad answer", "good answer", human="loss"),
            SxsRow("3", "q3", "", "good answer", "bad answer", human="loss"),
            SxsRow("4", "q4", "", "bad answer", "good answer", human="loss")]
    with StandInJudge(script, free_port()) as judge:
        client = ChatJudge(judge.url, "judge", max_concurrency=2)
        res = run_sxs(client, rub, [], rows, log=lambda m: None)
    assert [r["outcome"] for r in res.rows] == ["win", "loss", "win", "loss"]
    assert all(r["consistent"] for r in res.rows)
    jh = res.summary["judge_human"]
    # judge: W L W L, human: W L L L -> accuracy 3/4; chance = 0.5*0.25 + 0.5*0.75 = 0.5; kappa = 0.5
    assert jh == {"n": 4, "accuracy": 0.75, "cohen_kappa": pytest.approx(0.5)}
    assert res.summary["position_consistency"]["estimate"] == 1.0
    # Margins: +0.8 when the candidate is the good answer, -0.8 otherwise; mean of (+,-,+,-) = 0.
    assert [r["preference_margin"] for r in res.rows] == pytest.approx([0.8, -0.8, 0.8, -0.8])
    assert res.summary["preference_margin"]["estimate"] == pytest.approx(0.0)


def test_a_judge_stuck_on_one_slot_is_all_ties_and_inconsistent():
    rub = load_rubrics(BUILTIN_RUBRICS)["pairwise_quality"]
    rows = [SxsRow(str(i), f"q{i}", "", "x", "y") for i in range(3)]
    with StandInJudge(lambda n, b: (200, completion("A", {"A": 0.8, "B": 0.1, "C": 0.1})), free_port()) as judge:
        res = run_sxs(ChatJudge(judge.url, "judge"), rub, [], rows, log=lambda m: None)
    s = res.summary
    assert s["tie_rate"]["estimate"] == 1.0 and s["position_consistency"]["estimate"] == 0.0
    assert s["preference_margin"]["estimate"] == pytest.approx(0.0)
