"""SFT training out of process through Dagster Pipes, on the tiny random Llama: the launched program
trains the same adapter as train_lora in process, streams its records and progress lines back,
resumes after a kill -9 of the training process, and reports bad inputs as such."""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import pytest
from resume_worker import DATA_DIGEST, examples, train_config
from test_resume import ATOL, losses, max_abs_diff

from genops_assets.lib.train_entry import (
    TrainRequest,
    TrainRequestError,
    config_dict,
    read_examples,
    write_examples,
)
from genops_assets.lib.training import COMPLETE_MARKER, SftExample, TrainingInputError, train_lora
from resources.trainer import (
    SubprocessTrainer,
    Trainer,
    TrainOutcome,
    launch_command,
    resolve_launcher,
)

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def write_request(model_dir: Path, root: Path, train: list[SftExample] | None = None, **config) -> dict:
    tr, val = examples()
    cfg = dataclasses.replace(train_config(), **config)
    return TrainRequest(
        base_dir=str(model_dir), train_file=str(write_examples(root / "examples" / "train.jsonl", tr if train is None
                                                               else train)),
        validation_file=str(write_examples(root / "examples" / "validation.jsonl", val)), config=config_dict(cfg),
        adapter_dir=str(root / "adapter"), work_dir=str(root / "work"), data_digest=DATA_DIGEST).to_dict()


def training_asset(request: dict) -> dg.AssetsDefinition:
    @dg.asset
    def trained(context, trainer: Trainer) -> dg.Output[dict]:
        records: list[dict] = []
        try:
            outcome = trainer.run(context, request, on_record=records.append)
        except TrainingInputError as exc:
            return dg.Output({"input_error": str(exc)})
        return dg.Output({"outcome": dataclasses.asdict(outcome), "records": records})

    return trained


def materialize(request: dict, trainer: Trainer, instance: dg.DagsterInstance):
    return dg.materialize([training_asset(request)], resources={"trainer": trainer}, instance=instance,
                          raise_on_error=False)


def log_lines(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    return [e.user_message for e in instance.all_logs(run_id) if e.user_message]


def train_through_pipes(request: dict, trainer: Trainer) -> tuple[TrainOutcome, list[str]]:
    """A successful training through ``trainer``: what it reported and the run's log lines."""
    with dg.DagsterInstance.ephemeral() as instance:
        result = materialize(request, trainer, instance)
        assert result.success
        lines = log_lines(instance, result.run_id)
    return TrainOutcome(**result.output_for_node("trained")["outcome"]), lines


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir):
    """train_lora in this process: what the Pipes path must reproduce."""
    root = tmp_path_factory.mktemp("in-process")
    tr, val = examples()
    result = train_lora(tiny_model_dir, tr, val, train_config(), root / "adapter", root / "work",
                        data_digest=DATA_DIGEST)
    assert result.steps == 8
    return root, result


# -- the request and the command line ----------------------------------------------------------------


def test_request_round_trips_examples_and_config(tmp_path):
    tr, _ = examples(n_train=3)
    tr[0] = SftExample("ünï", [{"role": "user", "content": "naïve\nline"}], '{"category": "bug"}')
    path = write_examples(tmp_path / "train.jsonl", tr)
    assert read_examples(path) == tr
    request = TrainRequest.from_dict(TrainRequest("b", "t", "v", config_dict(train_config()), "a", "w").to_dict())
    assert request.train_config() == train_config()  # tuple target_modules survive JSON as lists
    renamed = {k: v for k, v in request.to_dict().items() if k != "work_dir"} | {"work": "w"}
    with pytest.raises(TrainRequestError, match=r"missing \['work_dir'\], unknown \['work'\]"):
        TrainRequest.from_dict(renamed)
    with pytest.raises(TrainRequestError, match=r"unknown LoraTrainConfig fields \['ranks'\]"):
        TrainRequest("b", "t", "v", {"ranks": 2}, "a", "w").train_config()
    (tmp_path / "bad.jsonl").write_text('{"example_id": "x", "messages": []}\n')
    with pytest.raises(TrainingInputError, match=r"bad.jsonl, example 1: not an SFT example"):
        read_examples(tmp_path / "bad.jsonl")


