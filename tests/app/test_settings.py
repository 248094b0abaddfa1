from __future__ import annotations

import pytest
from pydantic import ValidationError

from core.settings import Settings


def test_every_field_documents_itself() -> None:
    for name, field in Settings.model_fields.items():
        assert field.description and field.description.endswith("."), name


def test_reads_prefixed_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DENSEALIGN_DATABASE_URL", "postgresql+psycopg://db/x")
    monkeypatch.setenv("DENSEALIGN_LEASE_SECONDS", "45")
    monkeypatch.setenv("DENSEALIGN_SECRET_KEY", "s3cret")
    settings = Settings()
    assert (settings.database_url, settings.lease_seconds) == ("postgresql+psycopg://db/x", 45)
    assert settings.secret_key is not None and settings.secret_key.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(settings)


def test_demo_turns_secure_cookie_off_unless_asked() -> None:
    assert Settings(demo=True).cookie_secure is False
    assert Settings(demo=True, cookie_secure=True).cookie_secure is True
    assert Settings().cookie_secure is True


def test_invalid_values_are_named() -> None:
    with pytest.raises(ValidationError, match="agreement_k=1 is smaller than overlap_k=2"):
        Settings(overlap_k=2, agreement_k=1)
    with pytest.raises(ValidationError, match="lease_seconds"):
        Settings(lease_seconds=0)
