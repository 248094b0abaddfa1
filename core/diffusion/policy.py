"""The policy: a pipeline plus one trainable LoRA adapter (peft) on its denoiser: the UNet of SD/SDXL,
the transformer of SD3/FLUX (`models.denoiser`).

- The reference policy pi_ref is the same UNet with the adapter disabled (`Policy.reference()`), so
  no second copy of the base weights is kept; a test checks it equals the base model exactly.
- `save_adapter` writes diffusers-format `pytorch_lora_weights.safetensors` (keys prefixed `unet.`
  in diffusers' UNet naming, or `transformer.` in peft naming as diffusers' SD3/FLUX training scripts
  write them; the peft config in the file's metadata) that a stock `pipeline.load_lora_weights(folder)`
  loads unchanged; the write is atomic and returns the file's sha256.
- `hot_swap` copies a saved adapter's tensors into the live LoRA parameters in place: no pipeline
  reload, no new modules. It refuses a file whose keys or shapes (e.g. rank) do not match.
- `fuse()` (workers only; the trainer never calls it) turns on fused sampling: each adapted layer's
  weight becomes W0 + scale * B @ A, so a sampling step runs plain Linear layers with no LoRA
  matmuls (unfused, the adapter costs ~9.5% of a step on CPU, even at version 0 where B = 0). The
  original W0 tensors are kept and never written: the fused weight lives in a separate buffer and a
  layer's `weight.data` points at one or the other, so every swap restores W0 exactly (peft's
  `unmerge` subtracts, which is not exact) and version 0 is W0 itself, with no copy and no add.
  Each layer is marked merged in peft (`merged_adapters`), so peft's forward calls the base layer
  alone. The delta is peft's own `get_delta_weight` added to W0 in float32, the expression
  diffusers' `fuse_lora()` computes, so a stock pipeline with `load_lora_weights` + `fuse_lora()`
  draws the fused worker's images bit for bit (unfused ones differ from them by float rounding).
  While fused, `reference()` points the layers at W0 (exact, no copy), and a forward pass with
  gradients is refused: it would reach no LoRA parameter, so training would silently do nothing.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file
from torch import Tensor

from core.diffusion.models import FLOW_FAMILIES, Family, Pipeline, denoiser, family_of, load_pipeline
from core.storage import BlobStore, get_verified

if TYPE_CHECKING:
    from core.settings import ModelConfig

ADAPTER = "densealign"
WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# The attention projections of every UNet attention block (self- and cross-attention), as in the paper.
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class AdapterMismatchError(ValueError):
    """A saved adapter does not fit the policy's LoRA layout (another model family, rank or target modules)."""


@dataclass(frozen=True)
class LoraSettings:
    """Shape of the trainable adapter."""

    # LoRA rank r: 4 for one prompt, 32 for many prompts in the paper.
    rank: int = 4
    # LoRA alpha; the update is scaled by alpha / rank. None = rank (scale 1).
    alpha: float | None = None
    # Names of the denoiser's sub-modules that get an adapter (peft `target_modules`); the default, the
    # attention projections, exists in the UNet and in SD3's and FLUX's transformer blocks alike.
    target_modules: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be > 0 (or None for alpha = rank), got {self.alpha}")
        if not self.target_modules:
            raise ValueError("LoRA target_modules must name at least one module")

    def peft_config(self) -> LoraConfig:
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha if self.alpha is not None else self.rank,
            init_lora_weights=True,  # A random, B zero: the policy starts equal to the reference
            target_modules=list(self.target_modules),
        )


