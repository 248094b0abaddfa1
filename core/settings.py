"""Runtime configuration: one pydantic-settings object read from `DENSEALIGN_*` environment variables.

Only entry points (the CLI, `create_app` callers, the worker and trainer mains) call `get_settings()`;
library code receives plain values. Nothing here reads the environment at import time.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, IPvAnyNetwork, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.blob_stores import parse_blob_url


class ModelConfig(BaseModel):
    """The base model and the shape of the trainable adapter (workers and trainer must agree)."""

    base_model: str = Field(
        default="stable-diffusion-v1-5/stable-diffusion-v1-5",
        description="Diffusers hub id or local folder of a Stable Diffusion 1.x/2.x, SDXL, SD3/SD3.5 or FLUX.1 "
        "pipeline (the family follows from its pipeline class); `tiny:sd`, `tiny:sdxl`, `tiny:sd3`, `tiny:flux` "
        "are random tiny models for tests. Offline (HF_HUB_OFFLINE=1) a hub id must already be cached.",
    )
    device: str = Field(
        default="auto", description="torch device for workers and trainer; auto = cuda if present."
    )
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        default="float32", description="dtype of the frozen base weights; LoRA weights are always float32."
    )
    lora_rank: int = Field(default=4, ge=1, description="LoRA rank r (paper: 4 for one prompt, 32 for many).")
    lora_alpha: float | None = Field(
        default=None, gt=0, description="LoRA alpha; the update is scaled by alpha / rank. Empty = rank."
    )
    lora_targets: tuple[str, ...] = Field(
        default=("to_q", "to_k", "to_v", "to_out.0"),
        min_length=1,
        description="Denoiser sub-modules (UNet, or SD3/FLUX transformer) that carry the adapter; default: "
        "every attention projection.",
    )


class SamplerConfig(BaseModel):
    """How workers sample trajectories; recorded with each trajectory and reused by training."""

    num_steps: int = Field(
        default=50, ge=1, le=1000, description="Sampling steps N per trajectory (paper: 50 DDIM steps)."
    )
    guidance_scale: float = Field(default=7.5, ge=0, description="Classifier-free guidance w (paper: 7.5).")
    eta: float = Field(
        default=1.0,
        gt=0,
        description="Per-step noise level. SD/SDXL: DDIM eta, 1.0 = DDPM posterior variance (paper). SD3/FLUX: "
        "the SDE noise level a of Flow-GRPO (it trains SD3.5 with 0.7); 0 would be the stock ODE, with no "
        "log-density.",
    )
    image_size: int | None = Field(
        default=None,
        ge=8,
        multiple_of=8,
        description="Image side in pixels; empty = the model's native size.",
    )
    fuse_adapter: bool = Field(
        default=True,
        description="Workers sample with the LoRA written into the base weights (W0 + scale * B @ A): "
        "plain layers, ~10% faster on CPU; images differ from unfused sampling by float rounding, and a "
        "stock pipeline redraws them with `load_lora_weights` then `fuse_lora()`. Off = the LoRA layers "
        "run unfused, as after a plain `load_lora_weights`. The trainer never fuses.",
    )


class DpoConfig(BaseModel):
    """Discounted dense-reward DPO (METHOD.md); defaults are the paper's single-prompt column. The
    trainer's rounds and `core.diffusion.training.train_step` use this object as it is."""

    beta: float = Field(default=10.0, gt=0, description="beta multiplying the weighted clipped log-ratios.")
    gamma: float = Field(
        default=0.9, gt=0, le=1, description="Discount on step i (0 = noisiest); 1.0 = trajectory-level DPO."
    )
    clip: float = Field(
        default=1e-4, gt=0, description="Clip eps on each step log-ratio (mean-reduced units)."
    )
    sampled_steps: int = Field(default=3, ge=1, description="Steps M drawn per trajectory from the weights.")
    exact: bool = Field(
        default=False,
        description="Evaluate all N steps of each trajectory with the exact weighted loss instead of "
        "sampling M (N / M times the compute; for checks, not production).",
    )
    lr: float = Field(default=3e-5, gt=0, description="AdamW learning rate for the LoRA weights.")
    weight_decay: float = Field(default=2e-3, ge=0, description="AdamW decoupled weight decay.")
    lr_schedule: Literal["constant", "cosine"] = Field(
        default="constant",
        description="Learning rate over a round's steps: `constant` (lr), or `cosine` from lr down to "
        "lr_final_ratio x lr at the round's last step, starting again at lr each round.",
    )
    lr_final_ratio: float = Field(
        default=0.1, gt=0, le=1, description="Where the cosine schedule ends, as a fraction of lr."
    )
    max_grad_norm: float = Field(default=1.0, gt=0, description="Gradient-norm clip over the LoRA weights.")
    pairs_per_step: int = Field(default=4, ge=1, description="Labelled pairs per optimizer step (paper: 4).")
    steps_per_round: int = Field(default=100, ge=1, description="Optimizer steps per training round.")
    min_new_pairs: int = Field(
        default=32, ge=1, description="Decided pairs not yet trained on that start a new round."
    )
    max_version_lag: int = Field(
        default=2,
        ge=0,
        description="Train only on pairs sampled at most this many versions before the current.",
    )
    checkpoint_every: int = Field(
        default=20, ge=1, description="Optimizer steps between resumable checkpoints."
    )
    poll_seconds: float = Field(
        default=5.0, gt=0, description="How often the idle trainer checks for labels."
    )
    collective_timeout_seconds: float = Field(
        default=600.0,
        gt=0,
        description="Data-parallel trainer (torchrun, WORLD_SIZE > 1): seconds a rank waits for the others "
        "in a collective (gradient all-reduce, rank 0's next round) before it fails, so a dead rank stops "
        "the rest within this long and the round resumes from its checkpoint at the next start. It must "
        "cover the ranks' differences in model loading and rank 0's idle polls.",
    )
    seed: int = Field(default=0, description="Seed of the step-index and pair sampling in training.")
    max_round_trajectories_mb: float = Field(
        default=1024.0,
        ge=0,
        description="MiB a round's trajectories may take in the trainer's memory, read once for the round "
        "(SD 1.5 at 512 px and 50 steps: 1.6 MiB each, 204 MiB for 64 pairs); a larger round reads each "
        "step's pairs from the blob store.",
    )
    reference_cache_mb: float = Field(
        default=512.0,
        ge=0,
        description="MiB of the frozen reference model's step means kept across a round's optimizer steps "
        "(least recently used dropped first; SD 1.5 at 512 px: 64 KiB per trajectory step); 0 keeps none.",
    )
    label_weighting: Literal["majority", "reliability"] = Field(
        default="majority",
        description="Which side of a pair wins and how much it counts: `majority` (the strict majority of "
        "its votes, weight 1) or `reliability` (votes weighed by each labeller's measured reliability, a "
        "Dawid-Skene fit over overlapped and gold pairs; weight abs(2 P(a better) - 1)).",
    )


