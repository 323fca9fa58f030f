"""The `trainer` resource: the SFT training step run out of the Dagster run process, through
Dagster Pipes.

``SubprocessTrainer`` launches ``python -m genops_assets.lib.train_entry`` on this machine
(``PipesSubprocessClient``); ``K8sTrainer`` runs the same program in a pod of its own
(``PipesK8sClient``: image, namespace, GPUs and tolerations from the settings, the genops data
volume mounted where the code location sees it, so every path in the request is valid there).
With a launcher config (an ``accelerate`` config file, deploy/accelerate/) the program runs under
``accelerate launch`` with ``num_processes`` processes; the launcher sets the distributed
environment (rank, world size, MASTER_ADDR / MASTER_PORT).

What comes back (see genops_assets/lib/train_entry.py): progress lines in the step's log as they
happen, each training log record to ``on_record`` as it arrives (the tuning asset logs them to
MLflow), and the result as a :class:`TrainOutcome`. Nothing here imports torch.
"""

from __future__ import annotations

import socket
import sys
from abc import abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from genops_assets.lib.train_entry import INPUT_ERROR, RECORD, REQUEST_KEY, RESULT
from genops_assets.lib.training import TrainingInputError, TrainResult
from resources.settings import REPO_ROOT

ENTRY_MODULE = "genops_assets.lib.train_entry"
LAUNCHER_DIR = REPO_ROOT / "deploy" / "accelerate"
K8S_MASTER_PORT = 29500  # inside the pod: its own network namespace, no other user of the port
GPU_RESOURCE = "nvidia.com/gpu"
# GKE (and the NVIDIA device plugin's usual setup) taints GPU nodes so that only pods asking for
# GPUs land there; the training pod tolerates that taint.
GPU_TOLERATIONS = ({"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"},)
RecordFn = Callable[[dict[str, float]], None]


class TrainingProcessError(RuntimeError):
    """The launched training program failed (a crash, a kill, a pod that did not finish)."""


class TrainOutcome(TrainResult):
    """What a training reported: ``train_lora``'s ``TrainResult``, rebuilt on this side of Pipes."""


def resolve_launcher(value: str | None) -> Path | None:
    """The accelerate config file ``value`` names: absolute, relative to the repository, or a
    file name under deploy/accelerate/. A name that is none of these raises, naming it."""
    if not value:
        return None
    for candidate in (Path(value), REPO_ROOT / value, LAUNCHER_DIR / value):
        if candidate.is_file():
            return candidate.resolve()
    raise ValueError(f"GENOPS_TRAIN_LAUNCHER={value!r}: no such accelerate config file (absolute, relative to "
                     f"{REPO_ROOT}, or a name under {LAUNCHER_DIR})")


