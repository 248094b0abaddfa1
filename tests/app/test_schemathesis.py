"""Property-based API tests: schemathesis generates requests from the app's own OpenAPI schema.

Every API operation is called, in process (ASGI, no network), on the real scratch Postgres, both
anonymously and with an admin's bearer token. Whatever the input, the app must answer without a 5xx,
with a documented content type, and with a body that matches the schema for its status code.
Examples are bounded and derandomized so the run is short (well under a minute here) and repeatable.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

from app.schemas import ValidationErrorPublic
from core.db.models import Labeller, Pair
from core.db.policies import publish_policy_version
from core.storage import LocalBlobStore

CHECKS = [not_a_server_error, content_type_conformance, response_schema_conformance]
# Function-scoped fixtures are fine here: every example runs on the same rolled-back test session.
BOUNDED = settings(
    max_examples=20, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), database=None
)


@pytest.fixture
def admin_with_token(make_labeller: Callable[..., tuple[Labeller, str]]) -> tuple[Labeller, str]:
    return make_labeller("root", role="admin")


@pytest.fixture
def api_schema(
    app: FastAPI, pair_with_images: Pair, blob_store: LocalBlobStore, admin_with_token: tuple[Labeller, str]
) -> schemathesis.BaseSchema:
    # Some rows for generated ids to hit: a pair with images, a published version with its LoRA file.
    lora_sha256 = blob_store.put("loras/1.safetensors", b"lora bytes")
    session = app.state.session_factory()
    publish_policy_version(
        session=session, version=1, parent_version=0, lora_key="loras/1.safetensors", lora_sha256=lora_sha256
    )
    return schemathesis.openapi.from_asgi("/api/v1/openapi.json", app)


def _keeps_admin(case: schemathesis.Case, admin: Labeller) -> bool:
    """False for a request that would deactivate the admin the test authenticates as."""
    return not (
        case.operation.path == "/labellers/{labeller_id}"
        and (case.path_parameters or {}).get("labeller_id") == admin.id
    )


def fuzz(
    schema: schemathesis.BaseSchema, headers: dict[str, str], skip: Callable[[schemathesis.Case], bool]
) -> int:
    """Run valid and invalid examples of every operation; returns how many operations ran."""
    # schemathesis' own pytest plugin (`from_fixture`) does not work under pytest 9, so each operation's
    # strategy is driven by Hypothesis directly.
    operations = [result.ok() for result in schema.get_all_operations()]
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @BOUNDED
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case: schemathesis.Case) -> None:
                if not skip(case):
                    case.call_and_validate(headers=headers, checks=CHECKS)

            try:
                run()
            except Unsatisfiable:
                # Nothing to make invalid (an operation with no parameters and no body).
                assert mode is GenerationMode.NEGATIVE, operation.label
    return len(operations)


def test_anonymous(api_schema: schemathesis.BaseSchema) -> None:
    assert fuzz(api_schema, {}, lambda case: False) == 21


def test_admin(api_schema: schemathesis.BaseSchema, admin_with_token: tuple[Labeller, str]) -> None:
    admin, token = admin_with_token
    assert (
        fuzz(api_schema, {"Authorization": f"Bearer {token}"}, lambda case: not _keeps_admin(case, admin))
        == 21
    )


def test_422_is_documented_with_the_shape_it_is_sent_in(admin_client: TestClient) -> None:
    # Regression: FastAPI documented 422 as a list under `detail`; app.errors sends a string + `errors`.
    spec = admin_client.get("/api/v1/openapi.json").json()
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    refs = {
        operation["responses"]["422"]["content"]["application/json"]["schema"]["$ref"]
        for path in spec["paths"].values()
        for operation in path.values()
        if "422" in operation["responses"]
    }
    assert refs == {"#/components/schemas/ValidationErrorPublic"}
    sent = admin_client.get("/api/v1/prompts", params={"limit": "many"})
    assert sent.status_code == 422
    assert ValidationErrorPublic.model_validate(sent.json()).errors[0].loc == ["query", "limit"]
