from __future__ import annotations

import subprocess
import sys


def test_app_starts_without_torch_or_core_diffusion() -> None:
    code = (
        "import sys; from app.main import create_app; from core.settings import Settings;"
        "create_app(Settings(database_url='sqlite://', demo=True));"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'core.diffusion')));"
        "print(','.join(bad))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""
