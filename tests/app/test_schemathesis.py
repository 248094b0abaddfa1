"""Property-based API tests: schemathesis checks the app against its own OpenAPI schema.

schemathesis' engine runs all four of its phases (the schema's examples; coverage: boundary values,
missing parameters and undeclared methods; fuzzing; stateful sequences that follow the links
between operations) over every operation, in process (ASGI, no network), on the real scratch
Postgres, once anonymously and once with an admin's bearer token. Every check it has is on except
the inapplicable ones in DISABLED, each with its reason. Whatever the input, the app must answer
without a 5xx, with a status, content type, headers and body the schema documents for the
operation, reject what the schema calls invalid and accept what it calls valid, enforce the auth it
declares, and answer undeclared methods with 405 and a correct `Allow`.

The run is seeded and deterministic (about 1,100 cases and 10 s per identity here).
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.routing import APIRoute, iter_route_contexts
from fastapi.testclient import TestClient
from schemathesis import engine
from schemathesis.checks import CHECKS
from schemathesis.engine import events
from schemathesis.engine.recorder import ScenarioRecorder

from app.main import API_PREFIX
from app.schemas import ID_LIST_PATTERN, PROMPT_TEXT_PATTERN, ValidationErrorPublic
from core.db.models import Labeller, Pair
from core.db.policies import publish_policy_version
from core.storage import LocalBlobStore

# Checks that cannot apply to this API, and why.
DISABLED = {
    # Needs two identities that own objects the other may not read; here every readable object is
    # shared by all labellers, and role checks are tests/app/test_authz_matrix.py's.
    "object_level_authorization": "no per-labeller objects",
}
# DELETE /prompts/{id} deactivates: pairs keep referring to the prompt, which stays readable with
# active=false, so reading it after the DELETE is right (undoing a judgement, the one real delete,
# has no GET). Off for that read only.
SOFT_DELETED = {"include-path": f"{API_PREFIX}/prompts/{{prompt_id}}", "include-method": "GET"}
# How invalid data may be refused: schemathesis' default list, plus 413 (a body over
# DENSEALIGN_MAX_BODY_BYTES is refused before anything reads it).
REJECTED = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx"]


@dataclass
class Outcome:
    operations: set[str] = field(default_factory=set)
    cases: int = 0
    checks_run: set[str] = field(default_factory=set)
    failures: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)  # check -> the first failure, readable
    errors: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{len(self.operations)} operations, {self.cases} cases, {len(self.checks_run)} checks "
            f"({', '.join(sorted(self.checks_run))}), failures {dict(self.failures)}"
        )


def api_operations(app: FastAPI) -> set[str]:
    """'METHOD /path' of every documented route under the API prefix, from the app's own routes."""
    return {
        f"{method} {route.path}"
        for route in iter_route_contexts(app.routes)  # the routes of included routers, with their prefix
        if isinstance(route.original_route, APIRoute)
        and route.include_in_schema
        and route.path.startswith(API_PREFIX)
        for method in route.methods
    }


def fuzz(app: FastAPI, headers: dict[str, str]) -> Outcome:
    config = schemathesis.Config.from_dict(
        {
            "seed": 15,
            "workers": 1,  # the app's sessions are the test's one rolled-back session
            "headers": headers,
            "generation": {"max-examples": 20, "deterministic": True, "database": "none"},
            "checks": {
                "enabled": True,
                **{name: {"enabled": False} for name in DISABLED},
                "negative_data_rejection": {"expected-statuses": REJECTED},
            },
            "operations": [SOFT_DELETED | {"checks": {"use_after_free": {"enabled": False}}}],
        }
    )
    schema = schemathesis.openapi.from_asgi(f"{API_PREFIX}/openapi.json", app, config=config)
    outcome = Outcome()
    for event in engine.from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished | events.FuzzScenarioFinished):
            record(outcome, event.recorder)
        elif isinstance(event, events.NonFatalError):
            outcome.errors.append(f"{event.label}: {event.value!r}")
        elif isinstance(event, events.FatalError):
            outcome.errors.append(repr(event.exception))
    return outcome


def record(outcome: Outcome, recorder: ScenarioRecorder) -> None:
    outcome.cases += len(recorder.cases)
    for case_id, checks in recorder.checks.items():
        case = recorder.cases[case_id].value
        outcome.operations.add(case.operation.label)
        for check in checks:
            outcome.checks_run.add(check.name)
            if check.failure_info is not None:
                outcome.failures[check.name] += 1
                outcome.examples.setdefault(
                    check.name, f"{case.method} {case.formatted_path}: {check.failure_info.failure.title}"
                )


@pytest.fixture
def admin_with_token(make_labeller: Callable[..., tuple[Labeller, str]]) -> tuple[Labeller, str]:
    return make_labeller("root", role="admin")


@pytest.fixture
def seeded_app(app: FastAPI, pair_with_images: Pair, blob_store: LocalBlobStore) -> Iterator[FastAPI]:
    """The app with rows for generated ids to hit: a pair with images, a version with its LoRA file."""
    lora_sha256 = blob_store.put("loras/1.safetensors", b"lora bytes")
    publish_policy_version(
        session=app.state.session_factory(),
        version=1,
        parent_version=0,
        lora_key="loras/1.safetensors",
        lora_sha256=lora_sha256,
    )
    # schemathesis logs every skipped scenario at WARNING; the outcome says what matters.
    logging.getLogger("schemathesis").setLevel(logging.ERROR)
    yield app
    logging.getLogger("schemathesis").setLevel(logging.NOTSET)


