"""Background work (monitoring runs, the local judge server) yields the CPU to the endpoint:
a session of its own at a lower autogroup nice value, never the caller's session."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys

import dagster as dg
import pytest
from graph_support import free_port

from genops_assets.lib.priority import autogroup_nice

PROBE = """
import json, os, sys
from genops_assets.lib.priority import autogroup_nice, lower_priority
done = lower_priority(int(sys.argv[1]), new_session=sys.argv[2] == "new")
print(json.dumps({"done": done, "leader": os.getsid(0) == os.getpid(), "nice": os.getpriority(os.PRIO_PROCESS, 0),
                  "autogroup": autogroup_nice()}))
"""


def _probe(nice: int, session: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, str(nice), session], capture_output=True, text=True,
                         check=True, cwd=os.getcwd())
    return json.loads(out.stdout)


def test_background_nice_reads_the_environment(monkeypatch, tmp_path):
    from resources import build_resources

    monkeypatch.delenv("GENOPS_BACKGROUND_NICE", raising=False)
    res = build_resources(home=tmp_path)
    assert res["home"].background_nice == 10 and res["judge"].local_nice == 10
    monkeypatch.setenv("GENOPS_BACKGROUND_NICE", "7")
    res = build_resources(home=tmp_path)
    assert res["home"].background_nice == 7 and res["judge"].local_nice == 7
    for bad in ("high", "20", "-1"):
        monkeypatch.setenv("GENOPS_BACKGROUND_NICE", bad)
        with pytest.raises(ValueError, match="GENOPS_BACKGROUND_NICE"):
            build_resources(home=tmp_path)


@pytest.mark.server
def test_lower_priority_moves_into_its_own_session_and_never_renices_the_callers():
    mine = autogroup_nice()
    moved = _probe(7, "new")
    assert moved["leader"] and moved["nice"] == 7
    if mine is not None:  # a kernel with autogroup scheduling
        assert moved["autogroup"] == 7 and "autogroup nice 7" in moved["done"]
    stayed = _probe(7, "same")  # not a session leader: the caller's session keeps its share
    assert not stayed["leader"] and stayed["nice"] == 7 and "autogroup nice 7" not in stayed["done"]
    assert autogroup_nice() == mine
    assert _probe(0, "new")["done"] == [], "0 leaves the priority alone"


def _background_child(queue) -> None:
    from genops_assets.defs.monitoring.common import run_in_background

    run_in_background(dg.build_asset_context(), 9)
    queue.put((os.getsid(0) == os.getpid(), os.getpriority(os.PRIO_PROCESS, 0), autogroup_nice()))


@pytest.mark.server
def test_monitoring_runs_lower_their_priority_only_in_a_process_of_their_own():
    from genops_assets.defs.monitoring.common import run_in_background

    before = (os.getsid(0), os.getpriority(os.PRIO_PROCESS, 0), autogroup_nice())
    run_in_background(dg.build_asset_context(), 9)  # in-process: a test, a notebook
    assert (os.getsid(0), os.getpriority(os.PRIO_PROCESS, 0), autogroup_nice()) == before
    ctx = multiprocessing.get_context("spawn")  # how Dagster's code server starts a launched run
    queue = ctx.Queue()
    child = ctx.Process(target=_background_child, args=(queue,))
    child.start()
    leader, nice, group = queue.get(timeout=120)
    child.join(timeout=60)
    assert leader and nice == 9
    assert group in (9, None)


@pytest.mark.server
def test_local_judge_server_runs_at_background_priority(tiny_model_dir, tmp_path):
    from resources.judge import JudgeResource

    judge = JudgeResource(local_state_dir=str(tmp_path / "judge"), local_port=free_port(), local_nice=11)
    try:
        judge.endpoint_url(tiny_model_dir)
        from genops_assets.serving import control

        pid = control.read_state(tmp_path / "judge").pid
        assert os.getpriority(os.PRIO_PROCESS, pid) == 11
        assert autogroup_nice(pid) in (11, None)
    finally:
        judge.stop_local()
