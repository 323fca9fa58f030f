"""MLflow as a typed client: experiments, runs, dataset inputs, registry versions and aliases.

MLflow is imported inside methods so loading the Dagster definitions stays fast.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import dagster as dg

from genops_assets.lib.prompts import (
    DIGEST_TAG,
    PRODUCTION,
    PromptError,
    PromptRef,
    PromptTemplate,
    prompt_registry_name,
)
from genops_assets.serving.protocol import CHALLENGER, CHAMPION
from genops_assets.serving.registry_watch import ADAPTER_PATH_TAG, FILES_TAG, fetch_adapter
from genops_assets.serving.registry_watch import DIGEST_TAG as ADAPTER_DIGEST_TAG

VERSION_KEY_TAG = "genops.version_key"
PREVIOUS_CHAMPION_TAG = "genops.previous_champion"
ASSET_VALUE_TAG = "genops.asset_value"
MODEL_ID_TAG = "genops.model_id"


def registered_model_name(task_name: str) -> str:
    """The MLflow registered model that holds a task's adapters."""
    return f"genops-{task_name}"


def variant_model_name(task_name: str) -> str:
    """The MLflow registered model that holds every variant (merged, quantized, distilled) of a
    task's tuned models; each version's tags say which variant of which adapter version it is."""
    return f"genops-{task_name}-variants"


def integrity_tags(files: Mapping[str, str]) -> dict[str, str]:
    """The version tags that record an adapter's files: each file's sha256 and their digest."""
    from genops_assets.lib.integrity import files_digest

    return {FILES_TAG: json.dumps(dict(files), sort_keys=True), ADAPTER_DIGEST_TAG: files_digest(files)}


def prompt_tags(ref: PromptRef) -> dict[str, str]:
    """What a consumer records about the prompt it used."""
    return {"genops.prompt_name": ref.name, "genops.prompt_version": str(ref.version),
            "genops.prompt_digest": ref.digest}


class RollbackError(RuntimeError):
    """The champion cannot be moved back; the message says why."""


@dataclass(frozen=True)
class RollbackResult:
    model: str
    action: str  # "rolled_back" or "skipped"
    from_version: str | None
    to_version: str | None
    reason: str


@dataclass(frozen=True)
class ModelVersionRef:
    name: str
    version: str
    run_id: str | None
    source: str
    tags: dict[str, str]


@dataclass(frozen=True)
class VersionModel:
    """A version's MLflow model (a LoggedModel of its tuning run) before registration."""

    model_id: str
    run_id: str
    adapter_path: str  # the adapter folder inside the model's folder
    adapter_files: dict[str, str]  # sha256 of each adapter file, as logged (its manifest)

    @property
    def uri(self) -> str:
        return f"models:/{self.model_id}"