class PoolConfig(BaseModel):
    """The pool of unlabelled pairs workers keep ready so annotators never wait."""

    target_per_prompt: int = Field(
        default=4, ge=1, description="Unlabelled pairs (queued jobs included) kept per active prompt."
    )
    tick_seconds: float = Field(default=10.0, gt=0, description="Period of the refill tick, in seconds.")
    pairs_per_job: int = Field(
        default=8,
        ge=1,
        le=256,
        description="Pairs one sampling job draws in a single batched pass (2x as many images); larger "
        "batches raise pairs/s until the accelerator is full.",
    )
    job_retries: int = Field(default=3, ge=0, description="Times a failed sampling job is retried.")
    pairing: Literal["independent", "aligned"] = Field(
        default="independent",
        description="How a pair's two images are drawn: `independent` (two fresh seeds) or `aligned` (one "
        "initial noise z_0, different per-step noise: one layout, different details). Recorded on "
        "each pair; see docs/results.md for what each buys per label.",
    )


class ReliabilityConfig(BaseModel):
    """Labellers' measured reliability (core/reliability.py): how often it is refreshed, and pausing."""

    pause_below: float | None = Field(
        default=None,
        gt=0.0,
        lt=1.0,
        description="Pause a labeller (no new pairs; they see why; nothing they did is lost) while even "
        "the upper end of their ability's 95% interval is below this (0..1, e.g. 0.6); unset = never.",
    )
    pause_min_votes: int = Field(
        default=20,
        ge=1,
        description="Votes on overlapped or gold pairs a labeller's ability must rest on before it can "
        "pause them.",
    )
    refresh_seconds: float = Field(
        default=60.0,
        gt=0,
        description="How often the trainer refits every labeller's ability and stores it (the labellers "
        "page fits afresh on each view).",
    )


class RetentionConfig(BaseModel):
    """What happens to blobs nothing will read again (core/retention.py; `densealign storage`)."""

    drop_trained_latents: bool = Field(
        default=False,
        description="Delete a trajectory's latents (its .safetensors blob, the bulk of the store) once every "
        "pair it is in was trained by a finished round, which no later round can take again; its image "
        "stays. The trainer prunes after each published version; `densealign storage prune` does it by hand.",
    )
    keep_rounds: int = Field(
        default=0,
        ge=0,
        description="The newest N finished rounds keep their pairs' latents even when dropping is on (to "
        "inspect or re-run recent rounds); 0 = keep none.",
    )


