"""Every blob key DenseAlign writes, in one place: the layout of the blob store.

```
trajectories/v{version}/p{prompt}/{id}.safetensors   a sampled trajectory's latents (worker)
images/v{version}/p{prompt}/{id}.png                  its decoded image (worker)
images/eval/c{campaign}/v{version}/p{prompt}/{id}.png an evaluation pair's image (no latents kept)
policies/v{version}/pytorch_lora_weights.safetensors  a published adapter, diffusers format (trainer)
policies/v{version}/optimizer.pt                      the optimizer state the next round starts from
rounds/{round}/checkpoint.pt                          a running round's resumable checkpoint
```

Rows in the database hold the keys they point at (and a sha256 where the content is checked), so
a key is written once, when its blob is; these functions are for writers and the orphan sweep.
"""

from __future__ import annotations

import uuid

# What workers write before they insert the rows that point at it (core.sweep removes what a killed
# job left behind under these prefixes).
SAMPLED_PREFIXES = ("trajectories", "images")
# The file name diffusers' `load_lora_weights(folder)` looks for.
ADAPTER_FILE = "pytorch_lora_weights.safetensors"


def _unique() -> str:
    return uuid.uuid4().hex


def trajectory(version: int, prompt_id: int) -> tuple[str, str]:
    """(latents key, image key) for a new training trajectory; both share one fresh stem."""
    stem = f"v{version}/p{prompt_id}/{_unique()}"
    return f"trajectories/{stem}.safetensors", f"images/{stem}.png"


def eval_image(campaign_id: int, version: int, prompt_id: int) -> str:
    return f"images/eval/c{campaign_id}/v{version}/p{prompt_id}/{_unique()}.png"


def adapter(version: int) -> str:
    return f"policies/v{version}/{ADAPTER_FILE}"


def optimizer(version: int) -> str:
    return f"policies/v{version}/optimizer.pt"


def round_checkpoint(round_id: int) -> str:
    return f"rounds/{round_id}/checkpoint.pt"
