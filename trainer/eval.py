"""`densealign eval --version N`: how often the faithfulness judge accepts a published version's samples.

Loads the base model from settings, hot-swaps version N's adapter (checked against its sha256),
samples one image per (prompt, seed) on fixed evaluation prompts and seeds, and prints the judge's
acceptance next to version 0's on the very same prompts and seeds.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="densealign eval", description=__doc__.splitlines()[0])
    parser.add_argument("--version", type=int, required=True, help="policy version (0 = the base model)")
    parser.add_argument("--prompts", type=int, default=64, help="evaluation prompts (one seed each)")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the sampler setting)")
    args = parser.parse_args(argv)
    from safetensors.torch import load

    from core.basemodel.evaluate import acceptance, eval_prompts
    from core.db import make_engine, make_session_factory
    from core.db.errors import DomainError
    from core.db.policies import get_policy_version
    from core.diffusion.sampler import SamplerSettings
    from core.settings import SettingsError, load_settings
    from core.storage import BlobCorrupt, LocalBlobStore, get_verified
    from worker.main import build_sampler

    try:
        settings = load_settings()
        with make_session_factory(make_engine(settings.database_url))() as session:
            row = get_policy_version(session=session, version=args.version)
            key, sha = row.lora_key, row.lora_sha256
        sampler = build_sampler(settings)
    except (SettingsError, DomainError, ValueError) as exc:
        print(f"densealign eval: {exc}", file=sys.stderr)
        return 2
    policy = sampler.policy
    sampler_settings = SamplerSettings(
        num_steps=args.steps or settings.sampler.num_steps, guidance_scale=settings.sampler.guidance_scale
    )
    prompts = eval_prompts(args.prompts)
    seeds = list(range(args.prompts))
    policy.reset_adapter()
    base = acceptance(policy.pipe, prompts, seeds, sampler_settings, progress=True)
    print(
        f"version 0: accepted {base.accepted}/{base.total} = {base.rate:.1%} (mean score {base.mean_score:.3f})"
    )
    if key is not None and sha is not None:
        try:
            data = get_verified(LocalBlobStore(settings.blob_dir), key, sha)
        except BlobCorrupt as exc:
            print(f"densealign eval: version {args.version}: {exc}", file=sys.stderr)
            return 2
        policy.hot_swap(load(data))
        result = acceptance(policy.pipe, prompts, seeds, sampler_settings, progress=True)
        print(
            f"version {args.version}: accepted {result.accepted}/{result.total} = {result.rate:.1%} "
            f"(mean score {result.mean_score:.3f})"
        )
    return 0
