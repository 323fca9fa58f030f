"""One training at a time: the Dagster instance `genops init-home` writes limits pool `training` to one
step across runs, enforced by Dagster's own concurrency slots (not a lock of ours)."""

import json
import multiprocessing
import time
from pathlib import Path

import dagster as dg
import pytest

from genops_assets.cli.main import DAGSTER_YAML, init_home

# How long a training step waits for a concurrent run's training step to start. With a pool
# of one the other step cannot start, so the wait times out; with a larger pool it starts
# within this window (the second run is launched once the first trains, and its process
# starts in a few seconds) and the two intervals overlap.
PEER_WAIT_S = 15.0


class TrainConfig(dg.Config):
    log_dir: str


@dg.op(pool="training")
def train(context: dg.OpExecutionContext, config: TrainConfig) -> None:
    log = Path(config.log_dir)
    (log / f"{context.run_id}.start").write_text(repr(time.time()))
    deadline = time.monotonic() + PEER_WAIT_S
    while time.monotonic() < deadline and len(list(log.glob("*.start"))) < 2:
        time.sleep(0.05)
    time.sleep(0.2)
    (log / f"{context.run_id}.end").write_text(repr(time.time()))


@dg.job(executor_def=dg.in_process_executor)
def training_job():
    train()


@pytest.fixture()
def dagster_home(tmp_path, monkeypatch):
    monkeypatch.setenv("GENOPS_HOME", str(tmp_path / "genops"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "genops" / "dagster"))
    init_home()
    return tmp_path / "genops" / "dagster"


def set_default_limit(dagster_home: Path, limit: int) -> None:
    cfg = dagster_home / "dagster.yaml"
    text = cfg.read_text()
    assert "default_limit: 1\n" in text
    cfg.write_text(text.replace("default_limit: 1\n", f"default_limit: {limit}\n"))


def _launch(dagster_home: str, log_dir: str, out: str) -> None:
    """One run of the training job in its own process, as the daemon or the CLI would start it."""
    with dg.DagsterInstance.from_config(dagster_home) as instance:
        result = training_job.execute_in_process(
            instance=instance, run_config=dg.RunConfig(ops={"train": TrainConfig(log_dir=log_dir)}),
            raise_on_error=False)
    Path(out).write_text(json.dumps({"run_id": result.run_id, "success": result.success}))


def two_concurrent_runs(dagster_home: Path, log_dir: Path) -> list[tuple[float, float]]:
    """Two runs of the training job in two processes (Python's logging is not safe for two
    in-process Dagster runs in threads of one process). The second is launched once the first
    is training, so its step asks for the pool while the first holds it: on SQLite storage,
    Dagster's slot claim reads a free slot and then takes it without checking again, so two
    claims within the same few milliseconds can both succeed (seen in about 1 of 15 runs when
    both started together)."""
    log_dir.mkdir()
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        instance.get_runs()  # create the storage once, before two processes race to create it
    ctx = multiprocessing.get_context("spawn")
    outs = [log_dir.parent / f"run{i}.json" for i in range(2)]
    procs = [ctx.Process(target=_launch, args=(str(dagster_home), str(log_dir), str(out))) for out in outs]
    procs[0].start()
    deadline = time.monotonic() + 120
    while not list(log_dir.glob("*.start")) and time.monotonic() < deadline and procs[0].is_alive():
        time.sleep(0.05)
    procs[1].start()
    for p in procs:
        p.join(timeout=120)
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    runs = [json.loads(out.read_text()) for out in outs]
    assert all(r["success"] for r in runs)
    return sorted((float((log_dir / f"{r['run_id']}.start").read_text()),
                   float((log_dir / f"{r['run_id']}.end").read_text())) for r in runs)


def test_init_home_limits_pools_to_one(dagster_home):
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        config = instance.event_log_storage.get_pool_config()
        assert config.default_pool_limit == 1 and config.pool_granularity.value == "op"
        assert instance.event_log_storage.supports_global_concurrency_limits


def test_two_runs_never_train_at_the_same_time(dagster_home, tmp_path):
    (first_start, first_end), (second_start, second_end) = two_concurrent_runs(dagster_home, tmp_path / "log")
    assert first_end <= second_start, "the second training started before the first one ended"
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        assert instance.event_log_storage.get_concurrency_info("training").slot_count == 1
        blocked = [r for r in instance.get_event_records(dg.EventRecordsFilter(event_type=dg.DagsterEventType.ENGINE_EVENT))
                   if "blocked by limit for pool training" in (r.event_log_entry.dagster_event.message or "")]
        assert blocked, "no step reported waiting for the training pool"


def test_with_the_limit_raised_trainings_overlap(dagster_home, tmp_path):
    set_default_limit(dagster_home, 2)
    (first_start, first_end), (second_start, second_end) = two_concurrent_runs(dagster_home, tmp_path / "log")
    assert second_start < first_end, "with two slots the trainings should have run side by side"


def _hold(lock: str, log: str, name: str, start_at: float) -> None:
    from genops_assets.lib.locks import exclusive

    waited = []
    while time.time() < start_at:
        time.sleep(0.001)
    with exclusive(Path(lock), on_wait=waited.append):
        begin = time.time()
        time.sleep(0.5)
        end = time.time()
    Path(log, name).write_text(json.dumps({"begin": begin, "end": end, "waited": bool(waited)}))


def test_the_training_lock_keeps_two_processes_apart(tmp_path):
    """The tuning step's own lock, beside the pool: two processes that ask for it in the same
    millisecond hold it one after the other, and the second says it waited."""
    ctx = multiprocessing.get_context("spawn")
    start_at = time.time() + 5
    procs = [ctx.Process(target=_hold, args=(str(tmp_path / "training.lock"), str(tmp_path), f"p{i}.json", start_at))
             for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    first, second = sorted((json.loads((tmp_path / f"p{i}.json").read_text()) for i in range(2)),
                           key=lambda r: r["begin"])
    assert first["end"] <= second["begin"] and second["waited"] and not first["waited"]


def test_tuned_adapter_is_in_the_training_pool():
    from genops_assets.defs.tuning.assets import tuned_adapter

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

    own = "telemetry:\n  enabled: false\nconcurrency:\n  pools:\n    default_limit: 3\n"
    cfg.write_text(own)
    init_home()
    assert cfg.read_text() == own
