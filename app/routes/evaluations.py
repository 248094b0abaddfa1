"""Human evaluation campaigns over REST: start, stop, read results and per-version scores."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from sqlalchemy.orm import Session

from app.charts import interval_chart
from app.deps import CurrentAdmin, CurrentLabeller, SessionDep
from app.responses import ADMIN, AUTH, BEARER, NOT_FOUND, WRITE, error
from app.schemas import (
    CampaignCreate,
    CampaignPublic,
    IdPath,
    VersionEvaluationPublic,
    VersionPath,
    VersionScorePublic,
)
from core.db.campaigns import (
    campaign_results,
    eval_prompt_ids,
    get_campaign,
    list_campaigns,
    start_campaign,
    stop_campaign,
    version_scores,
)
from core.db.models import EvalCampaign
from core.db.policies import get_policy_version
from core.eval_stats import Score, WinRate, figures
from core.settings import Settings

router = APIRouter(tags=["evaluations"], dependencies=[BEARER])


def describe(campaign: EvalCampaign, result: WinRate) -> str:
    """The result in one sentence, saying plainly when the interval includes 50%."""
    ours, theirs = f"version {campaign.version}", f"version {campaign.baseline_version}"
    said = figures(result)
    if said is None:
        return f"no votes yet (0 of {campaign.target_votes})"
    if result.verdict == "better":
        return f"{ours} is preferred to {theirs}: {said}"
    if result.verdict == "worse":
        return f"{theirs} is preferred to {ours}: {said}"
    still = " yet" if campaign.status == "running" else ""
    return f"no clear preference between {ours} and {theirs}{still}: {said}; the interval includes 50%"


def campaign_public(campaign: EvalCampaign, result: WinRate) -> CampaignPublic:
    public = CampaignPublic.model_validate(campaign)
    public.votes, public.wins, public.losses, public.ties = (
        result.votes,
        result.wins,
        result.losses,
        result.ties,
    )
    public.prompts, public.win_rate, public.low, public.high = (
        result.prompts,
        result.rate,
        result.low,
        result.high,
    )
    public.wilson = list(result.wilson) if result.wilson else None
    public.bootstrap = list(result.bootstrap) if result.bootstrap else None
    public.verdict = result.verdict  # type: ignore[assignment]
    public.summary = describe(campaign, result)
    return public


def score_public(score: Score) -> VersionScorePublic:
    return VersionScorePublic(
        version=score.version,
        score=score.score,
        low=score.low,
        high=score.high,
        votes=score.votes,
        win_rate_vs_base=score.win_rate_vs_anchor,
    )


@router.get("/evaluations", response_model=list[CampaignPublic], responses=AUTH)
def list_evaluations(session: SessionDep, _: CurrentLabeller) -> list[CampaignPublic]:
    """Every evaluation campaign, oldest first, with its votes and win rate."""
    rows = list_campaigns(session=session)
    results = campaign_results(session=session, campaigns=rows)
    return [campaign_public(row, results[row.id]) for row in rows]


@router.post(
    "/evaluations",
    response_model=CampaignPublic,
    status_code=201,
    responses=ADMIN
    | {404: error("No such version (or baseline version).")}
    | {409: error("A campaign of the same two versions is running, or there are no prompts to evaluate on.")}
    | WRITE,
)
def create_evaluation(body: CampaignCreate, session: SessionDep, admin: CurrentAdmin) -> CampaignPublic:
    """Start a blind evaluation of `version` against `baseline_version` (admin)."""
    row = start_campaign(
        session=session,
        version=body.version,
        baseline_version=body.baseline_version,
        target_votes=body.target_votes,
        judgements_per_pair=body.judgements_per_pair,
        prompt_split=body.prompt_split,
        origin="admin",
        created_by_id=admin.id,
    )
    session.commit()
    return campaign_public(row, campaign_results(session=session, campaigns=[row])[row.id])


@router.get("/evaluations/scores", response_model=list[VersionScorePublic], responses=AUTH)
def evaluation_scores(session: SessionDep, _: CurrentLabeller) -> list[VersionScorePublic]:
    """A Bradley-Terry score per version from all campaigns' votes (version 0 = 0), with intervals."""
    return [score_public(s) for s in version_scores(session=session)]


@router.get("/evaluations/{campaign_id}", response_model=CampaignPublic, responses=AUTH | NOT_FOUND)
def read_evaluation(campaign_id: IdPath, session: SessionDep, _: CurrentLabeller) -> CampaignPublic:
    row = get_campaign(session=session, campaign_id=campaign_id)
    return campaign_public(row, campaign_results(session=session, campaigns=[row])[row.id])


@router.post(
    "/evaluations/{campaign_id}/stop",
    response_model=CampaignPublic,
    responses=ADMIN | NOT_FOUND | {409: error("The campaign is not running.")} | WRITE,
)
def stop_evaluation(campaign_id: IdPath, session: SessionDep, _: CurrentAdmin) -> CampaignPublic:
    """End a running campaign now (admin); its votes are kept."""
    row = stop_campaign(session=session, campaign_id=campaign_id)
    session.commit()
    return campaign_public(row, campaign_results(session=session, campaigns=[row])[row.id])


@router.get(
    "/policies/{version}/evaluation", response_model=VersionEvaluationPublic, responses=AUTH | NOT_FOUND
)
def version_evaluation(
    version: VersionPath, session: SessionDep, _: CurrentLabeller
) -> VersionEvaluationPublic:
    """The campaigns that evaluated `version` and its Bradley-Terry score."""
    get_policy_version(session=session, version=version)
    rows = list_campaigns(session=session, version=version)
    results = campaign_results(session=session, campaigns=rows)
    score = next((s for s in version_scores(session=session) if s.version == version), None)
    return VersionEvaluationPublic(
        version=version,
        campaigns=[campaign_public(row, results[row.id]) for row in rows],
        score=score_public(score) if score else None,
    )


def evaluation_panel(session: Session, settings: Settings) -> dict[str, Any]:
    """What the dashboard shows of the campaigns: a chart, a table of each, and scores per version."""
    rows = list_campaigns(session=session)
    results = campaign_results(session=session, campaigns=rows)
    campaigns = [campaign_public(row, results[row.id]) for row in reversed(rows)]
    chart_rows = [
        (f"v{c.version} vs v{c.baseline_version} (#{c.id})", c.win_rate, c.low, c.high)
        for c in reversed(campaigns)
        if c.votes
    ]
    return {
        "eval_campaigns": campaigns,
        "eval_chart": interval_chart(chart_rows),
        "eval_scores": [score_public(s) for s in version_scores(session=session)],
        "eval_prompts": len(eval_prompt_ids(session=session, split="eval")),
        "eval_settings": settings.eval,
    }
