"""Dynamic batching: concurrent requests are grouped into one model call.

Requests wait in a queue; one worker takes the first, gathers what else arrives within
``max_wait_s`` (up to ``max_batch``), and runs each group of compatible requests (same kind,
adapter and decoding parameters) as one left-padded batch. On a CPU, decoding eight
sequences together costs little more than one, so concurrent clients see several times the
throughput of sequential ones.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any


@dataclass
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
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.perf_counter)

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
        self._thread = threading.Thread(target=self._run, name="genops-batcher", daemon=True)
        self.batches = 0
        self.batched_jobs = 0
        self._thread.start()

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def submit(self, job: Job) -> Future:
        self._queue.put(job)
        return job.future

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
            jobs.append(nxt)
        return jobs

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            groups: dict[tuple, list[Job]] = {}
            for job in self._collect(first):
                groups.setdefault(job.group_key(), []).append(job)
            for jobs in groups.values():
                self._execute(jobs)

    def _execute(self, jobs: list[Job]) -> None:
        from genops_assets.lib.generation import generate, score_choices

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
                                   top_p=head.top_p, stop=list(head.stop), batch_size=len(jobs), seed=head.seed)
        except Exception as exc:  # noqa: BLE001 - every waiting request gets the error
            for j in jobs:
                j.future.set_exception(exc)
            return
        self.batches += 1
        self.batched_jobs += len(jobs)
        compute_s = time.perf_counter() - started
        for j, r in zip(jobs, results, strict=True):
            j.future.set_result((r, {"queue_s": started - j.enqueued, "compute_s": compute_s, "batch": len(jobs)}))
