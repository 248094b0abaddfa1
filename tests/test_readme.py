"""The README stays true: its two commands exist, and it lists every setting with its default."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel

from core.settings import Settings
from densealign.cli import COMMANDS

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def setting_names(model: type[BaseModel], prefix: str = "DENSEALIGN_") -> list[str]:
    names = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names += setting_names(annotation, f"{prefix}{name.upper()}__")
        else:
            names.append(f"{prefix}{name.upper()}")
    return names


def test_readme_lists_every_setting():
    missing = [name for name in setting_names(Settings) if f"`{name}`" not in README]
    assert not missing, f"README lacks {missing}; regenerate the table with scripts/settings_table.py"


def test_readme_commands_exist():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    for target in ("demo", "test"):
        assert f"make {target}" in README
        assert re.search(rf"^{target}:", makefile, re.MULTILINE), f"Makefile has no {target} target"
    for command in set(re.findall(r"densealign ([a-z-]+)", README)):
        assert command in COMMANDS, f"README mentions `densealign {command}`, which does not exist"
