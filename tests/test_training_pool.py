"""One training at a time on a machine. `genops init-home` writes a Dagster instance whose pools
default to one slot across runs, and tuned_adapter is in the `training` pool; the tuning step
also holds genops' own lock file (genops_assets.lib.locks) while it trains, because Dagster's
slot claim on SQLite storage can let two steps that ask within the same milliseconds both
start. The lock is tested here between processes, in a fixed order of events (no two claims
race); that Dagster's pool enforces its limit is Dagster's to test."""

import multiprocessing
import time
from pathlib import Path

import dagster as dg
import pytest

from genops_assets.cli.home import DAGSTER_YAML, init_home
from genops_assets.lib.locks import exclusive

WAIT_S = 60.0  # for a spawned process to reach a given point; generous on a loaded machine


@pytest.fixture()
def dagster_home(tmp_path, monkeypatch):
    monkeypatch.setenv("GENOPS_HOME", str(tmp_path / "genops"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "genops" / "dagster"))
    init_home()
    return tmp_path / "genops" / "dagster"


def wait_for(proc, *paths: Path) -> Path:
    """The first of ``paths`` that ``proc`` writes."""
    deadline = time.monotonic() + WAIT_S
    while True:
        for path in paths:
            if path.exists():
                return path
        assert proc.is_alive(), f"the process ended (exit code {proc.exitcode}) before writing {paths[0].name}"
        assert time.monotonic() < deadline, f"no {paths[0].name} after {WAIT_S:.0f} s"
        time.sleep(0.02)


def test_init_home_limits_pools_to_one(dagster_home):
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        config = instance.event_log_storage.get_pool_config()
        assert config.default_pool_limit == 1 and config.pool_granularity.value == "op"
        assert instance.event_log_storage.supports_global_concurrency_limits


def _take(lock: str, marks: str) -> None:
    """Ask for the lock, noting when it is being waited for and when it is held; hold it until
    told to let go."""
    marks_dir = Path(marks)

    def waiting(message: str) -> None:
        (marks_dir / "waiting").write_text(message)

    with exclusive(Path(lock), on_wait=waiting):
        (marks_dir / "held").write_text("")
        while not (marks_dir / "release").exists():
            time.sleep(0.02)


def start_taker(tmp_path: Path, name: str):
    marks = tmp_path / name
    marks.mkdir()
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=_take, args=(str(tmp_path / "training.lock"), str(marks)))
    proc.start()
    return proc, marks


@pytest.mark.server
def test_the_training_lock_keeps_a_second_process_waiting_until_the_first_lets_go(tmp_path):
    first, first_marks = start_taker(tmp_path, "first")
    assert wait_for(first, first_marks / "held", first_marks / "waiting").name == "held"  # free: no wait

    second, second_marks = start_taker(tmp_path, "second")
    assert wait_for(second, second_marks / "waiting", second_marks / "held").name == "waiting"
    assert "training.lock" in (second_marks / "waiting").read_text()  # the wait names the lock file
    assert not (second_marks / "held").exists()

    (first_marks / "release").write_text("")
    first.join(WAIT_S)
    wait_for(second, second_marks / "held")
    (second_marks / "release").write_text("")
    second.join(WAIT_S)
    assert (first.exitcode, second.exitcode) == (0, 0)


@pytest.mark.server
def test_a_killed_holder_leaves_the_training_lock_free(tmp_path):
    holder, marks = start_taker(tmp_path, "holder")
    wait_for(holder, marks / "held")
    holder.kill()
    holder.join(WAIT_S)
    waits = []
    with exclusive(tmp_path / "training.lock", on_wait=waits.append):
        pass
    assert waits == []


def test_tuned_adapter_is_in_the_training_pool():
    """Every task's tuning shares the one pool: one training at a time on the machine."""
    from genops_assets.defs.tuning.assets import build_tuning_assets
    from genops_assets.lib.tasks import TaskRef

    for task in ("support_triage", "product_qa"):
        (tuned_adapter,) = build_tuning_assets(TaskRef(task, "tasks"))
        assert tuned_adapter.op.pool == "training"


def test_init_home_upgrades_an_old_generated_config_and_keeps_a_users_own(tmp_path, monkeypatch):
    dagster_home = tmp_path / "genops" / "dagster"
    dagster_home.mkdir(parents=True)
    monkeypatch.setenv("GENOPS_HOME", str(tmp_path / "genops"))
    monkeypatch.setenv("DAGSTER_HOME", str(dagster_home))
    cfg = dagster_home / "dagster.yaml"
    cfg.write_text("# Written by `genops init-home`. Local Dagster instance of genops.\ntelemetry:\n  enabled: false\n")
    init_home()
    assert cfg.read_text() == DAGSTER_YAML
    assert (tmp_path / "genops" / "feedback" / "labels").is_dir()
    installed = (tmp_path / "genops" / "installed_on").read_text()
    init_home()
    assert (tmp_path / "genops" / "installed_on").read_text() == installed  # the install day is kept

    own = "telemetry:\n  enabled: false\nconcurrency:\n  pools:\n    default_limit: 3\n"
    cfg.write_text(own)
    init_home()
    assert cfg.read_text() == own
