"""A round's pairs come back from one query with the winner and loser the labellers chose, whichever side
won, with both trajectories' latents keys (what the trainer loads), against the real database."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import event
from sqlalchemy.orm import Session

from core.db.models import Pair, Prompt
from core.db.pairs import create_pair, create_trajectory
from core.db.training import PreferencePair, record_round_pairs, round_preference_pairs, start_training_round


def test_round_pairs_read_winner_and_loser_of_either_side_in_one_query(
    session: Session, prompt: Prompt, policy_version: object
) -> None:
    def trajectory(seed: int) -> int:
        row = create_trajectory(
            session=session,
            prompt_id=prompt.id,
            policy_version=0,
            seed=seed,
            image_key=f"images/{seed}.png",
            sampler={"steps": 2},
            latents_key=f"latents/{seed}.safetensors",
        )
        return row.id

    a_wins = create_pair(session=session, trajectory_a_id=trajectory(1), trajectory_b_id=trajectory(2))
    b_wins = create_pair(session=session, trajectory_a_id=trajectory(3), trajectory_b_id=trajectory(4))

    def decided(pair: Pair, winner: int, loser: int, votes: int) -> PreferencePair:
        return PreferencePair(pair.id, prompt.text, 0, winner, loser, votes)

    round_ = start_training_round(session=session, base_version=0)
    record_round_pairs(
        session=session,
        round_id=round_.id,
        pairs=[
            decided(a_wins, a_wins.trajectory_a_id, a_wins.trajectory_b_id, 3),
            decided(b_wins, b_wins.trajectory_b_id, b_wins.trajectory_a_id, 1),
        ],
    )
    statements: list[str] = []
    listen: Callable[..., None] = lambda conn, cursor, statement, *args: statements.append(statement)  # noqa: E731
    engine = session.get_bind()
    event.listen(engine, "before_cursor_execute", listen)
    try:
        got = round_preference_pairs(session=session, round_id=round_.id)
    finally:
        event.remove(engine, "before_cursor_execute", listen)
    assert len(statements) == 1, statements
    assert [(p.pair_id, p.prompt, p.votes) for p in got] == [
        (a_wins.id, prompt.text, 3),
        (b_wins.id, prompt.text, 1),
    ]
    by_side = {p.pair_id: p for p in got}
    a, b = by_side[a_wins.id], by_side[b_wins.id]
    assert (a.winner_trajectory_id, a.loser_trajectory_id) == (a_wins.trajectory_a_id, a_wins.trajectory_b_id)
    assert (a.winner_latents_key, a.loser_latents_key) == ("latents/1.safetensors", "latents/2.safetensors")
    assert (b.winner_trajectory_id, b.loser_trajectory_id) == (b_wins.trajectory_b_id, b_wins.trajectory_a_id)
    assert (b.winner_latents_key, b.loser_latents_key) == ("latents/4.safetensors", "latents/3.safetensors")
    assert a.sampler is not None and a.sampler == b.sampler
