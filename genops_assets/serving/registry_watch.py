"""Follow MLflow registry aliases from inside the server, for every task: when the `champion`
alias of a task's registered model (``genops-<task>``) moves (a promotion, or a rollback that
moves it back), fetch that version's adapter, check its digest, and hot-swap it in place for
that task. In-flight requests finish on the adapter they started with; other tasks are not
touched."""

from __future__ import annotations

import json
import logging
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

from genops_assets.lib.hashing import sha256_file

log = logging.getLogger("genops.serving")

DIGEST_TAG = "genops.adapter_digest"
FILES_TAG = "genops.adapter_files"
"""Version tag: the sha256 of each adapter file (JSON), recorded at registration."""
ADAPTER_PATH_TAG = "genops.adapter_path"
"""Version tag: where the adapter files lie inside the version's MLflow model folder."""


def adapter_uri(client, mv) -> str:
    """Where a version's adapter files are: a folder inside its MLflow model (version tag
    ``genops.adapter_path``), or, for a version registered as a bare adapter folder, its source."""
    subpath = (mv.tags or {}).get(ADAPTER_PATH_TAG)
    if not subpath:
        return mv.source
    return f"{client.get_model_version_download_uri(mv.name, mv.version).rstrip('/')}/{subpath}"


def fetch_adapter(client, tracking_uri: str, model_name: str, version: str, cache_dir: Path) -> Path:
    """The version's adapter folder in ``cache_dir`` (downloaded once), its files checked against
    the per-file sha256 recorded at registration (``IntegrityError`` naming a changed file)."""
    import mlflow.artifacts

    from genops_assets.lib.hashing import atomic_dir

    mv = client.get_model_version(model_name, version)
    target = cache_dir / model_name / f"v{version}"
    if not target.is_dir():
        with atomic_dir(target) as tmp:
            src = Path(mlflow.artifacts.download_artifacts(artifact_uri=adapter_uri(client, mv),
                                                           dst_path=str(tmp / "dl"), tracking_uri=tracking_uri))
            for item in src.iterdir():
                shutil.move(str(item), tmp / item.name)
            shutil.rmtree(tmp / "dl", ignore_errors=True)
    verify_registered(target, mv.tags or {}, f"{model_name} v{version}")
    return target


def verify_registered(folder: Path, tags: dict[str, str], what: str) -> None:
    """Check ``folder`` against the digests registered with it: the per-file ``genops.adapter_files``
    tag, else (a version registered before per-file digests) the ``genops.adapter_digest`` of its
    files, after which its manifest is written so that loading can check it."""
    from genops_assets.lib.integrity import (
        MANIFEST,
        IntegrityError,
        files_digest,
        folder_files,
        refuse_pickles,
        verify_folder,
        write_manifest,
    )

    if FILES_TAG in tags:
        try:
            expected = json.loads(tags[FILES_TAG])
        except ValueError as exc:
            raise IntegrityError(f"{what}: tag {FILES_TAG} is not JSON: {exc}") from exc
        try:
            verify_folder(folder, expected)
        except IntegrityError as exc:
            raise IntegrityError(f"{what}: {exc}") from None
        return
    if DIGEST_TAG not in tags:
        raise IntegrityError(f"{what}: registered without {FILES_TAG} or {DIGEST_TAG}, so its files cannot be "
                             "checked; refusing to load it")
    refuse_pickles(folder)
    files = folder_files(folder)
    # A folder registered whole may hold its manifest among the files its digest covered.
    manifest = folder / MANIFEST
    candidates = {files_digest(files)}
    if manifest.is_file():
        candidates.add(files_digest({**files, MANIFEST: sha256_file(manifest)}))
    if tags[DIGEST_TAG] not in candidates:
        raise IntegrityError(f"{what}: adapter files in {folder} do not match the registered digest: sha256 "
                             f"{sorted(candidates)[0]}, registered {tags[DIGEST_TAG]}; refusing to load it")
    if not manifest.is_file():
        write_manifest(folder)


