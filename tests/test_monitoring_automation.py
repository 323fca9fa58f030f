"""When the monitoring assets refresh: ticks of declarative automation over stand-ins of
request_log and a daily monitoring asset. A request log loaded while a monitoring run is in
progress must bring exactly one more run after it (``eager()`` drops it); otherwise the condition
requests what ``eager()`` does."""

from __future__ import annotations

from collections.abc import Callable

import dagster as dg
import pytest

from genops_assets.defs.monitoring.automation import eager_with_follow_up
from genops_assets.defs.monitoring.common import daily_partitions
from genops_assets.defs.monitoring.drift import build_drift_assets
from genops_assets.defs.monitoring.quality import build_quality_assets
from genops_assets.defs.monitoring.serving import build_resource_usage, build_serving_monitoring_assets
from genops_assets.lib.tasks import TaskRef

TASK = TaskRef("support_triage", "tasks")
daily = daily_partitions("2026-01-01")
drift_calibration, prompt_drift = build_drift_assets(TASK, daily)
(online_quality,) = build_quality_assets(TASK, daily)
(serving_metrics,) = build_serving_monitoring_assets(TASK, daily)
resource_usage = build_resource_usage(daily)

MONITOR = dg.AssetKey("monitor")
REQUEST_LOG = "request_log"
# A dependency that does not start a refresh, as drift_calibration does for prompt_drift.
IGNORED = "sft_dataset"


class Loop:
    """request_log (unpartitioned as in genops, or daily) -> a daily monitoring asset with the
    condition; ``tick()`` is one evaluation of the automation sensor, its cursor carried over."""

    def __init__(self, condition: dg.AutomationCondition, upstream_partitioned: bool):
        self.instance = dg.DagsterInstance.ephemeral()
        self.cursor = None
        self.during_run: Callable[[], None] = lambda: None
        self.day = daily.get_last_partition_key()
        self.upstream_partition = self.day if upstream_partitioned else None

        @dg.asset(name=REQUEST_LOG, partitions_def=daily if upstream_partitioned else None)
        def request_log() -> None: ...

        @dg.asset(name=IGNORED)
        def sft_dataset() -> None: ...

        @dg.asset(name=MONITOR.path[-1], partitions_def=daily, deps=[request_log, sft_dataset],
                  automation_condition=condition.ignore(dg.AssetSelection.assets(IGNORED)))
        def monitor() -> None:
            self.during_run()

        self.assets = [request_log, sft_dataset, monitor]

    def tick(self) -> set[str | None]:
        result = dg.evaluate_automation_conditions(defs=self.assets, instance=self.instance,
                                                   cursor=self.cursor)
        self.cursor = result.cursor
        return set(result.get_requested_partitions(MONITOR))

    def load_requests(self) -> None:
        """The request_log sensor's run: new lines of the endpoint's log loaded."""
        self.instance.report_runless_asset_event(
            dg.AssetMaterialization(REQUEST_LOG, partition=self.upstream_partition))

    def run_monitor(self, during_run: Callable[[], None] = lambda: None) -> None:
        """The run the sensor launches for the requested day, in process; ``during_run`` is
        called inside it, while the run is in progress."""
        self.during_run = during_run
        assert dg.materialize(self.assets, selection=[MONITOR], partition_key=self.day,
                              instance=self.instance).success

    def run_monitor_with_a_load(self, long_run: bool) -> None:
        """A run during which request-log lines are loaded. A long run spans ticks: the tick
        after its request, then the load seen while the run is in progress (neither requests).
        A short run is requested, runs and sees the load between two ticks."""

        def load():
            if long_run:
                assert self.tick() == set()
            self.load_requests()
            if long_run:
                assert self.tick() == set()

        self.run_monitor(load)

    def first_run(self) -> None:
        """Request log loaded, monitoring requested for today."""
        assert self.tick() == set()
        self.load_requests()
        assert self.tick() == {self.day}


CONDITIONS = {"eager": dg.AutomationCondition.eager(), "eager_with_follow_up": eager_with_follow_up()}
RUN_LENGTHS = pytest.mark.parametrize("long_run", [True, False], ids=["long_run", "run_within_a_tick"])


@pytest.fixture(params=[False, True], ids=["unpartitioned_log", "daily_log"])
def upstream_partitioned(request) -> bool:
    return request.param


@RUN_LENGTHS
def test_requests_loaded_during_a_run_bring_one_more_run(long_run, upstream_partitioned):
    loop = Loop(eager_with_follow_up(), upstream_partitioned)
    loop.first_run()
    loop.run_monitor_with_a_load(long_run)
    assert loop.tick() == {loop.day}

    loop.run_monitor()
    assert [loop.tick(), loop.tick()] == [set(), set()]


@RUN_LENGTHS
def test_eager_drops_requests_loaded_during_a_run(long_run):
    """The failure the follow-up exists for: with eager() the load waits for the next one."""
    loop = Loop(dg.AutomationCondition.eager(), upstream_partitioned=False)
    loop.first_run()
    loop.run_monitor_with_a_load(long_run)
    assert [loop.tick(), loop.tick()] == [set(), set()]


@pytest.mark.parametrize("name", CONDITIONS)
def test_without_loads_during_a_run_it_requests_what_eager_does(name, upstream_partitioned):
    """One request per load, none for a finished run alone, none for an ignored dependency,
    nothing while the request log is missing."""
    loop = Loop(CONDITIONS[name], upstream_partitioned)
    assert loop.tick() == set()
    loop.instance.report_runless_asset_event(dg.AssetMaterialization(IGNORED))
    assert loop.tick() == set()

    loop.load_requests()
    assert loop.tick() == {loop.day}
    loop.run_monitor()
    assert [loop.tick(), loop.tick()] == [set(), set()]

    loop.instance.report_runless_asset_event(dg.AssetMaterialization(IGNORED))
    assert loop.tick() == set()
    loop.load_requests()
    assert loop.tick() == {loop.day}


@pytest.mark.parametrize("asset, ignored", [
    (prompt_drift, (dg.AssetKey([TASK.name, "drift_calibration"]),)),
    (online_quality, (dg.AssetKey([TASK.name, "eval_report"]), dg.AssetKey([TASK.name, "judge_certificate"]),
                      "base_model")),
    (serving_metrics, ()),
    (resource_usage, ()),
], ids=["prompt_drift", "online_quality", "serving_metrics", "resource_usage"])
def test_monitoring_assets_refresh_with_a_follow_up(asset: dg.AssetsDefinition, ignored):
    expected = eager_with_follow_up()
    if ignored:
        expected = expected.ignore(dg.AssetSelection.assets(*ignored))
    assert asset.automation_conditions_by_key[asset.key] == expected


def test_drift_calibration_follows_the_marts_not_the_days():
    assert not drift_calibration.partitions_def
    assert drift_calibration.automation_conditions_by_key[drift_calibration.key] == dg.AutomationCondition.eager()
    assert {k.to_user_string() for k in drift_calibration.dependency_keys} == {"support_triage/sft_dataset",
                                                                               "support_triage/golden_eval_dataset"}
    assert {k.to_user_string() for k in prompt_drift.dependency_keys} == {"request_log",
                                                                          "support_triage/drift_calibration"}
