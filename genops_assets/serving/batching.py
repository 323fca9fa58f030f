"""Dynamic batching: concurrent requests share model calls.

Requests wait in a queue that one scheduler thread serves. Generation is batched
continuously (``scheduler="continuous"``, the default): between two decoding steps, waiting
requests for the adapter being decoded join the running batch (up to ``max_batch`` rows), and
each row leaves as soon as it ends, so a request never waits for a whole batch to finish and
the batch stays full under load. A batch decodes one adapter; requests for another adapter
(another task) wait until it drains, and once such a request is the oldest waiting, the running
batch admits no one new, so adapters take turns in arrival order. Judge requests (scoring
fixed choices: one forward pass) and seeded samples (reproducible only alone) run as static
groups between steps: the scheduler takes what arrived within ``max_wait_s`` and runs each
group of compatible requests (same kind, adapter and decoding parameters) as one batch.
``scheduler="static"`` runs generation that way too, one whole batch at a time (with
``max_batch=1``: one request at a time).

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
    json_schema: dict | None = None  # answer JSON this schema accepts (lib.constrained); None: free
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
    batch: int = 1  # rows decoding together when this request joined
    internal: str | None = None  # the peft adapter (version) its batch decoded with

    def group_key(self) -> tuple:
        if self.kind == "choice":
            return ("choice", self.adapter)
        if self.temperature > 0 and self.seed is not None:
            return ("seeded", id(self))  # a seeded sample is reproducible only alone
        return ("generate", self.adapter, self.max_new_tokens, self.temperature, self.top_p, self.stop)


SCHEDULERS = ("continuous", "static")


class Batcher:
    def __init__(self, loaded, max_batch: int = 8, max_wait_s: float = 0.01, scheduler: str = "continuous"):
        if scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler '{scheduler}' (use one of {', '.join(SCHEDULERS)})")
        self.loaded = loaded
        self.max_batch = max(1, max_batch)
        self.max_wait_s = max_wait_s
        self.scheduler = scheduler
        self._pending: list[Job] = []  # continuous generation requests not yet admitted
        self._decode = None  # the running DecodeBatch
        self._closing = False
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

    def _drain(self) -> list[Job]:
        """What is queued now, without waiting."""
        jobs = []
        while True:
            try:
                nxt = self._queue.get_nowait()
            except queue.Empty:
                return jobs
            if nxt is None:
                self._closing = True
                return jobs
            if not nxt.future.cancelled():
                jobs.append(nxt)

    def _continuous(self, job: Job) -> bool:
        return self.scheduler == "continuous" and job.kind == "generate" and job.group_key()[0] == "generate"

    def _run(self) -> None:
        while not self._closing:
            if self._decode is None and not self._pending:
                first = self._queue.get()
                if first is None:
                    return
                if first.future.cancelled():
                    continue
                arrived = self._collect(first)
            else:
                arrived = self._drain()
            groups: dict[tuple, list[Job]] = {}
            for job in arrived:
                if self._continuous(job):
                    self._pending.append(job)
                else:
                    groups.setdefault(job.group_key(), []).append(job)
            for jobs in groups.values():
                self._execute(jobs)
            self._admit()
            self._step()
        if self._decode is not None:
            self._decode.close()

    def _admit(self) -> None:
        """Move waiting generation requests for the adapter being decoded into the running
        batch (a new batch, for the oldest request's adapter, when none runs)."""
        from genops_assets.serving.decode import DecodeBatch

        if not self._pending:
            return
        if self._decode is None:
            try:
                self._decode = DecodeBatch(self.loaded, self._pending[0].adapter)
            except Exception as exc:
                job = self._pending.pop(0)
                self._fail([job], exc)
                return
        batch = self._decode
        room = self.max_batch - len(batch)
        # A reloaded adapter: new requests wait for the batch on the old version to finish. One
        # batch decodes one adapter (one task's version): once the oldest waiting request is for
        # another one, the batch takes no one new and drains, so that request goes next and no
        # task starves behind another's steady traffic.
        fair = self._pending[0].adapter == batch.adapter
        take = [j for j in self._pending if j.adapter == batch.adapter][:room] if fair and batch.current() else []
        if not take:
            return
        self._pending = [j for j in self._pending if j not in take]
        jobs = self._start(take)
        if not jobs:
            return
        for j in jobs:
            j.internal = batch.internal
        self.batches += 1
        self.batched_jobs += len(jobs)
        for j in jobs:
            j.batch = len(batch) + len(jobs)
        try:
            done = batch.admit(jobs, [j.messages for j in jobs], max_new_tokens=[j.max_new_tokens for j in jobs],
                               temperature=[j.temperature for j in jobs], top_p=[j.top_p for j in jobs],
                               stop=[j.stop for j in jobs], seeds=[j.seed for j in jobs],
                               sinks=[self._row_hook(j) for j in jobs],
                               json_schemas=[j.json_schema for j in jobs])
        except Exception as exc:
            self._fail(jobs, exc)
            return
        self._finish(done)

    def _step(self) -> None:
        batch = self._decode
        if batch is None:
            return
        if len(batch):
            try:
                done = batch.step()
            except Exception as exc:
                jobs = [row.key for row in batch.rows]
                batch.rows = []
                self._fail(jobs, exc)
                done = []
            self._finish(done)
        if not len(batch):
            batch.close()
            self._decode = None

    def _finish(self, done) -> None:
        now = time.perf_counter()
        for job, result in done:
            self._release(job)
            if job.error is not None:
                job.future.set_exception(job.error)
            else:
                job.future.set_result((result, {"queue_s": (job.started or now) - job.enqueued,
                                                "compute_s": now - (job.started or now),
                                                "batch": job.batch}))

    def _fail(self, jobs: list[Job], exc: BaseException) -> None:
        for j in jobs:
            self._release(j)
            with self._lock:
                self._waiting.discard(j)
            if not j.future.done() and (j.future.running() or j.future.set_running_or_notify_cancel()):
                j.future.set_exception(exc)

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
                except Exception as exc:
                    job.error, stop = exc, True
            if stop or finish is not None:
                self._release(job)
            return stop

        return hook

    def _execute(self, jobs: list[Job]) -> None:
        from genops_assets.serving.generation import generate
        from genops_assets.serving.scoring import score_choices

        jobs = self._start(jobs)
        if not jobs:
            return
        head = jobs[0]
        started = time.perf_counter()
        internal = self.loaded.internal.get(head.adapter) if head.adapter is not None else None
        for j in jobs:
            j.internal = internal
        try:
            results: list[Any]
            if head.kind == "choice":
                results = score_choices(self.loaded, [j.messages for j in jobs], [j.choices for j in jobs],
                                        adapter=head.adapter)
            else:
                results = generate(self.loaded, [j.messages for j in jobs], adapter=head.adapter,
                                   max_new_tokens=head.max_new_tokens, temperature=head.temperature,
                                   top_p=head.top_p, stop=list(head.stop), batch_size=len(jobs), seed=head.seed,
                                   token_sinks=[self._row_hook(j) for j in jobs],
                                   json_schema=[j.json_schema for j in jobs])
        except Exception as exc:
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