def version_loader(tracking_uri: str, model_prefix: str, cache_dir: Path,
                   swap: Callable[[str, str, str], None]) -> Callable[[str, str], None]:
    """Load registry version N of ``<model_prefix><task>`` as ``<task>:vN`` (one load at a time)."""
    from mlflow.tracking import MlflowClient

    from genops_assets.serving.protocol import ModelName

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    lock = threading.Lock()

    def load(task: str, version: str) -> None:
        name = ModelName.of(task, f"v{version}").served
        with lock:
            folder = fetch_adapter(client, tracking_uri, model_prefix + task, version, Path(cache_dir))
            swap(name, str(folder), version)

    return load


class RegistryWatcher:
    """Polls every registered model named ``<model_prefix><task>`` every ``interval_s`` and
    follows each of ``aliases`` (``champion`` -> served as ``<task>``, ``challenger`` -> as
    ``<task>:challenger``): when an alias points at a version other than the one served, that
    version is fetched, digest-checked and hot-swapped for that task alone. A task that
    ``skip(task)`` names (its folder was removed) is left as it is; one task's failure (a
    broken artifact) is logged and counted and never stops the others. ``current(name)`` is the
    adapter version ``name`` stands for: for a llama.cpp variant, the adapter it was made from."""

    def __init__(self, tracking_uri: str, model_prefix: str, cache_dir: Path,
                 swap: Callable[[str, str, str], None], current: Callable[[str], str | None],
                 aliases: tuple[str, ...] = ("champion",), interval_s: float = 5.0,
                 skip: Callable[[str], bool] = lambda task: False):
        from mlflow.tracking import MlflowClient

        from genops_assets.serving.protocol import ROLES

        unknown = [a for a in aliases if a not in ROLES]
        if unknown:
            raise ValueError(f"cannot follow alias(es) {unknown}: a task serves {list(ROLES)}")
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self.tracking_uri, self.model_prefix, self.aliases = tracking_uri, model_prefix, tuple(aliases)
        self.cache_dir, self.swap, self.current, self.skip = Path(cache_dir), swap, current, skip
        self.interval_s = interval_s
        self.errors: dict[str, int] = {}
        self.swaps = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="registry-watcher", daemon=True)

    def targets(self) -> dict[str, str]:
        """Served model name -> the version its alias points at, over every watched model."""
        from genops_assets.serving.protocol import TASK_NAME, ModelName

        wanted = {}
        prefix = self.model_prefix
        for rm in self._registered_models():
            task = rm.name[len(prefix):]
            if not rm.name.startswith(prefix) or not TASK_NAME.fullmatch(task) or self.skip(task):
                continue
            for alias in self.aliases:
                version = (rm.aliases or {}).get(alias)
                if version is not None:
                    wanted[ModelName.of(task, alias).served] = str(version)
        return wanted

    def _registered_models(self) -> list:
        models, token = [], None
        while True:
            page = self.client.search_registered_models(filter_string=f"name LIKE '{self.model_prefix}%'",
                                                        max_results=100, page_token=token)
            models.extend(page)
            token = page.token
            if not token:
                return models

    def check_once(self) -> int:
        """One poll; the number of models swapped."""
        from genops_assets.serving.protocol import ModelName

        swapped = 0
        for name, version in sorted(self.targets().items()):
            if version == self.current(name):
                continue
            task = ModelName.parse(name).task
            try:
                folder = fetch_adapter(self.client, self.tracking_uri, self.model_prefix + task, version,
                                       self.cache_dir)
                self.swap(name, str(folder), version)
            except Exception as exc:
                self.errors[name] = self.errors.get(name, 0) + 1
                log.error("registry watch: cannot serve %s v%s: %s", name, version, exc)
                continue
            swapped += 1
            self.swaps += 1
            log.warning("registry alias moved: serving %s%s v%s as %s", self.model_prefix, task, version, name)
        return swapped

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check_once()
            except Exception as exc:  # the registry is unreachable: try again next poll
                self.errors["registry"] = self.errors.get("registry", 0) + 1
                log.error("registry watch of %s* failed: %s", self.model_prefix, exc)

    def start(self) -> RegistryWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval_s + 5)
