"""Request (`XCreate`, `XUpdate`) and response (`XPublic`) bodies of the REST API."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from fastapi import Path
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool

Choice = Literal["a", "b", "tie", "skip"]
Side = Literal["a", "b"]
Split = Literal["train", "eval"]
Role = Literal["annotator", "admin"]
# Database ids are 32-bit: bounding them here turns an absurd id into a 422, not a database error.
MAX_ID = 2**31 - 1
IdPath = Annotated[int, Path(ge=1, le=MAX_ID)]
VersionPath = Annotated[int, Path(ge=0, le=MAX_ID)]


def decimal_range_pattern(high: int) -> str:
    """A regular expression (unanchored) for the integers 1..`high` written without leading zeros.

    For string parameters that carry ids, so the schema says exactly which values the app takes.
    """
    digits = str(high)
    # Fewer digits than `high`: anything not starting with 0.
    options = [f"[1-9][0-9]{{0,{len(digits) - 2}}}"] if len(digits) > 1 else []
    # As many digits: `high`'s first i digits, a smaller digit, then any digits.
    for i, digit in enumerate(digits):
        low = 1 if i == 0 else 0
        top = int(digit) - 1
        if top >= low:
            rest = len(digits) - i - 1
            smaller = str(low) if top == low else f"[{low}-{top}]"
            options.append(digits[:i] + smaller + (f"[0-9]{{{rest}}}" if rest else ""))
    options.append(digits)
    return "(?:" + "|".join(options) + ")"


def _not_a_bool(value: object) -> object:
    if isinstance(value, bool):
        raise ValueError("true/false is not a number")
    return value


# Request numbers as the schema types them: pydantic's lax mode reads JSON true as 1 (and, for
# booleans, 0 as false), which the schema calls invalid. 2.0 stays a valid integer, as in JSON Schema.
BodyInt = Annotated[int, BeforeValidator(_not_a_bool)]
BodyBool = StrictBool

# Pair ids separated by commas (no spaces), or nothing: GET /pairs/next?exclude=12,15.
ID_LIST_PATTERN = f"^(?:{decimal_range_pattern(MAX_ID)}(?:,{decimal_range_pattern(MAX_ID)})*)?$"
# What core.db.prompts accepts: no NUL, and a character that Python's str.split() does not count as
# white space. In the schema only, so a bad text keeps core's readable message (still a 422).
_PY_SPACE = r"\t\n\x0b\x0c\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
PROMPT_TEXT_PATTERN = rf"^[^\x00]*[^\x00{_PY_SPACE}][^\x00]*$"
PromptText = Annotated[
    str,
    Field(
        min_length=1,
        max_length=2000,
        json_schema_extra={"pattern": PROMPT_TEXT_PATTERN},
        description="The prompt the workers sample images for; runs of white space become one space.",
    ),
]


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
    text: PromptText
    split: Split = "train"


class PromptUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: PromptText | None = None
    split: Split | None = None
    active: BodyBool | None = None


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
    paused: bool = Field(
        default=False,
        description="true when no pairs are served to you because your measured agreement with the known "
        "answers and other labellers is below the deployment's threshold (DENSEALIGN_RELIABILITY__PAUSE_BELOW); "
        "`message` says so, and every judgement you made is kept.",
    )


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
    adapter_fused: bool | None = Field(
        default=None,
        description="Whether the worker sampled with the LoRA fused into the base weights: redraw with "
        "`load_lora_weights` then `fuse_lora()` (bit for bit in float32); false: `load_lora_weights` only.",
    )

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
    z0_seed: int | None = Field(
        default=None,
        description="Set on aligned pairs: the initial latents are `randn(shape, generator=torch.Generator("
        "generator_device).manual_seed(z0_seed))`, passed as `latents=`, and `seed`'s generator draws only "
        "the per-step noise. null: `seed`'s generator draws both, as the stock call does by default.",
    )
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
    pairing: str = Field(
        description="How the two sides were drawn: 'independent' (two seeds), 'aligned' (one z0_seed, two "
        "step-noise seeds) or 'same_seed' (an evaluation pair: one seed, two versions)."
    )
    gold: Side | None = Field(default=None, description="The known answer an admin marked, if any.")
    a: TrajectorySamplingPublic
    b: TrajectorySamplingPublic


class JudgementCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pair_id: BodyInt = Field(ge=1, le=MAX_ID)
    choice: Choice = Field(description="'a' or 'b' (the preferred trajectory), 'tie', or 'skip'.")
    client_key: str = Field(
        min_length=8,
        max_length=64,
        pattern=r"^[A-Za-z0-9_-]+$",
        description="A fresh random key per judgement (e.g. a UUID); resend the same key only to retry.",
    )
    decide_ms: BodyInt | None = Field(default=None, ge=0, le=86_400_000, description="Time to decide, in ms.")


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
    version: BodyInt = Field(
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
    ability: float | None = Field(
        description="P(their a/b vote names the better side): a one-coin Dawid-Skene fit over votes on pairs "
        "others also decided and on gold pairs; null without such votes."
    )
    ability_low: float | None = Field(description="95% interval of `ability`, low end.")
    ability_high: float | None = Field(description="95% interval of `ability`, high end.")
    ability_votes: int = Field(description="Votes the ability is measured on (overlapped or gold pairs).")
    gold_votes: int = Field(description="Of those, votes on gold pairs (a known answer).")


class GoldMark(BaseModel):
    model_config = ConfigDict(extra="forbid")
    answer: Side | None = Field(
        description="The better side, 'a' or 'b', as the pair's known answer; null unmarks it."
    )
    judgements: int | None = Field(
        default=None,
        ge=1,
        le=1000,
        description="Judgements the pair should collect, so several labellers are scored on it (kept "
        "if already higher); default: unchanged.",
    )


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
    active: BodyBool | None = Field(
        default=None, description="false deactivates (ending their sessions and token use); true reactivates."
    )
    role: Role | None = Field(default=None, description="'admin' promotes, 'annotator' demotes.")


class LabellerPublic(Public):
    id: int
    name: str
    role: str
    active: bool
    created_at: dt.datetime


class CampaignCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: BodyInt = Field(ge=0, le=MAX_ID, description="The version under evaluation.")
    baseline_version: BodyInt = Field(
        default=0, ge=0, le=MAX_ID, description="The version it is compared with (0 = the base model)."
    )
    target_votes: BodyInt = Field(default=200, ge=1, le=1_000_000, description="Votes to collect.")
    judgements_per_pair: BodyInt = Field(
        default=1, ge=1, le=100, description="Votes per evaluation pair, each by a different person."
    )
    prompt_split: Literal["eval", "train"] = Field(
        default="eval", description="Prompts to evaluate on: held-out (`eval`) or trained (`train`)."
    )


class CampaignPublic(Public):
    id: int
    version: int
    baseline_version: int
    status: Literal["running", "done", "stopped"]
    origin: Literal["publish", "admin"]
    target_votes: int
    judgements_per_pair: int
    prompt_split: Literal["eval", "train"]
    created_at: dt.datetime
    finished_at: dt.datetime | None
    votes: int = 0
    wins: int = 0
    losses: int = 0
    ties: int = 0
    prompts: int = Field(default=0, description="Distinct prompts with votes.")
    win_rate: float | None = Field(default=None, description="(wins + ties / 2) / votes for `version`.")
    low: float | None = Field(
        default=None, description="95% interval, lower end (the wider of the two below)."
    )
    high: float | None = None
    wilson: list[float] | None = Field(default=None, description="95% Wilson interval, votes independent.")
    bootstrap: list[float] | None = Field(
        default=None, description="95% interval resampling prompts (2 or more prompts)."
    )
    verdict: Literal["better", "worse", "undecided", "no votes"] = "no votes"
    summary: str = Field(default="", description="The result in one sentence.")
    promote_on_win: bool = Field(
        default=False, description="The gate: `version` becomes current if it wins this campaign."
    )
    promotion: str | None = Field(default=None, description="What the gate decided when the campaign ended.")


class VersionScorePublic(BaseModel):
    version: int
    score: float = Field(description="Bradley-Terry log-strength; version 0 = 0.")
    low: float
    high: float
    votes: int
    win_rate_vs_base: float = Field(description="The modelled chance this version beats version 0.")


class VersionEvaluationPublic(BaseModel):
    version: int
    campaigns: list[CampaignPublic]
    score: VersionScorePublic | None = Field(
        default=None, description="None while no vote links the version to version 0."
    )
