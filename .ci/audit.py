"""`make audit`: known vulnerabilities in the packages installed in this virtualenv, via pip-audit.

Runs `python -m pip_audit --skip-editable` (the project itself is editable; its pins are what get
audited) against a vulnerability service (`pypi` by default, `osv` with --service osv) and decides:

- a known vulnerability in any installed package: print one line per vulnerability, exit 1;
- the service cannot be reached (pip-audit fails to connect, or the service knew none of the
  installed packages, which is how a registry mirror that serves only the package index answers
  the PyPI JSON API): print one warning line saying nothing was audited, exit 0;
- otherwise exit 0, naming in one line any packages the service did not know (a local build such as
  torch's `+cpu` wheel is not on PyPI's vulnerability API).

Warning instead of failing on an unreachable service is a choice: CI machines that reach only the
package registries would otherwise never pass, and the warning line keeps the gap visible. pip-audit
alone prints "No known vulnerabilities found" and exits 0 even when every lookup failed, which is
why this wrapper reads its JSON report instead of its exit status.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

UNREACHABLE_MARKERS = (
    "ConnectionError",
    "ConnectTimeout",
    "ReadTimeout",
    "NameResolutionError",
    "ServiceError",
)


def verdict(report: dict[str, Any], service: str) -> tuple[int, list[str]]:
    """Exit status and the lines to print for a pip-audit JSON report."""
    deps = report.get("dependencies", [])
    found = [
        f"{dep['name']} {dep['version']}: {vuln['id']} (fixed in {', '.join(vuln.get('fix_versions') or []) or 'no release yet'})"
        for dep in deps
        for vuln in dep.get("vulns") or []
    ]
    if found:
        return 1, [f"pip-audit: {len(found)} known vulnerabilities ({service}):", *found]
    unknown = sorted(
        dep["name"] for dep in deps if dep.get("skip_reason") and "editable" not in dep["skip_reason"]
    )
    audited = [dep for dep in deps if not dep.get("skip_reason")]
    if not audited:
        return 0, [
            f"WARNING: pip-audit: the {service} vulnerability service answered for none of {len(unknown)} "
            "installed packages (unreachable from here?); dependencies were NOT audited"
        ]
    line = f"pip-audit: {len(audited)} packages audited against {service}, no known vulnerabilities"
    return 0, [line + (f"; not known to the service: {', '.join(unknown)}" if unknown else "")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--service", choices=("pypi", "osv"), default="pypi")
    parser.add_argument("--timeout", type=int, default=15, help="seconds per request to the service")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "audit.json"
        done = subprocess.run(
            [sys.executable, "-m", "pip_audit", "--skip-editable", "--vulnerability-service", args.service,
             "--timeout", str(args.timeout), "--progress-spinner", "off", "--format", "json", "--output", str(out)],
            capture_output=True, text=True,
        )  # fmt: skip
        report = json.loads(out.read_text()) if out.exists() and out.stat().st_size else None
    if report is None:
        if any(marker in done.stderr for marker in UNREACHABLE_MARKERS):
            print(
                f"WARNING: pip-audit could not reach the {args.service} vulnerability service; "
                "dependencies were NOT audited"
            )
            return 0
        sys.stderr.write(done.stderr)
        print(f"pip-audit failed (exit {done.returncode}) without a report; see above", file=sys.stderr)
        return done.returncode or 1
    status, lines = verdict(report, args.service)
    print("\n".join(lines))
    return status


if __name__ == "__main__":
    sys.exit(main())
