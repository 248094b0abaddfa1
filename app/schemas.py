"""Request (`XCreate`, `XUpdate`) and response (`XPublic`) bodies of the REST API."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from fastapi import Path
from pydantic import BaseModel, ConfigDict, Field

Choice = Literal["a", "b", "tie", "skip"]
Side = Literal["a", "b"]
Split = Literal["train", "eval"]
Role = Literal["annotator", "admin"]
# Database ids are 32-bit: bounding them here turns an absurd id into a 422, not a database error.
MAX_ID = 2**31 - 1
IdPath = Annotated[int, Path(ge=1, le=MAX_ID)]
VersionPath = Annotated[int, Path(ge=0, le=MAX_ID)]


class Public(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class ErrorPublic(BaseModel):
    detail: str = Field(description="What was wrong with the request, and how to fix it.")


class FieldErrorPublic(BaseModel):
    loc: list[str] = Field(description="Where the bad value is, e.g. ['body', 'choice'].")
    msg: str
    type: str


class ValidationErrorPublic(ErrorPublic):
    """The body of every 422: `detail` is one readable line, `errors` the same per field."""

    errors: list[FieldErrorPublic] = Field(
        default_factory=list, description="Per-field errors; empty when a domain rule refused the request."
    )


class HealthPublic(BaseModel):
    status: Literal["ok"]
    database: Literal["ok"]


class PromptCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(min_length=1, max_length=2000, description="The prompt the workers sample images for.")
    split: Split = "train"


class PromptUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str | None = Field(default=None, min_length=1, max_length=2000)
    split: Split | None = None
    active: bool | None = None


class PromptPublic(Public):
    id: int
    text: str
    split: str
    active: bool
    created_at: dt.datetime


class ImagePublic(BaseModel):
    side: Side = Field(description="Which trajectory of the pair this image is ('a' or 'b').")
    url: str


class PairAssignmentPublic(BaseModel):
    pair_id: int
    prompt: str
    policy_version: int
    left: ImagePublic = Field(description="The image to show on the left; its `side` is recorded.")
    right: ImagePublic
    lease_expires_at: dt.datetime


class NextPairPublic(BaseModel):
    pair: PairAssignmentPublic | None = Field(description="null when nothing is waiting for you.")
    message: str | None = None


class PromptRefPublic(BaseModel):
    id: int
    text: str


class SchedulerPublic(BaseModel):
    class_name: str = Field(description="The diffusers scheduler class, e.g. 'DDIMScheduler'.")
    config: dict[str, Any] = Field(
        description="Its config, as `DDIMScheduler.from_config(config)` takes it (x0 clipping off)."
    )


class SamplerRecordPublic(BaseModel):
    """How a trajectory was drawn, as the worker recorded it; null where an older row lacks a field."""

    num_steps: int | None = Field(default=None, description="DDIM steps (`num_inference_steps`).")
    guidance_scale: float | None = None
    eta: float | None = Field(default=None, description="DDIM eta, passed to the pipeline call as `eta`.")
    height: int | None = Field(default=None, description="Pixels; null = the model's native size.")
    width: int | None = None
    negative_prompt: str | None = None
    base_model: str | None = Field(
        default=None, description="Hub id or folder the worker loaded (`from_pretrained` argument)."
    )
    pipeline: str | None = Field(default=None, description="e.g. 'StableDiffusionPipeline'.")
    dtype: str | None = Field(default=None, description="The weights' dtype, e.g. 'float32'.")
    generator_device: str | None = Field(
        default=None, description="Device of the seeded torch.Generator ('cpu' or 'cuda'): noise differs."
    )
    scheduler: SchedulerPublic | None = None

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> SamplerRecordPublic:
        """Pick the known keys of a stored record (older rows hold fewer, or other, keys)."""
        known = {name: record[name] for name in cls.model_fields if name in record}
        if not isinstance(known.get("scheduler"), dict):
            known.pop("scheduler", None)
        return cls.model_validate(known)


class TrajectorySamplingPublic(BaseModel):
    trajectory_id: int
    seed: int = Field(description="`torch.Generator(generator_device).manual_seed(seed)`; up to 63 bits.")
    policy_version: int = Field(description="0 = the base model; later versions add their LoRA.")
    image_url: str
    sampler: SamplerRecordPublic


class PairPublic(BaseModel):
    """A pair and its sampling record (admins): enough to redraw both images outside DenseAlign."""

    id: int
    prompt: PromptRefPublic
    policy_version: int
    created_at: dt.datetime
    required_judgements: int
    judgement_count: int = Field(description="Judgements stored for the pair so far.")
    a: TrajectorySamplingPublic
    b: TrajectorySamplingPublic


class JudgementCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pair_id: int = Field(ge=1, le=MAX_ID)
    choice: Choice = Field(description="'a' or 'b' (the preferred trajectory), 'tie', or 'skip'.")
    client_key: str = Field(
        min_length=8,
        max_length=64,
        pattern=r"^[A-Za-z0-9_-]+$",
        description="A fresh random key per judgement (e.g. a UUID); resend the same key only to retry.",
    )
    decide_ms: int | None = Field(default=None, ge=0, le=86_400_000, description="Time to decide, in ms.")


class JudgementPublic(Public):
    id: int
    pair_id: int
    labeller_id: int
    choice: str
    shown_left: str
    decide_ms: int | None
    created_at: dt.datetime


class MePublic(BaseModel):
    id: int
    name: str
    role: str
    today: int
    total: int


class PolicyVersionPublic(Public):
    version: int
    parent_version: int | None
    lora_sha256: str | None
    metrics: dict[str, Any]
    created_at: dt.datetime
    current: bool = False


class CurrentPolicyUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = Field(
        ge=0, le=MAX_ID, description="The version workers should sample with (older = rollback)."
    )


class LabellerStatsPublic(BaseModel):
    labeller_id: int
    name: str
    role: str
    active: bool
    judgements: int
    agreement: float | None
    overlapped: int
    left_share: float | None


class StatsPublic(BaseModel):
    queue_depth: int
    labels_per_hour: list[int] = Field(description="Judgements in each of the last 24 hours, oldest first.")
    judgements_total: int
    pairs_total: int
    labellers: list[LabellerStatsPublic]


class InviteCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=100, pattern=r"^[\w .@-]+$")
    role: Role = "annotator"


class InvitePublic(BaseModel):
    name: str
    role: str
    url: str = Field(description="One-time link; share it with the labeller. Shown only once.")
    expires_at: dt.datetime


class LabellerUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    active: bool | None = Field(
        default=None, description="false deactivates (ending their sessions and token use); true reactivates."
    )
    role: Role | None = Field(default=None, description="'admin' promotes, 'annotator' demotes.")


class LabellerPublic(Public):
    id: int
    name: str
    role: str
    active: bool
    created_at: dt.datetime