def test_launch_command_plain_and_under_accelerate(tmp_path):
    assert launch_command("py", "m", None, 1, 1234) == ["py", "-m", "m"]
    with pytest.raises(ValueError, match="train_num_processes=2 needs a launcher config"):
        launch_command("py", "m", None, 2, 1234)
    cmd = launch_command("py", "m", "/cfg.yaml", 2, 1234)
    assert cmd[:3] == ["py", "-m", "accelerate.commands.launch"] and cmd[-2:] == ["-m", "m"]
    flags = dict(zip(cmd[3:-2:2], cmd[4:-2:2], strict=True))
    assert flags == {"--config_file": "/cfg.yaml", "--num_processes": "2", "--num_machines": "1",
                     "--machine_rank": "0", "--main_process_ip": "127.0.0.1", "--main_process_port": "1234"}
    shipped = resolve_launcher("ddp_cpu.yaml")
    assert shipped == REPO / "deploy" / "accelerate" / "ddp_cpu.yaml"
    assert resolve_launcher("deploy/accelerate/ddp_cpu.yaml") == shipped == resolve_launcher(str(shipped))
    with pytest.raises(ValueError, match=r"GENOPS_TRAIN_LAUNCHER='nope.yaml': no such accelerate config file"):
        resolve_launcher("nope.yaml")


def test_records_are_forwarded_as_they_arrive_and_a_failing_logger_loses_no_message():
    from resources.trainer import _Forwarding

    class Handler:
        def __init__(self):
            self.seen = []

        def handle_message(self, message):
            self.seen.append(message)

    def custom(payload):
        return {"method": "report_custom_message", "params": {"payload": payload}}

    logged = []

    def log(record):
        logged.append(record)
        if record["step"] == 2:
            raise OSError("tracking store down")

    handler = Handler()
    forwarding = _Forwarding(handler, log)
    messages = [custom({"kind": "record", "record": {"step": float(i)}}) for i in (1, 2, 3)]
    messages += [{"method": "log", "params": {"message": "x", "level": "info"}}, custom({"kind": "result"})]
    for message in messages:
        forwarding.handle_message(message)
    assert handler.seen == messages  # the Pipes handler got everything
    assert [r["step"] for r in logged] == [1.0, 2.0]  # no more records logged after the failure
    assert [str(e) for e in forwarding.errors] == ["tracking store down"]  # raised by Trainer.run
    assert forwarding.seen is handler.seen  # everything else is the handler's


def test_build_resources_selects_the_subprocess_trainer_and_checks_the_launcher(tmp_path, monkeypatch):
    from resources import build_resources
    from resources.settings import GenopsSettings

    trainer = build_resources(home=tmp_path, settings=GenopsSettings())["trainer"]
    assert isinstance(trainer, SubprocessTrainer) and trainer.launcher is None and trainer.num_processes == 1
    assert trainer.key_params() == {}  # one process: the version keys of earlier runs hold
    monkeypatch.setenv("GENOPS_TRAIN_LAUNCHER", "ddp_cpu.yaml")
    monkeypatch.setenv("GENOPS_TRAIN_NUM_PROCESSES", "2")
    trainer = build_resources(home=tmp_path, settings=GenopsSettings.from_env())["trainer"]
    assert trainer.command(port=5) == launch_command(trainer.python_executable(), "genops_assets.lib.train_entry",
                                                     str(resolve_launcher("ddp_cpu.yaml")), 2, 5)
    assert trainer.key_params() == {"num_processes": 2}  # per-process batches: another global batch
    monkeypatch.setenv("GENOPS_TRAIN_LAUNCHER", "missing.yaml")
    with pytest.raises(ValueError, match=r"missing\.yaml"):
        build_resources(home=tmp_path, settings=GenopsSettings.from_env())
    monkeypatch.delenv("GENOPS_TRAIN_LAUNCHER")
    with pytest.raises(ValueError, match="train_num_processes=2 needs a launcher config"):
        build_resources(home=tmp_path, settings=GenopsSettings.from_env())