class Policy:
    """A pipeline whose denoiser carries one trainable LoRA adapter; everything else is frozen."""

    def __init__(self, pipe: Pipeline, lora: LoraSettings | None = None) -> None:
        self.pipe = pipe
        self.lora = lora or LoraSettings()
        self.family: Family = family_of(pipe)
        self.denoiser: Any = denoiser(pipe)
        # the adapter file's key prefix (diffusers' component name)
        self.component = "transformer" if self.family in FLOW_FAMILIES else "unet"
        encoders = ("text_encoder", "text_encoder_2", "text_encoder_3")
        for module in (self.denoiser, pipe.vae, *(getattr(pipe, name, None) for name in encoders)):
            if module is not None:
                module.requires_grad_(False)
        self.denoiser.add_adapter(self.lora.peft_config(), adapter_name=ADAPTER)
        # LoRA weights stay float32 whatever the base dtype (as diffusers' training scripts do), so
        # AdamW's small updates are not rounded away in fp16; peft casts activations to match.
        for name, param in self.denoiser.named_parameters():
            if ".lora_" in name:
                param.data = param.data.to(torch.float32)
        self._param_by_key = {
            name.replace(f".{ADAPTER}.", "."): param
            for name, param in self.denoiser.named_parameters()
            if ".lora_" in name
        }
        if not self._param_by_key:
            raise ValueError(
                f"no {self.component} module matched LoRA target_modules {self.lora.target_modules}"
            )
        for param in self._param_by_key.values():
            param.requires_grad_(True)
        self._layers: list[Any] = [
            m for m in self.denoiser.modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A
        ]
        self._fused: _FusedWeights | None = None

    @property
    def fused(self) -> bool:
        """Whether sampling runs with the adapter written into the base weights (see `fuse`)."""
        return self._fused is not None

    def fuse(self) -> None:
        """Sample with the adapter fused from now on; every later swap re-fuses. Idempotent.

        Costs one buffer per adapted layer, the size and dtype of its weight. Call it once the
        pipeline is on its device: W0 and the buffers stay where they were made.
        """
        if self._fused is not None:
            return
        weights = [layer.get_base_layer().weight for layer in self._layers]
        self._fused = _FusedWeights(
            base=[w.data for w in weights],
            buffers=[torch.empty_like(w.data) for w in weights],
            hook=self.denoiser.register_forward_pre_hook(_refuse_gradients),
        )
        self._write_fused()

    def unfuse(self) -> None:
        """Back to the trainable path: base weights W0 exactly, the LoRA matmuls in every forward."""
        if self._fused is None:
            return
        for layer, w0 in zip(self._layers, self._fused.base, strict=True):
            layer.get_base_layer().weight.data = w0
            layer.merged_adapters.clear()
        self._fused.hook.remove()
        self._fused = None

    def _write_fused(self) -> None:
        """Point each adapted layer at W0 + delta (a fresh sum into its buffer) or, where B = 0, at W0."""
        assert self._fused is not None
        fused = self._fused
        with torch.no_grad():
            for layer, w0, buffer in zip(self._layers, fused.base, fused.buffers, strict=True):
                weight = layer.get_base_layer().weight
                if bool(layer.lora_B[ADAPTER].weight.any()):
                    # the sum diffusers' fuse_lora makes (`weight.data += get_delta_weight`), not in place
                    torch.add(w0, layer.get_delta_weight(ADAPTER), out=buffer)
                    weight.data = buffer
                else:
                    weight.data = w0
                # peft's forward runs the base layer alone for a merged layer
                layer.merged_adapters[:] = [ADAPTER]

    def lora_parameters(self) -> list[torch.nn.Parameter]:
        return list(self._param_by_key.values())

    @contextmanager
    def reference(self) -> Iterator[None]:
        """Run the block as pi_ref: the base denoiser with the adapter switched off."""
        if self._fused is not None:
            # peft's disable_adapters would unmerge by subtraction; point the layers at W0 instead
            weights = [layer.get_base_layer().weight for layer in self._layers]
            fused = [w.data for w in weights]
            for w, w0 in zip(weights, self._fused.base, strict=True):
                w.data = w0
            try:
                yield
            finally:
                for w, data in zip(weights, fused, strict=True):
                    w.data = data
            return
        self.denoiser.disable_adapters()
        try:
            yield
        finally:
            self.denoiser.enable_adapters()

    def lora_state(self) -> dict[str, Tensor]:
        """A CPU copy of the live LoRA tensors (peft key names), which `hot_swap` accepts back."""
        return {key: param.detach().to("cpu").clone() for key, param in self._param_by_key.items()}

    def adapter_state_dict(self) -> dict[str, Tensor]:
        """The adapter as the stock loaders take it, without the component prefix: diffusers' key format
        for a UNet, peft's for a transformer (what diffusers' SD3/FLUX training scripts save)."""
        peft_sd = get_peft_model_state_dict(self.denoiser, adapter_name=ADAPTER)
        if self.component == "unet":
            peft_sd = convert_state_dict_to_diffusers(peft_sd)
        return {k: v.detach().to("cpu").contiguous() for k, v in peft_sd.items()}

    def save_adapter(self, folder: str | Path) -> tuple[Path, str]:
        """Write `folder/pytorch_lora_weights.safetensors` atomically; returns (path, sha256 hex)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        metadata = self.denoiser.peft_config[ADAPTER].to_dict()
        with tempfile.TemporaryDirectory(dir=folder, prefix=".tmp-lora-") as tmp:
            type(self.pipe).save_lora_weights(
                tmp,
                weight_name=WEIGHT_NAME,
                **{
                    f"{self.component}_lora_layers": self.adapter_state_dict(),
                    f"{self.component}_lora_adapter_metadata": metadata,
                },
            )
            written = Path(tmp) / WEIGHT_NAME
            with open(written, "rb+") as fh:
                os.fsync(fh.fileno())
            target = folder / WEIGHT_NAME
            os.replace(written, target)
        return target, file_sha256(target)

    def hot_swap(self, source: str | Path | dict[str, Tensor], *, expected_sha256: str | None = None) -> None:
        """Copy a saved adapter's weights into the live LoRA parameters, in place.

        `source` is a folder holding pytorch_lora_weights.safetensors, that file, or a state dict in
        the file's format (keys with or without the `unet.` / `transformer.` prefix).
        """
        state = self._read_adapter(source, expected_sha256)
        other = "transformer" if self.component == "unet" else "unet"
        if any(key.startswith(f"{other}.") for key in state):
            raise AdapterMismatchError(
                f"this adapter was trained on a {other} ({'SD3/FLUX' if other == 'transformer' else 'SD/SDXL'}) "
                f"model; this process runs a {self.family} model: point DENSEALIGN_MODEL__BASE_MODEL at the "
                "base model the adapter was trained on"
            )
        if set(state) != set(self._param_by_key):
            missing = sorted(set(self._param_by_key) - set(state))[:3]
            extra = sorted(set(state) - set(self._param_by_key))[:3]
            raise AdapterMismatchError(
                f"adapter keys do not match this policy's LoRA layout (target_modules "
                f"{self.lora.target_modules}): missing e.g. {missing}, unexpected e.g. {extra}"
            )
        for key, value in state.items():
            param = self._param_by_key[key]
            if param.shape != value.shape:
                raise AdapterMismatchError(
                    f"adapter tensor {key} has shape {tuple(value.shape)} but the policy's is "
                    f"{tuple(param.shape)}: the adapter was trained with another LoRA rank than {self.lora.rank}"
                )
        with torch.no_grad():
            for key, value in state.items():
                self._param_by_key[key].copy_(value)
        if self._fused is not None:
            self._write_fused()

    def load_published(
        self,
        blobs: BlobStore,
        lora_key: str | None,
        lora_sha256: str | None,
        *,
        family: str | None = None,
        version: int | None = None,
    ) -> None:
        """Load a published version's adapter from the blob store, checked against the sha256 recorded
        with the version (`BlobCorrupt` names the blob otherwise); no key = version 0, the base model.
        `family`: the model family the version records (None: not recorded, older versions); another
        family than this policy's is refused before anything is read. The one way workers, the trainer
        and `densealign eval` load a version."""
        if family is not None and family != self.family:
            raise AdapterMismatchError(
                f"policy version {version if version is not None else '?'} was trained on a {family} model, "
                f"but this process runs a {self.family} model: set DENSEALIGN_MODEL__BASE_MODEL to the base "
                "model the deployment trains (workers and trainer must agree)"
            )
        if lora_key is None:
            self.reset_adapter()
            return
        if lora_sha256 is None:
            raise ValueError(f"adapter {lora_key!r} has no recorded sha256; it cannot be checked")
        self.hot_swap(load_safetensors(get_verified(blobs, lora_key, lora_sha256)))

    def reset_adapter(self) -> None:
        """Make the policy equal to the base model again (version 0): zero every LoRA B matrix."""
        with torch.no_grad():
            for key, param in self._param_by_key.items():
                if ".lora_B." in key:
                    param.zero_()
        if self._fused is not None:
            self._write_fused()

    def _read_adapter(
        self, source: str | Path | dict[str, Tensor], expected_sha256: str | None
    ) -> dict[str, Tensor]:
        if isinstance(source, dict):
            raw = source
        else:
            path = Path(source)
            if path.is_dir():
                path = path / WEIGHT_NAME
            if not path.is_file():
                raise FileNotFoundError(
                    f"no adapter at {str(path)!r}: expected a {WEIGHT_NAME} or its folder"
                )
            if expected_sha256 is not None and file_sha256(path) != expected_sha256:
                raise ValueError(
                    f"adapter {str(path)!r} does not match its sha256 {expected_sha256}: file corrupt"
                )
            raw = load_file(str(path))
        prefix = f"{self.component}."
        stripped = {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in raw.items()}
        if self.component == "unet":
            return convert_unet_state_dict_to_peft(stripped)
        return stripped


@dataclass
class _FusedWeights:
    """What fused sampling keeps per adapted layer, in `Policy._layers` order."""

    base: list[Tensor]  # W0, never written
    buffers: list[Tensor]  # W0 + delta of the adapter last fused
    hook: torch.utils.hooks.RemovableHandle  # refuses gradient passes


def _refuse_gradients(_module: Any, _args: Any) -> None:
    if torch.is_grad_enabled():
        raise RuntimeError(
            "this policy samples with its adapter fused (Policy.fuse): a forward pass with gradients "
            "would reach no LoRA parameter; train an unfused Policy (or call unfuse() first)"
        )


def policy_from_config(model: ModelConfig) -> Policy:
    """Load the base model and attach the adapter the settings describe (workers and trainer alike)."""
    device = model.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = load_pipeline(model.base_model, device=device, dtype=getattr(torch, model.dtype))
    lora = LoraSettings(rank=model.lora_rank, alpha=model.lora_alpha, target_modules=model.lora_targets)
    return Policy(pipe, lora)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
