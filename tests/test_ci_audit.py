"""`make audit` (.ci/audit.py) fails on a known vulnerability and only warns when nothing could be audited."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

AUDIT = Path(__file__).resolve().parent.parent / ".ci" / "audit.py"


@pytest.fixture(scope="module")
def audit() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ci_audit", AUDIT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


EDITABLE = {"name": "densealign", "skip_reason": "distribution marked as editable"}


def test_a_known_vulnerability_fails_and_is_named(audit: ModuleType) -> None:
    report = {
        "dependencies": [
            EDITABLE,
            {"name": "requests", "version": "2.31.0", "vulns": [
                {"id": "GHSA-9wx4-h78v-vm56", "fix_versions": ["2.32.0"], "aliases": []}]},
            {"name": "jinja2", "version": "3.1.6", "vulns": []},
        ]
    }  # fmt: skip
    assert audit.verdict(report, "pypi") == (
        1,
        [
            "pip-audit: 1 known vulnerabilities (pypi):",
            "requests 2.31.0: GHSA-9wx4-h78v-vm56 (fixed in 2.32.0)",
        ],
    )


def test_a_service_that_knew_no_package_warns_and_passes(audit: ModuleType) -> None:
    # What the PyPI service gives through a mirror that serves only the package index: every lookup 404s.
    report = {
        "dependencies": [
            EDITABLE,
            {"name": "alembic", "skip_reason": "Dependency not found on PyPI and could not be audited: alembic (1.20.1)"},
            {"name": "torch", "skip_reason": "Dependency not found on PyPI and could not be audited: torch (2.13.0+cpu)"},
        ]
    }  # fmt: skip
    status, lines = audit.verdict(report, "pypi")
    assert status == 0 and len(lines) == 1
    assert lines[0].startswith("WARNING: pip-audit: the pypi vulnerability service answered for none of 2")
    assert lines[0].endswith("dependencies were NOT audited")


def test_a_clean_audit_names_the_packages_the_service_did_not_know(audit: ModuleType) -> None:
    report = {
        "dependencies": [
            EDITABLE,
            {"name": "jinja2", "version": "3.1.6", "vulns": []},
            {"name": "torch", "skip_reason": "Dependency not found on PyPI and could not be audited: torch (2.13.0+cpu)"},
        ]
    }  # fmt: skip
    assert audit.verdict(report, "osv") == (
        0,
        [
            "pip-audit: 1 packages audited against osv, no known vulnerabilities; not known to the service: torch"
        ],
    )
