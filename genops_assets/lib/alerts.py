"""Alerts of the continuous-training loop.

An alert is one JSON line appended to ``<GENOPS_HOME>/alerts.jsonl`` (``ts``, ``kind``,
``severity``, ``message``, ``details``) and, when a webhook URL is given (``GENOPS_ALERT_WEBHOOK``,
carried by ``resources.automation.AutomationResource``), POSTed as JSON to that URL. The file is
the record; the webhook is a notification: when it fails the failure is logged and returned, and
the caller (a sensor) goes on.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from http.client import HTTPException
from pathlib import Path
from typing import Any

from genops_assets.lib.jsonl import read_jsonl
from genops_assets.lib.locks import exclusive

ALERTS_FILE = "alerts.jsonl"
SEVERITIES = ("info", "warning", "error", "critical")


@dataclass(frozen=True)
class Alert:
    kind: str
    severity: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)
    ts: str = ""

    def line(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, default=str, ensure_ascii=False) + "\n"


@dataclass(frozen=True)
class AlertDelivery:
    alert: Alert
    path: Path
    webhook_status: int | None = None
    webhook_error: str | None = None


def alerts_path(home: str | Path) -> Path:
    return Path(home) / ALERTS_FILE


def append_alert(path: Path, alert: Alert) -> None:
    """Append one line under an exclusive lock (``<file>.lock`` beside it), in one write,
    flushed to disk: concurrent writers never interleave and a reader never sees half a line
    from a finished append."""
    data = alert.line().encode("utf-8")
    with exclusive(path.with_name(path.name + ".lock")):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = os.write(fd, data)
            while written < len(data):  # a short write (signal, full pipe) continues where it stopped
                written += os.write(fd, data[written:])
            os.fsync(fd)
        finally:
            os.close(fd)


def post_webhook(url: str, alert: Alert, timeout_s: float) -> int:
    """POST the alert as JSON; returns the HTTP status, raises ``OSError``/``HTTPException`` on failure."""
    body = json.dumps(asdict(alert), sort_keys=True, default=str).encode("utf-8")
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": "application/json", "User-Agent": "genops-alerts"})
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        return int(resp.status)


def raise_alert(
    home: str | Path,
    kind: str,
    severity: str,
    message: str,
    details: Mapping[str, Any] | None = None,
    *,
    webhook_url: str | None = None,
    webhook_timeout_s: float = 5.0,
    log: Callable[[str], None] | None = None,
) -> AlertDelivery:
    """Record an alert in ``<home>/alerts.jsonl`` and POST it to ``webhook_url`` when given."""
    if severity not in SEVERITIES:
        raise ValueError(f"alert severity must be one of {SEVERITIES}, got {severity!r}")
    alert = Alert(kind, severity, message, dict(details or {}), datetime.now(UTC).isoformat())
    path = alerts_path(home)
    append_alert(path, alert)
    if not webhook_url:
        return AlertDelivery(alert, path)
    try:
        status = post_webhook(webhook_url, alert, webhook_timeout_s)
    except urllib.error.HTTPError as exc:
        error = f"HTTP {exc.code} {exc.reason}"
    except (urllib.error.URLError, OSError, HTTPException, ValueError) as exc:
        error = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
    else:
        return AlertDelivery(alert, path, webhook_status=status)
    if log is not None:
        log(f"alert webhook {webhook_url} failed ({error}); the alert is recorded in {path}")
    return AlertDelivery(alert, path, webhook_error=error)


def read_alerts(home: str | Path) -> list[dict[str, Any]]:
    """Every recorded alert, oldest first."""
    path = alerts_path(home)
    return read_jsonl(path) if path.exists() else []
