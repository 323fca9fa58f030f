"""Dynamic batching: concurrent requests are grouped into one model call.

Requests wait in a queue; one worker takes the first, gathers what else arrives within
``max_wait_s`` (up to ``max_batch``), and runs each group of compatible requests (same kind,
adapter and decoding parameters) as one left-padded batch. On a CPU, decoding eight
sequences together costs little more than one, so concurrent clients see several times the
throughput of sequential ones.

Each generation request is hooked into the decoding loop: its tokens are timed (time to
first token, time per token), handed to its ``on_token`` callback (streaming), and its row
stops as soon as the request is cancelled (client gone, timeout) while the rest of the batch
goes on. A request counts as waiting from ``submit`` until its batch starts, then as running
until its row ends.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

TokenCallback = Callable[[int | None, str | None], bool]


@dataclass(eq=False)
class Job:
    kind: str  # "generate" | "choice"
    messages: Sequence[dict[str, str]]
    adapter: str | None
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    choices: tuple[str, ...] = ()
    # Streaming: called in the batcher thread with each token (None: end of turn) and the finish
    # reason on the last step; returning True ends this request's row. Must be quick.
    on_token: TokenCallback | None = None
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.perf_counter)
    # Filled in by the batcher.
    cancelled: bool = False
    started: float | None = None
    token_times: list[float] = field(default_factory=list)  # perf_counter of each decoding step
    error: BaseException | None = None

    def group_key(self) -> tuple:
        if self.kind == "choice":
            return ("choice", self.adapter)
        if self.temperature > 0 and self.seed is not None:
            return ("seeded", id(self))  # a seeded sample is reproducible only alone
        return ("generate", self.adapter, self.max_new_tokens, self.temperature, self.top_p, self.stop)


class Batcher:
    def __init__(self, loaded, max_batch: int = 8, max_wait_s: float = 0.01):
        self.loaded = loaded
        self.max_batch = max(1, max_batch)
        self.max_wait_s = max_wait_s
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._waiting: set[Job] = set()
        self._running: set[Job] = set()
        self._thread = threading.Thread(target=self._run, name="genops-batcher", daemon=True)
        self.batches = 0
        self.batched_jobs = 0
        self._thread.start()

    @property
    def depth(self) -> int:
        """Requests waiting for a batch (cancelled ones excluded)."""
        with self._lock:
            return len(self._waiting)

    def load(self) -> tuple[Counter, Counter]:
        """(waiting, running) request counts per adapter (None: the base model)."""
        with self._lock:
            return Counter(j.adapter for j in self._waiting), Counter(j.adapter for j in self._running)

    def submit(self, job: Job) -> Future:
        with self._lock:
            self._waiting.add(job)
        self._queue.put(job)
        return job.future

    def cancel(self, job: Job) -> None:
        """Stop working on ``job``: dropped if still queued, its row stopped at the next decoding
        step if running (its future then resolves with what was generated, or is cancelled)."""
        job.cancelled = True
        if job.future.cancel():
            with self._lock:
                self._waiting.discard(job)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _collect(self, first: Job) -> list[Job]:
        jobs = [first]
        deadline = time.perf_counter() + self.max_wait_s
        while len(jobs) < self.max_batch:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            try:
                nxt = self._queue.get(timeout=remaining)
            except queue.Empty:
                break
            if nxt is None:
                self._queue.put(None)
                break
            if not nxt.future.cancelled():
                jobs.append(nxt)
        return jobs

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            if first.future.cancelled():
                continue
            groups: dict[tuple, list[Job]] = {}
            for job in self._collect(first):
                groups.setdefault(job.group_key(), []).append(job)
            for jobs in groups.values():
                self._execute(jobs)

    def _start(self, jobs: list[Job]) -> list[Job]:
        """Move the jobs not cancelled meanwhile from waiting to running."""
        live = []
        now = time.perf_counter()
        with self._lock:
            for j in jobs:
                self._waiting.discard(j)
                if j.future.set_running_or_notify_cancel():
                    j.started = now
                    self._running.add(j)
                    live.append(j)
        return live

    def _release(self, job: Job) -> None:
        with self._lock:
            self._running.discard(job)

    def _row_hook(self, job: Job) -> TokenCallback:
        def hook(token: int | None, finish: str | None) -> bool:
            job.token_times.append(time.perf_counter())
            stop = job.cancelled
            if not stop and job.on_token is not None:
                try:
                    stop = bool(job.on_token(token, finish))
                except Exception as exc:  # noqa: BLE001 - fails this request only, reported through its future
                    job.error, stop = exc, True
            if stop or finish is not None:
                self._release(job)
            return stop

        return hook

    def _execute(self, jobs: list[Job]) -> None:
        from genops_assets.lib.generation import generate, score_choices

        jobs = self._start(jobs)
        if not jobs:
            return
        head = jobs[0]
        started = time.perf_counter()
        try:
            results: list[Any]
            if head.kind == "choice":
                results = score_choices(self.loaded, [j.messages for j in jobs], [j.choices for j in jobs],
                                        adapter=head.adapter)
            else:
                results = generate(self.loaded, [j.messages for j in jobs], adapter=head.adapter,
                                   max_new_tokens=head.max_new_tokens, temperature=head.temperature,
                                   top_p=head.top_p, stop=list(head.stop), batch_size=len(jobs), seed=head.seed,
                                   token_sinks=[self._row_hook(j) for j in jobs])
        except Exception as exc:  # noqa: BLE001 - every waiting request gets the error
            for j in jobs:
                self._release(j)
                j.future.set_exception(exc)
            return
        self.batches += 1
        self.batched_jobs += len(jobs)
        compute_s = time.perf_counter() - started
        for j, r in zip(jobs, results, strict=True):
            self._release(j)
            if j.error is not None:
                j.future.set_exception(j.error)
            else:
                j.future.set_result((r, {"queue_s": started - j.enqueued, "compute_s": compute_s,
                                         "batch": len(jobs)}))
