"""`densealign export --version N --format diffusers|kohya --out DIR`: write a published adapter to disk.

The adapter is read from the blob store and checked against the sha256 recorded with its version
before anything is written. diffusers: `pytorch_lora_weights.safetensors` for
`pipeline.load_lora_weights(DIR)`; kohya: `densealign_lora_kohya.safetensors` for A1111 / ComfyUI.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from core.blob_stores import open_blob_store
from core.db import make_engine, make_session_factory
from core.db.errors import DomainError
from core.db.policies import get_policy_version
from core.diffusion.export import export_adapter
from core.settings import SettingsError, load_settings
from core.storage import BlobNotFound, get_verified


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="densealign export", description=__doc__.splitlines()[0])
    parser.add_argument("--version", type=int, required=True, help="policy version to export (>= 1)")
    parser.add_argument("--format", choices=["diffusers", "kohya"], default="diffusers")
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    args = parser.parse_args(argv)

    try:
        settings = load_settings()
        with make_session_factory(make_engine(settings.database_url))() as session:
            row = get_policy_version(session=session, version=args.version)
            key, sha = row.lora_key, row.lora_sha256
        if key is None or sha is None:
            raise SettingsError(f"version {args.version} is the base model: it has no adapter to export")
        data = get_verified(open_blob_store(settings.blob_url, settings.blob_dir), key, sha)
        with tempfile.TemporaryDirectory() as tmp:
            source = Path(tmp) / "adapter.safetensors"
            source.write_bytes(data)
            target = export_adapter(source, args.out, args.format)
    except (SettingsError, DomainError, BlobNotFound, ValueError) as exc:
        print(f"densealign export: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {target} (version {args.version}, {args.format} format)")
    return 0
