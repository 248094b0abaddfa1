"""Runtime configuration: one pydantic-settings object read from `DENSEALIGN_*` environment variables.

Only entry points (the CLI, `create_app` callers, the worker and trainer mains) call `get_settings()`;
library code receives plain values. Nothing here reads the environment at import time.
"""

from __future__ import annotations

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every knob of a DenseAlign deployment; each field maps to `DENSEALIGN_<FIELD>`."""

    model_config = SettingsConfigDict(env_prefix="DENSEALIGN_", env_nested_delimiter="__", extra="ignore")

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
    host: str = Field(default="127.0.0.1", description="Interface `densealign serve` binds to.")
    port: int = Field(default=8000, gt=0, lt=65536, description="TCP port `densealign serve` listens on.")

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
    # Nested typed configs for the diffusion core go here (e.g. `dpo: DPOConfig`, `lora: LoraConfig`),
    # read from DENSEALIGN_DPO__BETA style variables via `env_nested_delimiter="__"`.

    @model_validator(mode="after")
    def _demo_cookie(self) -> Settings:
        # The demo serves plain HTTP on 127.0.0.1, where a Secure cookie would never come back.
        if self.demo and "cookie_secure" not in self.model_fields_set:
            self.cookie_secure = False
        return self

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
