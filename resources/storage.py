"""The object store of what genops publishes: dataset exports, adapters and reports.

``LocalStorage`` keeps objects under a folder of the home (``file://`` URIs); ``GcsStorage``
keeps them in a GCS bucket through dagster-gcp's ``GCSResource`` (``gs://`` URIs; credentials
from workload identity or application default credentials, never from config).

Digests travel with every object and are checked on the way back:
- a folder goes up with its ``genops-manifest.json`` (the sha256 of each file, as adapters
  carry it), uploaded after the files, so a folder whose upload stopped half-way has no
  manifest and is refused; a download lands in a temp folder, is checked file by file against
  the manifest (and, when the caller passes one, against the digest it recorded when it
  uploaded, since the manifest sits beside the files it vouches for) and only then renamed
  into place;
- a single object (``put_bytes``) goes up with a ``<key>.sha256`` object beside it.

google-cloud-storage is imported only by ``GcsStorage``'s methods, so loading the definitions
under the local profile does not pay for it.
"""

from __future__ import annotations

import json
import shutil
from abc import abstractmethod
from pathlib import Path
from urllib.parse import unquote, urlparse

import dagster as dg
from pydantic import Field

from genops_assets.lib.hashing import atomic_dir, atomic_write_text, sha256_bytes
from genops_assets.lib.integrity import (
    MANIFEST,
    IntegrityError,
    files_digest,
    read_manifest,
    record_folder,
    verify_folder,
)

DIGEST_SUFFIX = ".sha256"


class StorageError(IntegrityError):
    """An object that is missing, unreadable, or whose content does not match its recorded digest."""


