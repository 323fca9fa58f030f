"""Progress lines for a Dagster run watched from the terminal: which step runs (k/N), how far
it is, and when it should end.

A step's own log messages carry its progress as ``done/total`` ("tuning: step 40/100, ...",
"v1: generated 16/104"); the ETA of a phase is extrapolated from the rate since its first
message, unless the message states its own ETA (tuning does, from the trainer's clock). Lines
about one phase are printed at most every ``interval_s`` seconds, and once at its end.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_PROGRESS = re.compile(r"(\d+)/(\d+)")
_HAS_ETA = re.compile(r"\bETA\b")


@dataclass(frozen=True)
class RunEvent:
    """What the progress display needs of one event of the run's log."""

    timestamp: float
    kind: str  # a Dagster event type (STEP_START, STEP_SUCCESS, STEP_FAILURE, ...) or LOG for a step's message
    step_key: str | None = None
    message: str = ""


def clock(seconds: float) -> str:
    """``m:ss`` (or ``h:mm:ss``) of a duration."""
    s = max(0, round(seconds))
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def duration(seconds: float) -> str:
    """``2m05s`` / ``42s``: a duration in a sentence."""
    s = max(0, round(seconds))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


@dataclass
class _Phase:
    started: float
    done: int
    printed_at: float
    ended: bool = False


@dataclass
class RunProgress:
    """Turns the events of one run into terminal lines (``feed`` returns the lines to print)."""

    total_steps: int
    started: float
    interval_s: float = 15.0
    finished: int = 0
    durations: dict[str, float] = field(default_factory=dict)  # seconds of each finished step
    _step_started: dict[str, float] = field(default_factory=dict)
    _phases: dict[tuple[str, str], _Phase] = field(default_factory=dict)

    def _line(self, t: float, text: str) -> str:
        return f"[{clock(t - self.started):>5}] {text}"

    def _position(self) -> str:
        return f"{min(self.finished + 1, self.total_steps)}/{self.total_steps}"

    def feed(self, event: RunEvent) -> list[str]:
        t, step = event.timestamp, event.step_key
        if event.kind == "STEP_START" and step:
            self._step_started[step] = t
            return [self._line(t, f"step {self._position()} {step}")]
        if event.kind == "STEP_SUCCESS" and step:
            self.finished += 1
            took = self.durations[step] = t - self._step_started.get(step, t)
            return [self._line(t, f"step {self.finished}/{self.total_steps} {step} done in {duration(took)}")]
        if event.kind == "STEP_FAILURE" and step:
            first = event.message.strip().splitlines()[0] if event.message.strip() else "see the log"
            return [self._line(t, f"step {step} FAILED: {first}")]
        if event.kind == "LOG" and step:
            return self._progress(t, step, event.message)
        return []

    def _progress(self, t: float, step: str, message: str) -> list[str]:
        m = _PROGRESS.search(message)
        if m is None:
            return []
        done, total = int(m.group(1)), int(m.group(2))
        if total <= 0 or done > total:
            return []
        # One phase per kind of message within the step ("base 0-shot: generated", "tuning: step").
        key = (step, _PROGRESS.sub("#", message[: m.end()]))
        phase = self._phases.get(key)
        if phase is None:
            self._phases[key] = phase = _Phase(started=t, done=done, printed_at=float("-inf"))
        last = done == total
        if phase.ended or (not last and t - phase.printed_at < self.interval_s):
            return []
        phase.ended = last  # a phase's closing messages (final loss, eval loss) show once
        phase.printed_at = t
        text = f"step {self._position()} {step}: {message.strip()}"
        if not _HAS_ETA.search(message) and not last and done > phase.done and t > phase.started:
            eta = (t - phase.started) / (done - phase.done) * (total - done)
            text += f", ETA {duration(eta)}"
        return [self._line(t, text)]
