"""Convert a saved adapter (diffusers `pytorch_lora_weights.safetensors`) for other tools.

"kohya" is the key layout of kohya-ss/sd-scripts LoRA files that AUTOMATIC1111's web UI and ComfyUI
load for SD 1.x/2.x: one module per `lora_unet_<diffusers path with '_' for '.'>` with
`.lora_down.weight` (A), `.lora_up.weight` (B) and a scalar `.alpha` (the update is scaled by
alpha / rank). diffusers' `load_lora_weights` reads that layout too, which is how it is tested.
SDXL files in that ecosystem use the original SGM block names instead; they are not produced here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

FORMATS = ("diffusers", "kohya")


def read_adapter(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata of a diffusers-format adapter file."""
    tensors: dict[str, Tensor] = {}
    with safe_open(str(path), framework="pt") as fh:
        metadata = dict(fh.metadata() or {})
        for key in fh.keys():  # noqa: SIM118 (safe_open is not iterable)
            tensors[key] = fh.get_tensor(key)
    return tensors, metadata


def adapter_alpha_and_rank(tensors: dict[str, Tensor], metadata: dict[str, str]) -> tuple[float, int]:
    """LoRA alpha and rank, from the peft config diffusers stores in the file (alpha = rank if absent)."""
    rank = next(v.shape[0] for k, v in tensors.items() if k.endswith("lora.down.weight") or ".lora_A." in k)
    config = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    alpha = config.get("unet.lora_alpha", rank)
    return float(alpha), int(rank)


def to_kohya(tensors: dict[str, Tensor], *, alpha: float) -> dict[str, Tensor]:
    """diffusers keys (`unet.<path>.lora.down.weight`) -> kohya keys, with an alpha per module."""
    out: dict[str, Tensor] = {}
    if any(key.startswith("transformer.") for key in tensors):
        raise ValueError(
            "this adapter is for an SD3/FLUX transformer; the kohya format covers SD 1.x/2.x UNet adapters "
            "only: export it with --format diffusers (stock load_lora_weights reads that file)"
        )
    for key, value in tensors.items():
        if not key.startswith("unet."):
            raise ValueError(f"unexpected key {key!r}: only UNet adapters are exported")
        for suffix, kohya in ((".lora.down.weight", "lora_down"), (".lora.up.weight", "lora_up")):
            if key.endswith(suffix):
                module = "lora_unet_" + key[len("unet.") : -len(suffix)].replace(".", "_")
                out[f"{module}.{kohya}.weight"] = value.contiguous()
                out[f"{module}.alpha"] = torch.tensor(float(alpha))
                break
        else:
            raise ValueError(f"unexpected key {key!r}: expected '.lora.down.weight' or '.lora.up.weight'")
    return out


def export_adapter(source: str | Path, out_dir: str | Path, fmt: str) -> Path:
    """Write the adapter at `source` into `out_dir` in `fmt`; returns the written file."""
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if fmt == "diffusers":
        # The published file already is the diffusers format: copy it byte for byte, so its sha256
        # stays the one recorded with the version.
        target = out_dir / "pytorch_lora_weights.safetensors"
        shutil.copyfile(source, target)
        return target
    tensors, metadata = read_adapter(source)
    alpha, rank = adapter_alpha_and_rank(tensors, metadata)
    target = out_dir / "densealign_lora_kohya.safetensors"
    kohya_meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
    }
    save_file(to_kohya(tensors, alpha=alpha), str(target), metadata=kohya_meta)
    return target
