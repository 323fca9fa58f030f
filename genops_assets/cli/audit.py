"""Dependency audit of the pinned set: pip-audit over ``constraints.txt``, judged against the
allowlist ``.ci/audit-allow.toml`` (each known vulnerability listed with the reason it is
accepted). A vulnerability that is not listed fails; a listed one passes and is printed with
its reason; an entry whose review date has passed fails like an unlisted one.

When the vulnerability service cannot be reached (no route to OSV, or PyPI's per-version JSON
API answering 404 for every package, as behind a package mirror), the audit says "not
computed: <service> unreachable" and passes: no result is not a clean result, and it is not
reported as one.

    python -m genops_assets.cli.audit [--requirements constraints.txt] [--allow .ci/audit-allow.toml]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DEFAULT_REQUIREMENTS = REPO / "constraints.txt"
DEFAULT_ALLOWLIST = REPO / ".ci" / "audit-allow.toml"
SERVICES = {"pypi": "PyPI's vulnerability JSON API (pypi.org/pypi/<name>/<version>/json)",
            "osv": "OSV (api.osv.dev)"}
_UNREACHABLE_MARKERS = ("ConnectionError", "Could not connect", "Max retries exceeded", "NameResolutionError",
                        "Failed to resolve", "Connection refused", "timed out", "is not redirecting properly")


class AllowlistError(ValueError):
    """The allowlist file is malformed; the message names the file and entry."""


@dataclass(frozen=True)
class Allowed:
    id: str
    package: str
    reason: str
    until: date | None = None


@dataclass(frozen=True)
class Finding:
    package: str
    version: str
    id: str
    aliases: tuple[str, ...]
    fix_versions: tuple[str, ...]


@dataclass
class Verdict:
    computed: bool
    passed: bool
    lines: list[str] = field(default_factory=list)


def load_allowlist(path: Path) -> list[Allowed]:
    """The entries of ``path`` (``[[allow]]`` tables with id, package, reason, optional until)."""
    if not path.is_file():
        return []
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise AllowlistError(f"{path}: not valid TOML: {exc}") from exc
    unknown = set(data) - {"allow"}
    if unknown:
        raise AllowlistError(f"{path}: unknown key(s) {sorted(unknown)}; entries go in [[allow]] tables")
    out = []
    for i, entry in enumerate(data.get("allow", [])):
        where = f"{path}: [[allow]] entry {i + 1}"
        extra = set(entry) - {"id", "package", "reason", "until"}
        if extra:
            raise AllowlistError(f"{where}: unknown field(s) {sorted(extra)}")
        for name in ("id", "package", "reason"):
            if not isinstance(entry.get(name), str) or not entry[name].strip():
                raise AllowlistError(f"{where}: '{name}' is required (a non-empty string)")
        until = entry.get("until")
        if until is not None and not isinstance(until, date):
            raise AllowlistError(f"{where}: 'until' must be a TOML date (2027-01-31), got {until!r}")
        out.append(Allowed(entry["id"].strip(), canonical(entry["package"]), entry["reason"].strip(), until))
    return out


def canonical(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(".", "-")


def parse_report(report: Mapping[str, Any]) -> tuple[list[Finding], list[str], int]:
    """pip-audit's JSON report: the vulnerabilities found, the skipped packages (with the reason)
    and the number of packages audited."""
    findings, skipped, audited = [], [], 0
    for dep in report.get("dependencies", []):
        if "skip_reason" in dep:
            skipped.append(f"{dep['name']}: {dep['skip_reason']}")
            continue
        audited += 1
        for vuln in dep.get("vulns", []):
            findings.append(Finding(canonical(dep["name"]), str(dep["version"]), vuln["id"],
                                    tuple(vuln.get("aliases", ())), tuple(vuln.get("fix_versions", ()))))
    return findings, skipped, audited


def judge(report: Mapping[str, Any] | None, allowlist: Sequence[Allowed], service: str,
          error: str = "", today: date | None = None) -> Verdict:
    """The audit's verdict on pip-audit's JSON ``report`` (None when pip-audit produced none,
    with its ``error`` output)."""
    what = SERVICES.get(service, service)
    if report is None:
        if any(marker in error for marker in _UNREACHABLE_MARKERS):
            return Verdict(False, True, [f"dependency audit: not computed: {what} unreachable"])
        tail = error.strip().splitlines()[-1] if error.strip() else "no output"
        return Verdict(True, False, [f"dependency audit failed: pip-audit produced no report ({tail})"])
    findings, skipped, audited = parse_report(report)
    if audited == 0 and skipped:
        return Verdict(False, True, [f"dependency audit: not computed: {what} unreachable (none of the "
                                     f"{len(skipped)} packages could be looked up; e.g. {skipped[0]})"])
    today = today or date.today()
    lines, failed = [], False
    used: set[Allowed] = set()
    for f in findings:
        ids = {f.id, *f.aliases}
        match = next((a for a in allowlist if a.package == f.package and a.id in ids), None)
        fix = f"fixed in {', '.join(f.fix_versions)}" if f.fix_versions else "no fixed version yet"
        if match is None:
            failed = True
            lines.append(f"VULNERABLE {f.package}=={f.version}: {f.id} ({fix}); pin a fixed version or list it in "
                         "the allowlist with a reason")
        elif match.until is not None and match.until < today:
            failed = True
            used.add(match)
            lines.append(f"VULNERABLE {f.package}=={f.version}: {f.id} ({fix}); its allowlist entry expired on "
                         f"{match.until}: review it")
        else:
            used.add(match)
            lines.append(f"allowed {f.package}=={f.version}: {f.id} ({fix}): {match.reason}")
    for a in allowlist:
        if a not in used:
            lines.append(f"note: allowlist entry {a.id} ({a.package}) matched nothing; remove it if it is fixed")
    for s in skipped:
        lines.append(f"not audited: {s}")
    summary = (f"dependency audit ({what}): {audited} packages, {len(findings)} known vulnerabilities, "
               f"{sum(1 for ln in lines if ln.startswith('VULNERABLE'))} not allowed")
    return Verdict(True, not failed, [summary, *lines])


def run_pip_audit(requirements: Path, service: str, timeout_s: int = 15) -> tuple[dict | None, str]:
    """pip-audit's JSON report on the pinned ``requirements`` (None when it produced none) and
    its error output."""
    cmd = [sys.executable, "-m", "pip_audit", "--requirement", str(requirements), "--no-deps", "--disable-pip",
           "--format", "json", "--vulnerability-service", service, "--progress-spinner", "off",
           "--timeout", str(timeout_s), "--aliases", "on"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    try:
        return json.loads(proc.stdout), proc.stderr
    except json.JSONDecodeError:
        return None, proc.stderr + proc.stdout


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="genops-audit", description=__doc__.split("\n\n")[0])
    p.add_argument("--requirements", type=Path, default=DEFAULT_REQUIREMENTS)
    p.add_argument("--allow", type=Path, default=DEFAULT_ALLOWLIST)
    p.add_argument("--service", choices=sorted(SERVICES), default="pypi")
    args = p.parse_args(argv)
    allowlist = load_allowlist(args.allow)
    report, error = run_pip_audit(args.requirements, args.service)
    verdict = judge(report, allowlist, args.service, error)
    print("\n".join(verdict.lines))
    return 0 if verdict.passed else 1


if __name__ == "__main__":
    sys.exit(main())