class EvalConfig(BaseModel):
    """Human evaluation campaigns: blind A/B votes of a version against a comparison version."""

    share: float = Field(
        default=0.1,
        ge=0.0,
        le=1.0,
        description="Share of the pairs served to annotators that are evaluation pairs, while a campaign "
        "runs (0..1); they look exactly like training pairs and are never trained on.",
    )
    auto_votes: int = Field(
        default=200,
        ge=0,
        description="Votes an evaluation campaign collects when a version is published (started "
        "automatically against `compare_with`); 0 = start campaigns by hand only.",
    )
    compare_with: Literal["base", "previous"] = Field(
        default="base",
        description="What an automatic campaign compares a new version with: `base` (version 0) or "
        "`previous` (the version it was trained from: did this round help?).",
    )
    judgements_per_pair: int = Field(
        default=1,
        ge=1,
        description="Votes wanted per evaluation pair, each by a different person (more distinct pairs "
        "per vote tell more about the version than repeat votes on the same pair).",
    )
    prompt_split: Literal["eval", "train"] = Field(
        default="eval",
        description="Prompts evaluation pairs are drawn from: `eval` (held out, never trained on) or "
        "`train` (how well the trained prompts improved; not a held-out measure).",
    )
    pool_pairs: int = Field(
        default=8,
        ge=1,
        description="Evaluation pairs (queued jobs included) kept ready per running campaign.",
    )
    promote_if_wins: bool = Field(
        default=False,
        description="Gate: a new version becomes current only once its campaign against the current version "
        "ends with the 95% interval above 50%; until then (or if it does not) it stays published but not "
        "current, and the dashboard says why.",
    )


