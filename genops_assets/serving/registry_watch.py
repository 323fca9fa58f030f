"""Follow an MLflow registry alias from inside the server: when `champion` moves (a promotion,
or a rollback that moves it back), fetch that version's adapter, check its digest, and
hot-swap it in place. In-flight requests finish on the adapter they started with."""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("genops.serving")

DIGEST_TAG = "genops.adapter_digest"
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
    """The version's adapter folder in ``cache_dir`` (downloaded once, digest-checked)."""
    import mlflow.artifacts

    from genops_assets.lib.hashing import atomic_dir, file_digests, sha256_json

    mv = client.get_model_version(model_name, version)
    target = cache_dir / model_name / f"v{version}"
    if not target.is_dir():
        with atomic_dir(target) as tmp:
            src = Path(mlflow.artifacts.download_artifacts(artifact_uri=adapter_uri(client, mv),
                                                           dst_path=str(tmp / "dl"), tracking_uri=tracking_uri))
            for item in src.iterdir():
                shutil.move(str(item), tmp / item.name)
            shutil.rmtree(tmp / "dl", ignore_errors=True)
    expected = (mv.tags or {}).get(DIGEST_TAG)
    actual = sha256_json(file_digests(target))
    if expected and actual != expected:
        raise RuntimeError(f"{model_name} v{version}: adapter digest {actual[:12]} != registered {expected[:12]}")
    return target


def version_loader(tracking_uri: str, model_name: str, cache_dir: Path,
                   swap: Callable[[str, str, str], None]) -> Callable[[str], None]:
    """Load registry version ``vN`` of ``model_name`` under the name ``vN`` (one load at a time)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    lock = threading.Lock()

    def load(name: str) -> None:
        with lock:
            version = name[1:]
            folder = fetch_adapter(client, tracking_uri, model_name, version, Path(cache_dir))
            swap(name, str(folder), version)

    return load


class AliasWatcher:
    """Polls ``alias`` of ``model_name`` every ``interval_s``; calls ``swap(name, folder, version)``
    when it points at a version other than the one served."""

    def __init__(self, tracking_uri: str, model_name: str, alias: str, served_name: str, cache_dir: Path,
                 swap: Callable[[str, str, str], None], current: Callable[[], str | None],
                 interval_s: float = 5.0):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self.tracking_uri, self.model_name, self.alias = tracking_uri, model_name, alias
        self.served_name, self.cache_dir = served_name, Path(cache_dir)
        self.swap, self.current, self.interval_s = swap, current, interval_s
        self.errors = 0
        self.swaps = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="alias-watcher", daemon=True)

    def check_once(self) -> bool:
        """One poll; True when it swapped."""
        from mlflow.exceptions import MlflowException

        try:
            mv = self.client.get_model_version_by_alias(self.model_name, self.alias)
        except MlflowException:
            return False  # alias not set (yet): keep serving what is loaded
        version = str(mv.version)
        if version == self.current():
            return False
        folder = fetch_adapter(self.client, self.tracking_uri, self.model_name, version, self.cache_dir)
        self.swap(self.served_name, str(folder), version)
        self.swaps += 1
        log.warning("alias %s of %s moved: serving v%s as %s", self.alias, self.model_name, version,
                    self.served_name)
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check_once()
            except Exception as exc:
                self.errors += 1
                log.error("alias watch of %s@%s failed: %s", self.model_name, self.alias, exc)

    def start(self) -> AliasWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval_s + 5)