def assert_clean(outcome: Outcome, app: FastAPI) -> None:
    print(outcome.summary())  # noqa: T201 - the figures issue notes quote (pytest -s)
    assert outcome.errors == []
    assert dict(outcome.failures) == {}, outcome.examples
    # Every operation the app routes was exercised (the schema cannot silently leave one out).
    assert outcome.operations == api_operations(app)
    assert outcome.cases > 20 * len(outcome.operations)
    assert outcome.checks_run == set(CHECKS.get_all_names()) - set(DISABLED)


def test_anonymous(seeded_app: FastAPI) -> None:
    outcome = fuzz(seeded_app, {})
    assert_clean(outcome, seeded_app)


def test_admin(seeded_app: FastAPI, admin_with_token: tuple[Labeller, str]) -> None:
    _, token = admin_with_token
    outcome = fuzz(seeded_app, {"Authorization": f"Bearer {token}"})
    assert_clean(outcome, seeded_app)


def test_every_api_route_is_documented(admin_client: TestClient, app: FastAPI) -> None:
    spec = admin_client.get(f"{API_PREFIX}/openapi.json").json()
    documented = {f"{method.upper()} {path}" for path, item in spec["paths"].items() for method in item}
    assert documented == api_operations(app)
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            statuses = set(operation["responses"])
            assert {"422", "503"} <= statuses, (method, path)
            if path != f"{API_PREFIX}/health":
                assert "401" in statuses and operation["security"] == [{"bearer": []}], (method, path)
            if method != "get":
                assert {"400", "413"} <= statuses, (method, path)


def test_error_headers_are_documented(admin_client: TestClient) -> None:
    spec = admin_client.get(f"{API_PREFIX}/openapi.json").json()
    judge = spec["paths"][f"{API_PREFIX}/judgements"]["post"]["responses"]
    assert set(judge["429"]["headers"]) == {"Retry-After"}
    assert set(judge["503"]["headers"]) == {"Retry-After"}
    assert set(judge["401"]["headers"]) == {"WWW-Authenticate"}
    assert judge["409"]["content"]["application/json"]["schema"]["$ref"] == "#/components/schemas/ErrorPublic"


def test_405_allows_every_method_of_the_path(admin_client: TestClient) -> None:
    # Starlette named only the first route's method (GET), though PATCH and DELETE exist too.
    response = admin_client.request("PUT", f"{API_PREFIX}/prompts/1")
    assert response.status_code == 405
    assert response.headers["allow"] == "DELETE, GET, PATCH"
    assert response.json() == {"detail": "Method Not Allowed"}
    assert admin_client.request("OPTIONS", f"{API_PREFIX}/policies/current").headers["allow"] == "GET, PUT"


@pytest.mark.parametrize(
    ("text", "valid"),
    [
        ("a red circle", True),
        ("  padded  ", True),
        ("\ufeff", True),  # not white space to str.split()
        ("a\x00b", False),
        ("", False),
        *[(space * 2, False) for space in " \t\n\x0b\x0c\r\x1c\x1d\x1e\x1f\x85\xa0\u1680\u2000\u2028\u3000"],
    ],
)
def test_prompt_text_pattern_is_what_the_app_accepts(
    admin_client: TestClient, text: str, valid: bool
) -> None:
    assert bool(re.search(PROMPT_TEXT_PATTERN, text)) is valid
    response = admin_client.post(f"{API_PREFIX}/prompts", json={"text": text})
    assert response.status_code == (201 if valid else 422), response.json()


@pytest.mark.parametrize(
    ("raw", "valid"),
    [
        ("", True),
        ("1", True),
        ("12,15", True),
        ("2147483647", True),
        ("0", False),
        ("2147483648", False),
        ("012", False),
        ("1,", False),
        ("1, 2", False),
        ("True", False),
    ],
)
def test_exclude_pattern_is_what_the_app_accepts(admin_client: TestClient, raw: str, valid: bool) -> None:
    assert bool(re.fullmatch(ID_LIST_PATTERN, raw)) is valid
    response = admin_client.get(f"{API_PREFIX}/pairs/next", params={"exclude": raw})
    assert response.status_code == (200 if valid else 422)


def test_422_is_documented_with_the_shape_it_is_sent_in(admin_client: TestClient) -> None:
    # Regression: FastAPI documented 422 as a list under `detail`; app.errors sends a string + `errors`.
    spec = admin_client.get(f"{API_PREFIX}/openapi.json").json()
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    refs = {
        operation["responses"]["422"]["content"]["application/json"]["schema"]["$ref"]
        for path in spec["paths"].values()
        for operation in path.values()
        if "422" in operation["responses"]
    }
    assert refs == {"#/components/schemas/ValidationErrorPublic"}
    sent = admin_client.get(f"{API_PREFIX}/prompts", params={"limit": "many"})
    assert sent.status_code == 422
    assert ValidationErrorPublic.model_validate(sent.json()).errors[0].loc == ["query", "limit"]