class Settings(BaseSettings):
    """Every knob of a DenseAlign deployment; each field maps to `DENSEALIGN_<FIELD>`."""

    # An empty variable means "unset" for optional fields (e.g. DENSEALIGN_MODEL__LORA_ALPHA=).
    model_config = SettingsConfigDict(
        env_prefix="DENSEALIGN_", env_nested_delimiter="__", extra="ignore", env_parse_none_str=""
    )

    # -- storage and services ------------------------------------------------------------------
    database_url: str = Field(
        default="sqlite:///./var/densealign.db",
        description="SQLAlchemy URL of the source-of-truth database; use postgresql+psycopg://... in "
        "production and a sqlite:/// file for the embedded single-machine mode.",
    )
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        description="URL of the Redis server that holds the job queue and notifications (never labels).",
    )
    blob_dir: str = Field(
        default="./var/blobs",
        description="Directory of the local blob store that holds latents, log-probs, images and LoRA files.",
    )
    blob_url: str | None = Field(
        default=None,
        description="Blob store in an S3-compatible bucket, s3://bucket/prefix (endpoint and credentials from "
        "AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION); file:///path is a "
        "local directory. Empty = the directory DENSEALIGN_BLOB_DIR.",
    )

    # -- web app and auth ----------------------------------------------------------------------
    secret_key: SecretStr | None = Field(
        default=None,
        description="Secret used to sign session cookies; required unless `demo` is true, in which case a "
        "random per-process key is used and sessions do not survive a restart.",
    )
    demo: bool = Field(
        default=False,
        description="Demo mode: allows starting without a secret key; never enable on a public host.",
    )
    cookie_secure: bool = Field(
        default=True,
        description="Mark the session cookie Secure (sent over HTTPS only); turn off only for plain-HTTP "
        "local use. Defaults to off in demo mode unless set explicitly.",
    )
    session_max_age_seconds: int = Field(
        default=14 * 24 * 3600, gt=0, description="Lifetime of a browser session cookie, in seconds."
    )
    invite_ttl_hours: int = Field(
        default=72,
        gt=0,
        description="How long a one-time invite link stays valid after an admin creates it, in hours.",
    )
    public_base_url: str = Field(
        default="http://127.0.0.1:8000",
        description="Externally visible base URL of the app, used to build invite links and export image "
        "URLs; no trailing slash.",
    )
    max_body_bytes: int = Field(
        default=1_000_000,
        gt=0,
        description="Largest request body the app accepts, in bytes (bulk prompt imports included); larger "
        "bodies get 413.",
    )
    login_rate_per_minute: float = Field(
        default=10.0,
        gt=0,
        description="Login attempts (token logins and invite acceptances) each client address may make per "
        "minute, per app process, after its burst; more get 429 with Retry-After.",
    )
    login_burst: int = Field(
        default=10,
        ge=1,
        description="Login attempts a client address may make at once before the rate applies.",
    )
    judgement_rate_per_minute: float = Field(
        default=120.0,
        gt=0,
        description="Judgements each labeller may post per minute, per app process, after their burst; more "
        "get 429 with Retry-After.",
    )
    judgement_burst: int = Field(
        default=60, ge=1, description="Judgements a labeller may post at once before the rate applies."
    )
    trusted_proxies: tuple[IPvAnyNetwork, ...] = Field(
        default=(),
        description="Reverse proxies in front of the app, as a JSON list of addresses or networks (e.g. "
        '`["10.0.0.0/8"]`); only a request from one of them has its X-Forwarded-For believed, and its client '
        "is the right-most address there that is not itself a trusted proxy (login rate limit, access log). "
        "Empty: the header is ignored and the peer address is the client.",
    )
    host: str = Field(default="127.0.0.1", description="Interface `densealign serve` binds to.")
    port: int = Field(default=8000, gt=0, lt=65536, description="TCP port `densealign serve` listens on.")

    heartbeat_seconds: float = Field(
        default=10.0,
        gt=0,
        description="How often each worker and trainer records its state and version in the database (the "
        "dashboard and `densealign health` read it), in seconds.",
    )

    # -- labelling -----------------------------------------------------------------------------
    lease_seconds: int = Field(
        default=120,
        gt=0,
        description="How long a pair handed to one labeller stays reserved for them, in seconds; after that "
        "another labeller may be given it.",
    )
    overlap_k: int = Field(
        default=1,
        ge=1,
        description="Judgements wanted per pair for ordinary pairs, each by a distinct labeller.",
    )
    overlap_share: float = Field(
        default=0.1,
        ge=0.0,
        le=1.0,
        description="Fraction of new pairs (0..1) that get `agreement_k` judgements instead of `overlap_k`, "
        "to measure agreement between labellers.",
    )
    agreement_k: int = Field(
        default=3, ge=1, description="Judgements wanted per pair for the agreement-measuring share of pairs."
    )
    undo_window_seconds: int = Field(
        default=15,
        ge=0,
        description="How long after a judgement its labeller may still undo it (the U key), in seconds.",
    )

    # -- algorithm configs ---------------------------------------------------------------------
    # Nested typed configs, read from DENSEALIGN_DPO__BETA style variables (`env_nested_delimiter`).
    model: ModelConfig = Field(
        default_factory=lambda: ModelConfig(),
        description="The base model and the LoRA adapter's shape (DENSEALIGN_MODEL__<FIELD>).",
    )
    sampler: SamplerConfig = Field(
        default_factory=lambda: SamplerConfig(),
        description="How workers sample trajectories (DENSEALIGN_SAMPLER__<FIELD>).",
    )
    dpo: DpoConfig = Field(
        default_factory=lambda: DpoConfig(),
        description="The training loss, optimizer and round schedule (DENSEALIGN_DPO__<FIELD>).",
    )
    pool: PoolConfig = Field(
        default_factory=lambda: PoolConfig(),
        description="The pool of unlabelled pairs kept ready for annotators (DENSEALIGN_POOL__<FIELD>).",
    )

    eval: EvalConfig = Field(
        default_factory=lambda: EvalConfig(),
        description="Human evaluation campaigns: blind votes of a version against another "
        "(DENSEALIGN_EVAL__<FIELD>).",
    )
    reliability: ReliabilityConfig = Field(
        default_factory=lambda: ReliabilityConfig(),
        description="Labellers' measured reliability, and pausing the unreliable "
        "(DENSEALIGN_RELIABILITY__<FIELD>).",
    )
    retention: RetentionConfig = Field(
        default_factory=lambda: RetentionConfig(),
        description="Blob retention: dropping latents no round will read again (DENSEALIGN_RETENTION__<FIELD>).",
    )

    @model_validator(mode="after")
    def _demo_cookie(self) -> Settings:
        # The demo serves plain HTTP on 127.0.0.1, where a Secure cookie would never come back.
        if self.demo and "cookie_secure" not in self.model_fields_set:
            self.cookie_secure = False
        return self

    @field_validator("blob_url")
    @classmethod
    def _check_blob_url(cls, value: str | None) -> str | None:
        if value:
            parse_blob_url(value)  # InvalidBlobUrl (a ValueError) names what is wrong
        return value or None

    @model_validator(mode="after")
    def _check_overlap(self) -> Settings:
        if self.agreement_k < self.overlap_k:
            raise ValueError(
                f"agreement_k={self.agreement_k} is smaller than overlap_k={self.overlap_k}; the agreement "
                "share must ask for at least as many judgements as ordinary pairs"
            )
        return self


def get_settings() -> Settings:
    """Read settings from the environment now (call from entry points only)."""
    return Settings()


class SettingsError(ValueError):
    """Settings that cannot run; the message is one line naming each variable and what to fix."""


def load_settings(**overrides: object) -> Settings:
    """`Settings()` for entry points, with validation errors turned into one readable line."""
    from pydantic import ValidationError

    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = [str(part) for part in err["loc"]]
            name = "DENSEALIGN_" + "__".join(loc).upper()
            problems.append(f"{name}={err.get('input')!r}: {err['msg']}")
        raise SettingsError("invalid settings: " + "; ".join(problems)) from None
