"""Persistence: SQLAlchemy models, the session factory and keyword-only query functions.

Query functions take the session first and keyword-only arguments, flush but never commit (the
caller owns the transaction), and raise `core.db.errors` on bad input.
"""

from core.db.base import Base
from core.db.engine import make_engine, make_session_factory

__all__ = ["Base", "make_engine", "make_session_factory"]
