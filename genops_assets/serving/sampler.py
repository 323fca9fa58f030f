"""Resource samples of the endpoint process: a daemon thread appends one JSON line every few
seconds to ``<state_dir>/resources.jsonl``.

A line: ``ts`` (Unix seconds), ``pid``, ``cpu_percent`` (since the previous sample, percent of one
core: above 100 when several cores work), ``rss_bytes``, ``num_threads``, and ``gpu_mem_bytes`` /
``gpu_mem_reserved_bytes`` (PyTorch's allocated and reserved CUDA memory over all devices; null
when the process has not initialised CUDA). The interval is the ``resource_sample_s`` setting
(``GENOPS_RESOURCE_SAMPLE_S``, default 5 seconds; 0 turns sampling off).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from genops_assets.serving.settings import ServerSettings

RESOURCES_FILE = "resources.jsonl"

log = logging.getLogger("genops.serving")


def interval_from_env(env: Mapping[str, str] | None = None) -> float:
    """Seconds between samples from ``GENOPS_RESOURCE_SAMPLE_S`` of ``env`` (by default the
    process environment); 0: off."""
    return ServerSettings.from_env(env).resource_sample_s


def gpu_memory() -> tuple[int | None, int | None]:
    """(allocated, reserved) CUDA bytes of this process through PyTorch, summed over devices.
    None when PyTorch is not loaded here or has not initialised CUDA (asking would initialise it)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None, None
    devices = range(torch.cuda.device_count())
    return (sum(int(torch.cuda.memory_allocated(d)) for d in devices),
            sum(int(torch.cuda.memory_reserved(d)) for d in devices))


class ResourceSampler:
    """Samples this process every ``interval_s`` seconds into ``path`` from a daemon thread."""

    def __init__(self, path: str | Path, interval_s: float):
        import psutil

        if interval_s <= 0:
            raise ValueError(f"sampling interval must be positive, got {interval_s}")
        self.path = Path(path)
        self.interval_s = float(interval_s)
        self._proc = psutil.Process()
        self._proc.cpu_percent(None)  # the first reading only starts the measurement
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def sample(self) -> dict[str, Any]:
        """Take one sample and append it to the file; returns it."""
        with self._proc.oneshot():
            row = {"ts": time.time(), "pid": self._proc.pid, "cpu_percent": self._proc.cpu_percent(None),
                   "rss_bytes": int(self._proc.memory_info().rss), "num_threads": self._proc.num_threads()}
        row["gpu_mem_bytes"], row["gpu_mem_reserved_bytes"] = gpu_memory()
        line = json.dumps(row) + "\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(line)
        return row

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(self.interval_s):
            try:
                self.sample()
            except (OSError, psutil.Error) as exc:
                # A full disk or a vanished file must not stop serving; the gap shows in the samples.
                log.warning("resource sample to %s failed: %s", self.path, exc)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> ResourceSampler:
        if self.running:
            raise RuntimeError(f"resource sampler for {self.path} is already running")
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="genops-resource-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None


def sampler_lifespan(state_dir: str | Path, interval_s: float | None = None):
    """A FastAPI/Starlette lifespan that samples the server process while the app runs, every
    ``interval_s`` seconds (0: off; None: the setting, read now, so a malformed
    ``GENOPS_RESOURCE_SAMPLE_S`` fails at start-up)."""
    interval = interval_from_env() if interval_s is None else interval_s

    @contextlib.asynccontextmanager
    async def lifespan(app):
        sampler = ResourceSampler(Path(state_dir) / RESOURCES_FILE, interval).start() if interval > 0 else None
        app.state.resource_sampler = sampler
        try:
            yield
        finally:
            if sampler is not None:
                sampler.stop()

    return lifespan
