"""Domain errors raised by the query functions. Each message names the offending value and the fix.

The three categories let the web layer pick a status code without core knowing about HTTP.
"""

from __future__ import annotations


class DomainError(Exception):
    """Base of every error a query function raises on bad input or a forbidden state change."""


class InvalidInput(DomainError, ValueError):
    """A value outside its domain (a choice not in a/b/tie/skip, an empty prompt...)."""


class NotFound(DomainError):
    pass


class Conflict(DomainError):
    pass


class NotAllowed(DomainError):
    pass


class PairNotFound(NotFound):
    def __init__(self, pair_id: int) -> None:
        super().__init__(f"pair {pair_id} does not exist; ask GET /api/v1/pairs/next for a pair to judge")


class PairNotLeased(NotAllowed):
    def __init__(self, pair_id: int, labeller_id: int) -> None:
        super().__init__(
            f"pair {pair_id} is not leased to labeller {labeller_id}; judge only pairs handed to you by "
            "GET /api/v1/pairs/next"
        )


class AlreadyJudged(Conflict):
    def __init__(self, pair_id: int, labeller_id: int) -> None:
        super().__init__(
            f"labeller {labeller_id} already judged pair {pair_id}; undo that judgement first to change it"
        )


class PairComplete(Conflict):
    def __init__(self, pair_id: int) -> None:
        super().__init__(
            f"pair {pair_id} already has all the judgements it needs (your lease on it had run out); "
            "nothing was stored: take the next pair from GET /api/v1/pairs/next"
        )


class ClientKeyReused(Conflict):
    def __init__(self, client_key: str) -> None:
        super().__init__(
            f"client_key {client_key!r} was already used for a different judgement; use a fresh key per "
            "judgement and repeat a key only to retry the same one"
        )


class JudgementNotFound(NotFound):
    def __init__(self, judgement_id: int) -> None:
        super().__init__(f"judgement {judgement_id} does not exist or is not yours")


class UndoWindowPassed(NotAllowed):
    def __init__(self, judgement_id: int, window_seconds: int) -> None:
        super().__init__(
            f"judgement {judgement_id} is older than the {window_seconds} s undo window; it stays recorded"
        )


class PromptNotFound(NotFound):
    def __init__(self, prompt_id: int) -> None:
        super().__init__(f"prompt {prompt_id} does not exist; list prompts with GET /api/v1/prompts")


class LabellerNotFound(NotFound):
    def __init__(self, labeller_id: int) -> None:
        super().__init__(f"labeller {labeller_id} does not exist")


class LabellerNameTaken(Conflict):
    def __init__(self, name: str) -> None:
        super().__init__(f"a labeller named {name!r} already exists; choose another name")


class CannotChangeOwnAdmin(Conflict):
    def __init__(self, name: str) -> None:
        super().__init__(
            f"labeller {name!r} is you: an admin cannot deactivate or demote their own account; ask another "
            "admin to do it"
        )


class LastActiveAdmin(Conflict):
    def __init__(self, name: str) -> None:
        super().__init__(
            f"labeller {name!r} is the last active admin; make another labeller an admin first (PATCH "
            '/api/v1/labellers/ID with {"role": "admin"}, or `densealign invite NAME --role admin`), then retry'
        )


class NotAnActiveAdmin(NotAllowed):
    def __init__(self, name: str) -> None:
        super().__init__(
            f"labeller {name!r} is no longer an active admin (another admin changed the account meanwhile); "
            "nothing was changed"
        )


class InviteInvalid(NotAllowed):
    def __init__(self) -> None:
        super().__init__("this invite link is unknown, already used or expired; ask an admin for a new one")


class PolicyVersionNotFound(NotFound):
    def __init__(self, version: int) -> None:
        super().__init__(f"policy version {version} does not exist; list versions with GET /api/v1/policies")


class PolicyVersionExists(Conflict):
    def __init__(self, version: int) -> None:
        super().__init__(f"policy version {version} already exists; published versions are immutable")


class NoCurrentPolicy(NotFound):
    def __init__(self) -> None:
        super().__init__(
            "no policy version is current yet; run `densealign migrate`, which records version 0 (the base model)"
        )


class PairInvalid(DomainError):
    """A pair whose trajectories do not belong together (different prompt or policy version)."""


class UndoBlocked(Conflict):
    def __init__(self, judgement_id: int) -> None:
        super().__init__(
            f"judgement {judgement_id} cannot be undone: its pair is being judged by someone else right now"
        )


class BaseHasNoLora(NotFound):
    def __init__(self) -> None:
        super().__init__("policy version 0 is the base model and has no LoRA; download version 1 or later")


class LatentsPruned(Conflict):
    """A trajectory's latents were deleted by retention (core/retention.py); its row and image remain."""

    def __init__(self, trajectory_id: int, key: str | None, pruned_at: object) -> None:
        super().__init__(
            f"trajectory {trajectory_id}'s latents ({key}) were pruned at {pruned_at} "
            "(DENSEALIGN_RETENTION__DROP_TRAINED_LATENTS) and cannot be read; only pairs no round can take "
            "again are pruned, so whatever asked for them is reading a finished round's pairs"
        )
        self.trajectory_id = trajectory_id