# -- through Pipes ------------------------------------------------------------------------------------


@pytest.mark.server
def test_pipes_training_matches_in_process_and_streams_progress(tmp_path, tiny_model_dir, reference):
    ref_root, ref = reference
    with dg.DagsterInstance.ephemeral() as instance:
        result = materialize(write_request(tiny_model_dir, tmp_path), SubprocessTrainer(), instance)
        assert result.success
        lines = log_lines(instance, result.run_id)
    value = result.output_for_node("trained")
    outcome = TrainOutcome(**value["outcome"])
    assert outcome.steps == 8 and outcome.resumed_from_step is None and outcome.train_examples == 20
    assert Path(outcome.adapter_dir) == tmp_path / "adapter"
    assert losses(outcome.history) == pytest.approx(losses(ref.history), abs=1e-5)
    diff = max_abs_diff(tmp_path / "adapter", ref_root / "adapter")
    print(f"Pipes vs in-process: max abs adapter weight difference {diff:.3g}")
    assert diff <= ATOL
    # Every record reached on_record while training, in order: the asset's MLflow curve.
    assert value["records"] == outcome.history
    assert all(r["tokens_per_s"] > 0 for r in value["records"] if "loss" in r)
    progress = [line for line in lines if line.startswith("tuning: step")]
    assert progress[0].startswith("tuning: step 1/8, loss") and "tokens/s" in progress[0] and "ETA" in progress[0]
    assert any(line.startswith("tuning: step 8/8, loss") and "tokens/s" in line for line in progress), progress


@contextmanager
def until_stalled(request: dict, root: Path, after: int, instance: dg.DagsterInstance, **trainer):
    """Start the training through Pipes (its program stalls after step ``after``: see
    pipes_stall_entry) in a thread; yields (the pid of a stalled training process, a dict that
    holds the run's result under "result" once the block has ended the process)."""
    stall_file = root / "stalled.pid"
    stalling = SubprocessTrainer(entry_module="pipes_stall_entry", **trainer, env={
        "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO), os.environ.get("PYTHONPATH", "")]),
        "STALL_AFTER": str(after), "STALL_FILE": str(stall_file)})
    outcome: dict = {}
    run = threading.Thread(target=lambda: outcome.update(result=materialize(request, stalling, instance)))
    run.start()
    deadline = time.monotonic() + 300
    while not stall_file.exists():
        assert run.is_alive(), "the Pipes run ended before the training process stalled"
        assert time.monotonic() < deadline, f"the training process never got past step {after}"
        time.sleep(0.05)
    try:
        yield int(stall_file.read_text()), outcome
    finally:
        run.join(timeout=120)
    assert not run.is_alive()


@pytest.mark.server
def test_killed_training_process_resumes_through_pipes(tmp_path, tiny_model_dir, reference):
    ref_root, ref = reference
    request = write_request(tiny_model_dir, tmp_path)
    with dg.DagsterInstance.ephemeral() as instance, until_stalled(request, tmp_path, 4, instance) as (pid, outcome):
        os.kill(pid, signal.SIGKILL)
    first = outcome["result"]
    assert not first.success
    errors = [e.event_specific_data.error.to_string() for e in first.get_step_failure_events()]
    assert any("TrainingProcessError" in e and "code -9" in e for e in errors), errors
    assert (tmp_path / "work" / "checkpoints" / "checkpoint-4" / COMPLETE_MARKER).is_file()
    assert not (tmp_path / "adapter").exists()

    resumed, lines = train_through_pipes(request, SubprocessTrainer())
    assert resumed.resumed_from_step == 4 and resumed.steps == 8
    assert "resuming from checkpoint-4 (step 4/8)" in lines
    assert losses(resumed.history) == pytest.approx(losses(ref.history), abs=1e-5)
    diff = max_abs_diff(tmp_path / "adapter", ref_root / "adapter")
    print(f"killed at step 5 through Pipes and resumed: max abs adapter weight difference {diff:.3g}")
    assert diff <= ATOL


