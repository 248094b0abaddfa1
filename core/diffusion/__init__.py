"""The diffusion policy: the only package that imports torch, diffusers and peft.

Modules: `ddim` (one DDIM step and its Gaussian log-density), `sampler` (trajectories with every
latent recorded), `loss` (discounted dense-reward DPO), `policy` (base pipeline + LoRA adapter,
reference = adapters disabled, hot-swap) and `models` (loading, and tiny offline models for tests).
"""