class Storage(dg.ConfigurableResource):
    """Objects by key; each backend supplies how to write, read and name one object."""

    # -- what a backend provides ---------------------------------------------------------------

    @abstractmethod
    def uri(self, key: str) -> str:
        """The URI of ``key`` in this store."""

    @abstractmethod
    def _key(self, uri: str) -> str:
        """The key of a URI of this store; ValueError naming the URI when it is another store's."""

    @abstractmethod
    def _write(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def _write_file(self, key: str, path: Path) -> None: ...

    @abstractmethod
    def _read(self, key: str) -> bytes:
        """The object's bytes; StorageError naming the URI when there is none."""

    @abstractmethod
    def _read_file(self, key: str, path: Path) -> None: ...

    # -- single objects ------------------------------------------------------------------------

    def put_bytes(self, key: str, data: bytes) -> str:
        """Store ``data`` at ``key`` with its sha256 beside it; returns the object's URI."""
        key = _clean(key)
        self._write(key, data)
        self._write(key + DIGEST_SUFFIX, sha256_bytes(data).encode())
        return self.uri(key)

    def get_bytes(self, uri: str, sha256: str | None = None) -> bytes:
        """The bytes at ``uri``, checked against the digest stored beside them (and ``sha256``
        when given); StorageError naming the URI and both digests when they differ."""
        key = self._key(uri)
        data = self._read(key)
        recorded = self._read(key + DIGEST_SUFFIX).decode().strip()
        actual = sha256_bytes(data)
        for source, digest in (("the stored digest", recorded), ("the expected digest", sha256)):
            if digest is not None and digest != actual:
                raise StorageError(f"{uri}: content has sha256 {actual}, {source} is {digest}; refusing it")
        return data

    # -- folders -------------------------------------------------------------------------------

    def upload_dir(self, local: str | Path, key: str) -> str:
        """Upload the files of ``local`` under ``key``, its manifest last (written now when the
        folder has none, checked when it has one); returns the folder's URI. The folder's digest
        to record for ``download_dir`` is ``files_digest(read_manifest(local))``."""
        root = Path(local)
        if not root.is_dir():
            raise StorageError(f"{root}: not a folder, nothing to upload")
        key = _clean(key)
        files = record_folder(root)
        for name in sorted(files):
            self._write_file(f"{key}/{name}", root / name)
        self._write_file(f"{key}/{MANIFEST}", root / MANIFEST)
        return self.uri(key)

    def manifest(self, uri: str) -> dict[str, str]:
        """The per-file digests recorded for the folder at ``uri``."""
        key = self._key(uri)
        raw = self._read(f"{key}/{MANIFEST}")
        try:
            manifest = json.loads(raw)
            files = {str(k): str(v) for k, v in manifest["files"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise StorageError(f"{uri}/{MANIFEST}: unreadable manifest: {exc}") from exc
        for name in files:
            if name.startswith("/") or ".." in Path(name).parts:
                raise StorageError(f"{uri}/{MANIFEST}: file name {name!r} leaves the folder")
        return files

    def download_dir(self, uri: str, local: str | Path, digest: str | None = None) -> Path:
        """Fetch the folder at ``uri`` into ``local`` (replaced in one rename once every file
        matched the manifest). ``digest``: the folder digest recorded at upload time; the
        manifest must match it too. StorageError names the file and both digests."""
        files = self.manifest(uri)
        if digest is not None and files_digest(files) != digest:
            raise StorageError(f"{uri}/{MANIFEST}: folder digest {files_digest(files)}, expected {digest}: "
                               "the manifest was changed after upload; refusing it")
        key = self._key(uri)
        target = Path(local)
        with atomic_dir(target) as tmp:
            for name in sorted(files):
                path = tmp / name
                path.parent.mkdir(parents=True, exist_ok=True)
                self._read_file(f"{key}/{name}", path)
            atomic_write_text(tmp / MANIFEST, json.dumps({"algorithm": "sha256", "files": files}, indent=2,
                                                         sort_keys=True) + "\n")
            try:
                verify_folder(tmp)  # against the manifest just written from the store's copy
            except IntegrityError as exc:
                raise StorageError(f"{uri}: {str(exc).removeprefix(f'{tmp}: ')}") from exc
        return target


    def upload_frames(self, frames: dict, key: str) -> str:
        """Publish tables (name -> pandas DataFrame) as ``<name>.jsonl`` files under ``key``,
        with their manifest; returns the folder's URI. Callers key it by the data's digest, so
        the same rows are published once and a new export never overwrites an old one."""
        import tempfile

        with tempfile.TemporaryDirectory(prefix="genops-export-") as tmp:
            for name, frame in frames.items():
                frame.to_json(Path(tmp) / f"{name}.jsonl", orient="records", lines=True, force_ascii=False,
                              date_format="iso")
            return self.upload_dir(tmp, key)

    def local_copy(self, path: str | Path, uri: str | None, digest: str, cache: str | Path) -> Path:
        """A local folder holding the published folder: ``path`` itself when this machine has it
        (a step on the machine that wrote it; loaders check it against its manifest), else a
        download of ``uri`` into ``<cache>/<digest>``, checked against ``digest`` (the folder's
        files digest) and reused by the next step on this node."""
        here = Path(path)
        if here.is_dir():
            return here
        if not uri:
            raise StorageError(f"{here}: not on this machine, and no published copy is recorded "
                               "(adapter_uri): re-materialize the asset that wrote it")
        target = Path(cache) / digest
        if (target / MANIFEST).is_file() and files_digest(read_manifest(target)) == digest:
            verify_folder(target)
            return target
        return self.download_dir(uri, target, digest=digest)


def _clean(key: str) -> str:
    key = key.strip("/")
    if not key or ".." in key.split("/"):
        raise ValueError(f"object key {key!r}: must be a non-empty relative path without '..'")
    return key


class LocalStorage(Storage):
    """Objects as files under ``root`` (the local profile: ``<home>/objects``)."""

    root: str = Field(description="Folder that holds the objects")

    def uri(self, key: str) -> str:
        return (Path(self.root).resolve() / _clean(key)).as_uri()

    def _key(self, uri: str) -> str:
        parsed = urlparse(uri)
        root = Path(self.root).resolve()
        path = Path(unquote(parsed.path))
        if parsed.scheme != "file" or not path.is_relative_to(root):
            raise ValueError(f"{uri}: not an object of the local store under {root.as_uri()}")
        return path.relative_to(root).as_posix()

    def _path(self, key: str) -> Path:
        return Path(self.root).resolve() / key

    def _write(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        tmp.replace(path)

    def _write_file(self, key: str, path: Path) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.copyfile(path, tmp)
        tmp.replace(target)

    def _read(self, key: str) -> bytes:
        path = self._path(key)
        if not path.is_file():
            raise StorageError(f"{path.as_uri()}: no such object")
        return path.read_bytes()

    def _read_file(self, key: str, path: Path) -> None:
        source = self._path(key)
        if not source.is_file():
            raise StorageError(f"{source.as_uri()}: no such object")
        shutil.copyfile(source, path)


class GcsStorage(Storage):
    """Objects in ``gs://<bucket>/<prefix>/`` (the gcp profile)."""

    gcs: dg.ConfigurableResource = Field(
        description="A dagster_gcp GCSResource (project; credentials from workload identity or application "
                    "default credentials). Typed by its base class so that loading the definitions does not "
                    "import google-cloud-storage.")
    bucket: str = Field(description="The bucket (GENOPS_GCS_BUCKET)")
    prefix: str = Field("genops", description="Key prefix inside the bucket (GENOPS_GCS_PREFIX)")

    def _blob_name(self, key: str) -> str:
        prefix = self.prefix.strip("/")
        return f"{prefix}/{key}" if prefix else key

    def uri(self, key: str) -> str:
        return f"gs://{self.bucket}/{self._blob_name(_clean(key))}"

    def _key(self, uri: str) -> str:
        head = f"gs://{self.bucket}/" + (f"{self.prefix.strip('/')}/" if self.prefix.strip("/") else "")
        if not uri.startswith(head):
            raise ValueError(f"{uri}: not an object of this store (gs://{self.bucket}/{self.prefix.strip('/')})")
        return _clean(uri[len(head):])

    def _bucket(self):
        from dagster_gcp import GCSResource

        if not isinstance(self.gcs, GCSResource):
            raise TypeError(f"GcsStorage.gcs must be a dagster_gcp GCSResource, got {type(self.gcs).__name__}")
        return self.gcs.get_client().bucket(self.bucket)

    def _write(self, key: str, data: bytes) -> None:
        self._bucket().blob(self._blob_name(key)).upload_from_string(data, content_type="application/octet-stream")

    def _write_file(self, key: str, path: Path) -> None:
        self._bucket().blob(self._blob_name(key)).upload_from_filename(str(path))

    def _read(self, key: str) -> bytes:
        from google.api_core.exceptions import NotFound

        try:
            return self._bucket().blob(self._blob_name(key)).download_as_bytes()
        except NotFound:
            raise StorageError(f"{self.uri(key)}: no such object") from None

    def _read_file(self, key: str, path: Path) -> None:
        from google.api_core.exceptions import NotFound

        try:
            self._bucket().blob(self._blob_name(key)).download_to_filename(str(path))
        except NotFound:
            raise StorageError(f"{self.uri(key)}: no such object") from None