@pytest.mark.server
def test_bad_training_data_is_reported_as_an_input_error(tmp_path, tiny_model_dir):
    with dg.DagsterInstance.ephemeral() as instance:
        result = materialize(write_request(tiny_model_dir, tmp_path, train=[]), SubprocessTrainer(), instance)
    assert result.success  # the asset above turns the input error into its value
    assert "no training examples" in result.output_for_node("trained")["input_error"]


# -- on Kubernetes (no cluster here: the pod the client would submit is captured and validated) --------


class Submitted(RuntimeError):
    """Raised by the stand-in Kubernetes API once the training pod has been submitted."""


def test_k8s_trainer_submits_a_valid_gpu_training_pod(tmp_path, monkeypatch):
    import kubernetes
    import kubernetes_validate
    from dagster_k8s import PipesK8sClient, pipes

    from resources import build_resources
    from resources.settings import GenopsSettings
    from resources.trainer import K8S_MASTER_PORT, K8sTrainer

    monkeypatch.setenv("GENOPS_TRAINER", "k8s")
    with pytest.raises(ValueError, match="GENOPS_TRAINER=k8s needs GENOPS_K8S_TRAIN_IMAGE"):
        build_resources(home=tmp_path, settings=GenopsSettings.from_env())
    monkeypatch.setenv("GENOPS_K8S_TRAIN_IMAGE", "registry.example/genops-user-code:1")
    monkeypatch.setenv("GENOPS_TRAIN_LAUNCHER", "zero2.yaml")
    monkeypatch.setenv("GENOPS_TRAIN_NUM_PROCESSES", "2")
    monkeypatch.setenv("GENOPS_K8S_TRAIN_GPUS", "2")
    monkeypatch.setenv("GENOPS_K8S_TRAIN_MEMORY", "64Gi")
    trainer = build_resources(home=tmp_path, settings=GenopsSettings.from_env())["trainer"]
    assert isinstance(trainer, K8sTrainer) and not trainer.trains_here

    submitted: list[tuple[str, object]] = []

    class CoreApi:
        def create_namespaced_pod(self, namespace, body):
            submitted.append((namespace, body))
            raise Submitted

    monkeypatch.setattr(PipesK8sClient, "_load_k8s_config", lambda self: None)
    monkeypatch.setattr(pipes.DagsterKubernetesClient, "production_client",
                        staticmethod(lambda *a, **k: type("Client", (), {"core_api": CoreApi()})()))
    request = TrainRequest("b", "t", "v", config_dict(train_config()), "a", "w").to_dict()
    with dg.DagsterInstance.ephemeral() as instance:
        result = materialize(request, trainer, instance)
    assert not result.success and len(submitted) == 1
    namespace, pod = submitted[0]
    assert namespace == "genops"
    manifest = {"apiVersion": "v1", "kind": "Pod",
                **kubernetes.client.ApiClient().sanitize_for_serialization(pod)}
    kubernetes_validate.validate(manifest, "1.33.0", strict=True)

    spec = manifest["spec"]
    (container,) = spec["containers"]
    assert container["image"] == "registry.example/genops-user-code:1" and spec["restartPolicy"] == "Never"
    assert container["command"] == launch_command("python", "genops_assets.lib.train_entry",
                                                  "/app/deploy/accelerate/zero2.yaml", 2, K8S_MASTER_PORT)
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "2", "memory": "64Gi"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["GENOPS_HOME"] == str(tmp_path) and "DAGSTER_PIPES_CONTEXT" in env and "DAGSTER_PIPES_MESSAGES" in env
    # The data directory is the same claim at the same path, so the request's paths hold in the pod.
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in spec["volumes"]}
    assert mounts["genops-home"] == str(tmp_path) and claims["genops-home"] == "genops-home"
    assert manifest["metadata"]["labels"]["app.kubernetes.io/name"] == "genops-training"
