"""Print the Markdown table of every DENSEALIGN_* setting (name, default, meaning) for the README.

Usage: python scripts/settings_table.py  (tests/test_readme.py checks the README lists them all)
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pydantic import BaseModel  # noqa: E402

from core.settings import Settings  # noqa: E402


def rows(model: type[BaseModel], prefix: str) -> list[tuple[str, Any, str]]:
    out = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            out += rows(annotation, f"{prefix}{name.upper()}__")
            continue
        default = field.get_default(call_default_factory=True)
        if hasattr(default, "get_secret_value"):
            default = "(secret)"
        out.append((f"{prefix}{name.upper()}", default, field.description or ""))
    return out


def main() -> None:
    print("| variable | default | what it sets |")
    print("|---|---|---|")
    for name, default, description in rows(Settings, "DENSEALIGN_"):
        shown = "" if default is None else (",".join(default) if isinstance(default, tuple) else default)
        print(f"| `{name}` | `{shown}` | {description} |")


if __name__ == "__main__":
    main()