@contextmanager
def _created_elsewhere_ok() -> Iterator[None]:
    """Swallow only MLflow's "already exists": several steps (processes) create the same
    experiment or registered model at once, and every one of them may lose the race."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


_SCHEMA_READY: set[str] = set()


def _create_sqlite_schema_once(uri: str) -> None:
    """Create (or migrate) an embedded SQLite store under a file lock, once per process: MLflow
    creates its tables on first use without one, so parallel steps on a new store fail with
    "table ... already exists" or "duplicate column". A server or Postgres store needs nothing."""
    if uri in _SCHEMA_READY or not uri.startswith("sqlite:///"):
        return
    from filelock import FileLock
    from mlflow.tracking import MlflowClient

    db = Path(uri.removeprefix("sqlite:///").split("?", 1)[0])
    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{db}.schema.lock"):
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)  # creates the tracking tables
        client.search_experiments(max_results=1)
        client.search_registered_models(max_results=1)
    _SCHEMA_READY.add(uri)


def _ref(mv) -> ModelVersionRef:
    return ModelVersionRef(mv.name, str(mv.version), mv.run_id, mv.source, dict(mv.tags or {}))


class MlflowTracking(dg.ConfigurableResource):
    """MLflow tracking server / store and the artifact root new experiments use."""

    tracking_uri: str
    artifact_root: str

    def client(self):
        from mlflow.tracking import MlflowClient

        _create_sqlite_schema_once(self.tracking_uri)
        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    def experiment_id(self, name: str) -> str:
        client = self.client()
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        location = f"{self.artifact_root.rstrip('/')}/{name.replace('/', '_')}"
        # A URI (file://, s3://, mlflow-artifacts:/ of a tracking server that proxies artifacts)
        # stays as it is; a bare path becomes a file URI.
        if len(urlparse(location).scheme) < 2:
            location = Path(location).resolve().as_uri()
        with _created_elsewhere_ok():
            return client.create_experiment(name, artifact_location=location)
        # Another writer created it between the lookup and the create.
        return client.get_experiment_by_name(name).experiment_id

    def start_run(self, experiment: str, run_name: str, tags: Mapping[str, str]) -> str:
        run = self.client().create_run(self.experiment_id(experiment), run_name=run_name, tags=dict(tags))
        return run.info.run_id

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client().set_terminated(run_id, status=status)

    def _reopen(self, experiment: str, tags: Mapping[str, str], keys: Sequence[str]) -> str | None:
        """The oldest run of ``experiment`` whose tags ``keys`` hold the values in ``tags``, set
        RUNNING again with the other tags updated; None when there is none."""
        client = self.client()
        found = client.search_runs(
            [self.experiment_id(experiment)],
            filter_string=" and ".join(f"tags.`{k}` = '{tags[k]}'" for k in keys),
            max_results=1, order_by=["attributes.start_time ASC"])
        if not found:
            return None
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        for k, v in tags.items():
            client.set_tag(run_id, k, v)
        return run_id

    @contextmanager
    def run(self, experiment: str, run_name: str, tags: Mapping[str, str], *,
            reopen_matching: Sequence[str] = ()) -> Iterator[str]:
        """A tracked run that always ends: FINISHED when the block completes, FAILED when it
        raises (the exception goes on). Every asset that records to MLflow opens its run here.

        With ``reopen_matching`` (tag keys, each in ``tags``) the run of ``experiment`` that
        carries the same values for those tags is reopened instead of a new one started: a
        re-materialized partition updates its one run instead of adding one per materialization."""
        run_id = self._reopen(experiment, tags, reopen_matching) if reopen_matching else None
        if run_id is None:
            run_id = self.start_run(experiment, run_name, tags)
        try:
            yield run_id
        except BaseException:
            self.end_run(run_id, "FAILED")
            raise
        self.end_run(run_id, "FINISHED")

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        self.client().log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int | None = None, *,
                    model_id: str | None = None, model_prefix: str = "") -> None:
        """Log ``metrics`` to the run; with ``model_id`` those whose name starts with
        ``model_prefix`` are that LoggedModel's metrics too (MLflow's model view shows them)."""
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.client().log_batch(run_id, metrics=[
            Metric(k, float(v), ts, step or 0, model_id=model_id if k.startswith(model_prefix) else None)
            for k, v in metrics.items()])

    def log_artifacts(self, run_id: str, local_dir: str | Path, artifact_path: str | None = None) -> None:
        self.client().log_artifacts(run_id, str(local_dir), artifact_path)

    def log_artifact(self, run_id: str, local_file: str | Path, artifact_path: str | None = None) -> None:
        self.client().log_artifact(run_id, str(local_file), artifact_path)

    def artifact_uri(self, run_id: str, path: str = "") -> str:
        base = self.client().get_run(run_id).info.artifact_uri
        return f"{base}/{path}" if path else base

    def log_dataset(self, run_id: str, df, name: str, source: str, digest: str, context: str) -> None:
        """Record a dataset input (``mlflow.data`` + ``log_inputs``) with our own content digest."""
        import warnings

        import mlflow.data
        from mlflow.entities import DatasetInput, InputTag

        with warnings.catch_warnings():  # a local path matches two equivalent local source types
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            ds = mlflow.data.from_pandas(df, source=source, name=name, digest=digest[:36])
        entity = ds._to_mlflow_entity()
        self.client().log_inputs(
            run_id, datasets=[DatasetInput(entity, tags=[InputTag("mlflow.data.context", context)])]
        )

    @contextmanager
    def _fluent(self, run_id: str | None = None) -> Iterator[None]:
        """MLflow's fluent API (``log_model``, ``register_model``) pointed at this store, inside
        ``run_id`` when given, which stays RUNNING: its ``run`` block ends it."""
        import mlflow
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri

        with _use_tracking_uri(self.tracking_uri):
            if run_id is None:
                yield
                return
            with mlflow.start_run(run_id=run_id):
                yield
            self.client().update_run(run_id, status="RUNNING")

    # -- registry -------------------------------------------------------------------------

    def find_version(self, model_name: str, version_key: str) -> ModelVersionRef | None:
        from mlflow.exceptions import MlflowException

        try:
            found = self.client().search_model_versions(
                f"name = '{model_name}' and tags.`{VERSION_KEY_TAG}` = '{version_key}'"
            )
        except MlflowException as exc:
            if "RESOURCE_DOES_NOT_EXIST" in str(exc.error_code):
                return None
            raise
        return _ref(found[0]) if found else None

    def _registered_model(self, model_name: str, description: str = "LoRA adapters tuned by genops") -> None:
        from mlflow.exceptions import MlflowException

        client = self.client()
        try:
            client.get_registered_model(model_name)
        except MlflowException:
            with _created_elsewhere_ok():  # by a writer running at the same time
                client.create_registered_model(model_name, description=description)

    def register(self, model_name: str, source: str, run_id: str, tags: Mapping[str, str],
                 description: str = "") -> ModelVersionRef:
        """A version whose source is ``source`` as it is (a bare adapter folder)."""
        client = self.client()
        self._registered_model(model_name)
        mv = client.create_model_version(
            model_name, source=source, run_id=run_id, tags=dict(tags), description=description
        )
        return _ref(mv)

    def get_version(self, model_name: str, version: str) -> ModelVersionRef:
        return _ref(self.client().get_model_version(model_name, version))

    def alias(self, model_name: str, alias: str) -> ModelVersionRef | None:
        from mlflow.exceptions import MlflowException

        try:
            return _ref(self.client().get_model_version_by_alias(model_name, alias))
        except MlflowException:
            return None

    def set_alias(self, model_name: str, alias: str, version: str) -> None:
        self.client().set_registered_model_alias(model_name, alias, version)

    def set_version_tags(self, model_name: str, version: str, tags: Mapping[str, Any]) -> None:
        client = self.client()
        for k, v in tags.items():
            client.set_model_version_tag(model_name, version, k, str(v))

    def registered_value(self, model_name: str, version_key: str) -> tuple[ModelVersionRef, dict] | None:
        """The version registered under ``version_key`` and the asset value recorded with it, now
        alias ``challenger`` again; None when nothing was registered under that key."""
        existing = self.find_version(model_name, version_key)
        if existing is None:
            return None
        if ASSET_VALUE_TAG not in existing.tags:
            raise RuntimeError(f"{model_name} v{existing.version} has version key {version_key} but no "
                               f"{ASSET_VALUE_TAG} tag: it was registered outside genops or its registration "
                               "was interrupted; delete that version to train again")
        self.set_alias(model_name, CHALLENGER, existing.version)
        return existing, json.loads(existing.tags[ASSET_VALUE_TAG])

    def log_version_model(self, run_id: str, adapter_dir: str | Path, prompt_ref: PromptRef, base_model: Mapping,
                          tags: Mapping[str, str]) -> VersionModel:
        """Log ``adapter_dir`` with the prompt version as the run's MLflow model: a pyfunc that
        loads the base model (recorded by path and folder digest, not copied) and applies both
        (``genops_assets.serving.mlflow_model``). The adapter's sha256 manifest is checked (or
        written) first and logged with it."""
        from genops_assets.lib.integrity import record_folder
        from genops_assets.serving.mlflow_model import adapter_subpath, log_version_model

        files = record_folder(adapter_dir)
        with self._fluent(run_id):
            info = log_version_model(adapter_dir, prompt_ref.served(), base_model["path"],
                                     base_model["folder_digest"], tags)
        return VersionModel(info.model_id, run_id, adapter_subpath(info), files)

    def register_adapter(self, model_name: str, model: VersionModel, version_key: str, tags: Mapping[str, str],
                         value: Mapping[str, Any], description: str) -> ModelVersionRef:
        """Register the run's MLflow model as a new version under ``version_key``, record the
        asset value (with its version) on it for a re-run with the same key, and point alias
        ``challenger`` at it. The version's adapter files stay where ``fetch_registered_adapter``
        finds them (version tag ``genops.adapter_path``), with the sha256 of each recorded on the
        version (``genops.adapter_files``; ``genops.adapter_digest`` is their digest)."""
        import mlflow

        self._registered_model(model_name)
        with self._fluent():
            mv = _ref(mlflow.register_model(model.uri, model_name, tags={
                **tags, VERSION_KEY_TAG: version_key, ADAPTER_PATH_TAG: model.adapter_path,
                MODEL_ID_TAG: model.model_id, **integrity_tags(model.adapter_files)}))
        self.client().update_model_version(model_name, mv.version, description)
        self.set_version_tags(model_name, mv.version, {ASSET_VALUE_TAG: json.dumps({**value, "version": mv.version})})
        self.set_alias(model_name, CHALLENGER, mv.version)
        return mv

    def promote(self, model_name: str, version: str, tags: Mapping[str, Any]) -> ModelVersionRef | None:
        """Move alias ``champion`` to ``version``, recording the previous champion on it (for
        rollback) with ``tags``; returns the previous champion. Nothing moves when ``version``
        already is the champion."""
        previous = self.alias(model_name, CHAMPION)
        if previous is not None and previous.version == str(version):
            return previous
        self.set_version_tags(model_name, str(version), {
            PREVIOUS_CHAMPION_TAG: previous.version if previous else "",
            "genops.promoted_at": datetime.now(UTC).isoformat(), **tags})
        self.set_alias(model_name, CHAMPION, str(version))
        return previous

    def fetch_registered_adapter(self, cache_dir: Path, model_name: str, version: str) -> Path:
        """A local copy of a registered adapter in ``cache_dir``, each file checked against the
        sha256 recorded at registration."""
        return fetch_adapter(self.client(), self.tracking_uri, model_name, str(version), cache_dir)

    def register_variant(self, task: str, files, run_id: str, source_version: str | None, version_key: str,
                         extra_tags: Mapping[str, Any] | None = None) -> ModelVersionRef:
        """Register the variant folder ``files`` (a ``lib.variants.VariantFiles``) of the adapter
        version ``source_version`` of ``genops-<task>`` as a version of ``genops-<task>-variants``:
        its files are logged to ``run_id`` (under ``variants/<name>``) with the sha256 of each on
        the version, and tags name the variant, its format, engine, parent variant and source.
        The version already registered under ``version_key`` is returned as it is: same inputs,
        no second registration."""
        from genops_assets.lib.integrity import record_folder

        model_name = variant_model_name(task)
        existing = self.find_version(model_name, version_key)
        if existing is not None:
            return existing
        files_sha = record_folder(files.path)  # the folder's manifest, checked
        artifact_path = f"variants/{files.name}"
        self.log_artifacts(run_id, files.path, artifact_path)
        tags = {**{k: str(v) for k, v in (extra_tags or {}).items()},
                "genops.variant": files.name, "genops.format": files.format, "genops.engine": files.engine,
                "genops.parent_variant": files.parent or "", "genops.source_model": registered_model_name(task),
                "genops.source_version": "" if source_version is None else str(source_version),
                "genops.variant_digest": files.digest, "genops.size_bytes": str(files.size_bytes),
                VERSION_KEY_TAG: version_key, **integrity_tags(files_sha)}
        self._registered_model(model_name, f"Merged, quantized and distilled variants of "
                                           f"{registered_model_name(task)}")
        parent = f" from {files.parent}" if files.parent else ""
        return self.register(model_name, self.artifact_uri(run_id, artifact_path), run_id, tags,
                             description=f"{files.name} ({files.format}, {files.engine}){parent} of "
                                         f"{registered_model_name(task)} v{source_version}")

    def fetch_variant(self, cache_dir: Path, task: str, version: str) -> Path:
        """A local copy of a registered variant's folder in ``cache_dir``, each file checked
        against the sha256 recorded at registration (a changed file is refused)."""
        return fetch_adapter(self.client(), self.tracking_uri, variant_model_name(task), str(version), cache_dir)

    def rollback_champion(self, model_name: str, *, to_version: str | None = None,
                          only_if_champion: str | None = None, reason: str = "manual") -> RollbackResult:
        """Move alias ``champion`` back to ``to_version``, or to the previous champion recorded at
        promotion (version tag ``genops.previous_champion``). With ``only_if_champion`` nothing moves
        unless that version is still the champion (a regression seen on a version that was already
        replaced must not roll the newer one back). The demoted version gets ``genops.rolled_back_*``
        tags. A server following the registry hot-swaps to the new champion."""
        from mlflow.exceptions import MlflowException

        current = self.alias(model_name, CHAMPION)
        if current is None:
            raise RollbackError(f"{model_name} has no champion")
        if only_if_champion is not None and current.version != str(only_if_champion):
            return RollbackResult(model_name, "skipped", current.version, None,
                                  f"champion is v{current.version}, not v{only_if_champion}: nothing to roll back")
        target = str(to_version or current.tags.get(PREVIOUS_CHAMPION_TAG) or "")
        if not target:
            raise RollbackError(f"{model_name} v{current.version} records no previous champion; name a version")
        if target == current.version:
            return RollbackResult(model_name, "skipped", current.version, target,
                                  f"v{target} is already the champion")
        try:
            self.get_version(model_name, target)
        except MlflowException as exc:
            raise RollbackError(f"{model_name} has no version {target!r}: {exc.message}") from exc
        self.set_alias(model_name, CHAMPION, target)
        self.set_version_tags(model_name, current.version, {
            "genops.rolled_back_at": datetime.now(UTC).isoformat(),
            "genops.rolled_back_to": target,
            "genops.rolled_back_reason": reason,
        })
        return RollbackResult(model_name, "rolled_back", current.version, target, reason)

    def download(self, artifact_uri: str, dst: str | Path) -> Path:
        import mlflow.artifacts

        Path(dst).mkdir(parents=True, exist_ok=True)
        return Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=artifact_uri, dst_path=str(dst), tracking_uri=self.tracking_uri
            )
        )

    # -- prompt registry --------------------------------------------------------------------

    def _prompt_ref(self, pv, input_field: str):
        chat = pv.template if isinstance(pv.template, list) else [{"role": "user", "content": pv.template}]
        template = PromptTemplate.from_registry(chat, pv.model_config, input_field)
        return PromptRef(pv.name, int(pv.version), template, tuple(pv.aliases or ()), pv.commit_message or "",
                         dict(pv.tags or {}))

    def prompt_versions(self, name: str, input_field: str) -> list:
        """Every registered version of a prompt, oldest first; empty when the prompt does not exist."""
        client = self.client()
        if client.get_prompt(name) is None:
            return []
        found, token = [], None
        while True:
            page = client.search_prompt_versions(name, max_results=100, page_token=token)
            found.extend(page)
            token = getattr(page, "token", None)
            if not token:
                break
        # Listing may omit aliases; read each version whole.
        return sorted((self._prompt_ref(client.get_prompt_version(name, pv.version), input_field) for pv in found),
                      key=lambda r: r.version)

    def register_prompt(self, name: str, template, commit_message: str, tags: Mapping[str, str] | None = None):
        """Register ``template`` unless a version with the same digest exists: returns (ref, created)."""
        template.validate(name)
        for ref in self.prompt_versions(name, template.input_field):
            if ref.tags.get(DIGEST_TAG) == template.digest:
                return ref, False
        chat, model_config = template.to_registry()
        pv = self.client().register_prompt(
            name, chat, commit_message=commit_message,
            tags={**dict(tags or {}), DIGEST_TAG: template.digest, "genops.input_field": template.input_field},
            model_config=model_config,
        )
        return self._prompt_ref(self.client().get_prompt_version(name, pv.version), template.input_field), True

    def prompt_version(self, name: str, version: int | str, input_field: str):
        from mlflow.exceptions import MlflowException

        try:
            pv = self.client().get_prompt_version(name, int(version))
        except (MlflowException, ValueError) as exc:
            known = [r.version for r in self.prompt_versions(name, input_field)]
            raise PromptError(f"prompt '{name}' has no version {version!r} (registered: {known or 'none'})") from exc
        return self._prompt_ref(pv, input_field)

    def prompt_alias(self, name: str, alias: str, input_field: str):
        """The version an alias points at, or None when the prompt or the alias does not exist."""
        from mlflow.exceptions import MlflowException

        client = self.client()
        if client.get_prompt(name) is None:
            return None
        try:
            pv = client.get_prompt_version_by_alias(name, alias)
        except MlflowException:
            return None
        return self._prompt_ref(client.get_prompt_version(name, pv.version), input_field)

    def resolve_prompt(self, spec, alias: str = PRODUCTION) -> PromptRef:
        """The registered prompt version of a task behind ``alias`` (a clear error when it is missing)."""
        return self.require_prompt_alias(prompt_registry_name(spec.name), alias, spec.input_field)

    def require_prompt_alias(self, name: str, alias: str, input_field: str):
        ref = self.prompt_alias(name, alias, input_field)
        if ref is None:
            raise PromptError(f"prompt '{name}' has no alias '{alias}' (materialize prompt_templates first, "
                              f"or set it: genops prompt alias --task ... {alias} VERSION)")
        return ref

    def set_prompt_alias(self, name: str, alias: str, version: int) -> None:
        self.prompt_version(name, version, "")  # clear error for a version that does not exist
        self.client().set_prompt_alias(name, alias, int(version))

    def delete_prompt_alias(self, name: str, alias: str) -> None:
        self.client().delete_prompt_alias(name, alias)

    def set_prompt_tags(self, name: str, version: int, tags: Mapping[str, Any]) -> None:
        client = self.client()
        for k, v in tags.items():
            client.set_prompt_version_tag(name, int(version), k, str(v))

    def link_prompt(self, run_id: str, ref) -> None:
        """Record on a run that it used this prompt version: MLflow's linked-prompts run tag, which
        its UI shows. Written through this client (MLflow's own helper goes to the global store)."""
        from mlflow.tracing.constant import TraceTagKey
        from mlflow.tracing.utils.prompt import update_linked_prompts_tag

        client = self.client()
        pv = client.get_prompt_version(ref.name, ref.version)
        current = client.get_run(run_id).data.tags.get(TraceTagKey.LINKED_PROMPTS)
        updated = update_linked_prompts_tag(current, [pv])
        if updated != current:
            client.set_tag(run_id, TraceTagKey.LINKED_PROMPTS, updated)