def launch_command(python: str, module: str, launcher: str | None, num_processes: int, port: int) -> list[str]:
    """The command line of the training program: plain ``python -m`` in one process, or
    ``accelerate launch`` with the launcher config, ``num_processes`` processes and the
    rendezvous address (this host, ``port``)."""
    if not launcher:
        if num_processes != 1:
            raise ValueError(f"train_num_processes={num_processes} needs a launcher config "
                             "(GENOPS_TRAIN_LAUNCHER, an accelerate config file under deploy/accelerate/)")
        return [python, "-m", module]
    return [python, "-m", "accelerate.commands.launch", "--config_file", launcher,
            "--num_processes", str(num_processes), "--num_machines", "1", "--machine_rank", "0",
            "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), "-m", module]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Forwarding:
    """A Pipes message handler seen through: every message goes to the real handler, and each
    training record also to ``on_record`` as it arrives (so MLflow shows the curve while the
    model trains). A failing ``on_record`` is kept and raised once the process has finished,
    never lets the reader thread die and lose messages."""

    def __init__(self, handler, on_record: RecordFn | None):
        self._handler = handler
        self._on_record = on_record
        self.errors: list[BaseException] = []

    def handle_message(self, message) -> None:
        self._handler.handle_message(message)
        if self._on_record is None or message.get("method") != "report_custom_message":
            return
        payload = (message.get("params") or {}).get("payload") or {}
        if payload.get("kind") == RECORD and not self.errors:
            try:
                self._on_record(payload["record"])
            except Exception as exc:  # re-raised by Trainer.run after the process ends
                self.errors.append(exc)

    def __getattr__(self, name: str):
        return getattr(self._handler, name)


def forwarding_reader(reader_cls: type, on_record: RecordFn | None, forwarder: dict[str, _Forwarding], **kwargs):
    """An instance of the Pipes message reader class ``reader_cls`` whose handler forwards
    training records to ``on_record`` (see :class:`_Forwarding`); the forwarder is put in
    ``forwarder["it"]`` when the session opens."""

    class Reader(reader_cls):
        @contextmanager
        def read_messages(self, handler) -> Iterator[Any]:
            forwarder["it"] = _Forwarding(handler, on_record)
            with super().read_messages(forwarder["it"]) as params:
                yield params

    return Reader(**kwargs)


def raise_input_error(messages: Sequence[Any]) -> None:
    """An input error the program reported, raised as :class:`TrainingInputError` (retrying
    cannot help)."""
    for message in messages:
        if isinstance(message, Mapping) and message.get("kind") == INPUT_ERROR:
            raise TrainingInputError(message["message"])


def outcome_from_messages(messages: Sequence[Any]) -> TrainOutcome:
    """The training's result from its custom messages (see :func:`raise_input_error`)."""
    raise_input_error(messages)
    results = [m["result"] for m in messages if isinstance(m, Mapping) and m.get("kind") == RESULT]
    if len(results) != 1:
        raise TrainingProcessError(f"the training program reported {len(results)} results, expected one")
    return TrainOutcome(**results[0])


class Trainer(dg.ConfigurableResource):
    """Runs one SFT training out of process and returns what it reported."""

    launcher: str | None = Field(None, description="accelerate config file; unset: one plain process")
    num_processes: int = Field(1, ge=1, description="Processes (ranks) under the launcher")
    entry_module: str = Field(ENTRY_MODULE, description="The program run with `python -m`")

    @property
    def trains_here(self) -> bool:
        """Whether the program runs on this machine (its device limits are this machine's)."""
        return True

    def key_params(self) -> dict[str, int]:
        """What of the launch changes the trained adapter, for the version key: the number of
        processes (the batch size is per process). One process adds nothing, so a run keeps the
        key (and the checkpoints) it had before training could be launched on several."""
        return {"num_processes": self.num_processes} if self.num_processes > 1 else {}

    def command(self, port: int) -> list[str]:
        return launch_command(self.python_executable(), self.entry_module, self.launcher_path(),
                              self.num_processes, port)

    def python_executable(self) -> str:
        return sys.executable

    def launcher_path(self) -> str | None:
        return self.launcher

    def run(self, context: dg.AssetExecutionContext, spec: dict, on_record: RecordFn | None = None) -> TrainOutcome:
        """Train what ``spec`` (a ``TrainRequest`` as a dict) asks for; ``on_record`` receives
        each training log record as it arrives."""
        forwarder: dict[str, _Forwarding] = {}
        try:
            messages = self._launch(context, {REQUEST_KEY: spec}, on_record, forwarder).get_custom_messages()
        except Exception as exc:  # a non-zero exit, a failed pod
            # What the program said before it failed tells an input error from a crash.
            handler = forwarder.get("it")
            try:
                raise_input_error(handler.get_custom_messages() if handler is not None else ())
            except TrainingInputError as input_error:
                raise input_error from exc
            raise TrainingProcessError(f"the training program failed: {exc}") from exc
        handler = forwarder.get("it")
        if handler is not None and handler.errors:
            raise handler.errors[0]
        return outcome_from_messages(messages)

    @abstractmethod
    def _launch(self, context, extras: dict, on_record: RecordFn | None, forwarder: dict[str, _Forwarding]):
        """Run the program (see :func:`forwarding_reader`); returns the completed Pipes invocation."""
        raise NotImplementedError


class SubprocessTrainer(Trainer):
    """The training program as a child process of the run (PipesSubprocessClient)."""

    cwd: str = Field(str(REPO_ROOT), description="Working directory of the program")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment of the program")

    def launcher_path(self) -> str | None:
        path = resolve_launcher(self.launcher)
        return None if path is None else str(path)

    def _launch(self, context, extras: dict, on_record: RecordFn | None, forwarder: dict[str, _Forwarding]):
        from dagster import PipesSubprocessClient, PipesTempFileMessageReader

        reader = forwarding_reader(PipesTempFileMessageReader, on_record, forwarder)
        client = PipesSubprocessClient(env=self.env, cwd=self.cwd, message_reader=reader)
        return client.run(context=context, command=self.command(free_port()), extras=extras)


class K8sTrainer(Trainer):
    """The training program in a pod of its own (PipesK8sClient), on a GPU node when ``gpus`` > 0."""

    namespace: str = Field("genops", description="Namespace of the training pod")
    image: str = Field(description="The user-code image (genops installed, the repository at `workdir`)")
    workdir: str = Field("/app", description="Where the image holds the repository (launcher configs)")
    gpus: int = Field(1, ge=0, description="GPUs the pod asks for (0: a CPU pod)")
    cpu: str | None = Field(None, description="CPU request of the pod, e.g. '8'")
    memory: str | None = Field(None, description="Memory request and limit of the pod, e.g. '64Gi'")
    home_path: str = Field(description="The genops data directory, mounted at the same path in the pod")
    home_claim: str = Field("genops-home", description="PersistentVolumeClaim of the data directory")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels the pod needs")
    service_account: str | None = Field(None, description="Service account of the pod (workload identity)")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment of the program")
    python: str = Field("python", description="Python of the image")

    @property
    def trains_here(self) -> bool:
        return False

    def python_executable(self) -> str:
        return self.python

    def launcher_path(self) -> str | None:
        path = resolve_launcher(self.launcher)  # checked here: the image carries the same file
        if path is None:
            return None
        try:
            return f"{self.workdir}/{path.relative_to(REPO_ROOT).as_posix()}"
        except ValueError:
            raise ValueError(f"GENOPS_TRAIN_LAUNCHER={self.launcher!r}: a Kubernetes training runs in the image, "
                             f"so the launcher config must be a file of the repository ({REPO_ROOT})") from None

    def pod_spec(self) -> dict[str, Any]:
        """The pod spec (snake_case, as PipesK8sClient takes it) of the training pod, without the
        Pipes environment and the command the client adds."""
        resources: dict[str, dict[str, str]] = {"requests": {}, "limits": {}}
        if self.gpus:
            resources["requests"][GPU_RESOURCE] = resources["limits"][GPU_RESOURCE] = str(self.gpus)
        if self.cpu:
            resources["requests"]["cpu"] = self.cpu
        if self.memory:
            resources["requests"]["memory"] = resources["limits"]["memory"] = self.memory
        env = {"GENOPS_HOME": self.home_path, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(K8S_MASTER_PORT), **self.env}
        spec: dict[str, Any] = {
            "restart_policy": "Never",
            "containers": [{
                "name": "train",
                "image": self.image,
                "working_dir": self.workdir,
                "env": [{"name": k, "value": v} for k, v in env.items()],
                "resources": {k: v for k, v in resources.items() if v},
                "volume_mounts": [{"name": "genops-home", "mount_path": self.home_path},
                                  # torch.distributed and the dataloader use shared memory; the
                                  # container default (64 MiB) is too small for several ranks.
                                  {"name": "dshm", "mount_path": "/dev/shm"}],
            }],
            "volumes": [{"name": "genops-home", "persistent_volume_claim": {"claim_name": self.home_claim}},
                        {"name": "dshm", "empty_dir": {"medium": "Memory"}}],
        }
        if self.gpus:
            spec["tolerations"] = [dict(t) for t in GPU_TOLERATIONS]
        if self.node_selector:
            spec["node_selector"] = dict(self.node_selector)
        if self.service_account:
            spec["service_account_name"] = self.service_account
        return spec

    def _launch(self, context, extras: dict, on_record: RecordFn | None, forwarder: dict[str, _Forwarding]):
        from dagster_k8s import PipesK8sClient
        from dagster_k8s.pipes import PipesK8sPodLogsMessageReader

        reader = forwarding_reader(PipesK8sPodLogsMessageReader, on_record, forwarder)
        return PipesK8sClient(message_reader=reader).run(
            context=context, extras=extras, command=self.command(K8S_MASTER_PORT), namespace=self.namespace,
            base_pod_spec=self.pod_spec(), base_pod_meta={"labels": {"app.kubernetes.io/name": "genops-training"}})
