"""Prompts: the text the workers sample pairs for."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.db.errors import InvalidInput, PromptNotFound
from core.db.models import SPLITS, Prompt

MAX_PROMPT_CHARS = 2000


def _clean(text: str) -> str:
    if "\x00" in text:
        raise InvalidInput("prompt text contains a NUL character; remove it")
    cleaned = " ".join(text.split())
    if not cleaned:
        raise InvalidInput("prompt text is empty; give at least one non-space character")
    if len(cleaned) > MAX_PROMPT_CHARS:
        raise InvalidInput(f"prompt text has {len(cleaned)} characters; the limit is {MAX_PROMPT_CHARS}")
    return cleaned


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise InvalidInput(f"split {split!r} is not one of {', '.join(SPLITS)}")


def add_prompt(*, session: Session, text: str, split: str = "train") -> Prompt:
    _check_split(split)
    prompt = Prompt(text=_clean(text), split=split, active=True)
    session.add(prompt)
    session.flush()
    return prompt


def import_prompts(*, session: Session, lines: Iterable[str], split: str = "train") -> list[Prompt]:
    """Add one prompt per non-blank line, skipping texts that already exist; returns the new ones.

    Every line is validated before anything is added, so a bad line writes nothing.
    """
    _check_split(split)
    texts: list[str] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            texts.append(_clean(line))
        except InvalidInput as exc:
            raise InvalidInput(f"line {number}: {exc}") from None
    existing = set(session.scalars(select(Prompt.text).where(Prompt.text.in_(texts)))) if texts else set()
    added: list[Prompt] = []
    for text in dict.fromkeys(texts):
        if text not in existing:
            prompt = Prompt(text=text, split=split, active=True)
            session.add(prompt)
            added.append(prompt)
    session.flush()
    return added


def get_prompt(*, session: Session, prompt_id: int) -> Prompt:
    prompt = session.get(Prompt, prompt_id)
    if prompt is None:
        raise PromptNotFound(prompt_id)
    return prompt


def list_prompts(
    *,
    session: Session,
    active: bool | None = None,
    split: str | None = None,
    limit: int = 1000,
    offset: int = 0,
) -> list[Prompt]:
    query = select(Prompt).order_by(Prompt.id).limit(limit).offset(offset)
    if active is not None:
        query = query.where(Prompt.active.is_(active))
    if split is not None:
        query = query.where(Prompt.split == split)
    return list(session.scalars(query))


def update_prompt(
    *,
    session: Session,
    prompt_id: int,
    text: str | None = None,
    split: str | None = None,
    active: bool | None = None,
) -> Prompt:
    prompt = get_prompt(session=session, prompt_id=prompt_id)
    if text is not None:
        prompt.text = _clean(text)
    if split is not None:
        _check_split(split)
        prompt.split = split
    if active is not None:
        prompt.active = active
    session.flush()
    return prompt
