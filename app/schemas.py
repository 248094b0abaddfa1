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
    active: bool


class LabellerPublic(Public):
    id: int
    name: str
    role: str
    active: bool
    created_at: dt.datetime
