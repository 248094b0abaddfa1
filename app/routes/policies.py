from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO

from fastapi import APIRouter, Response
from fastapi.responses import FileResponse, StreamingResponse

from app.deps import BlobStoreDep, CurrentAdmin, CurrentLabeller, SessionDep
from app.responses import ADMIN, AUTH, BEARER, BLOB_CORRUPT, WRITE, Responses, error
from app.schemas import CurrentPolicyUpdate, PolicyVersionPublic, VersionPath
from core.db.errors import BaseHasNoLora
from core.db.models import PolicyVersion
from core.db.policies import get_current_policy, get_policy_version, list_policy_versions, set_current_policy
from core.storage import verify_blob

router = APIRouter(prefix="/policies", tags=["policies"], dependencies=[BEARER])
# Only a database that `densealign migrate` never finished has versions but no current one.
NO_CURRENT: Responses = {404: error("No version is current yet; run `densealign migrate`.")}


def _public(row: PolicyVersion, current: int | None) -> PolicyVersionPublic:
    public = PolicyVersionPublic.model_validate(row)
    public.current = row.version == current
    return public


@router.get("", response_model=list[PolicyVersionPublic], responses=AUTH | NO_CURRENT)
def list_policies(session: SessionDep, _: CurrentLabeller) -> list[PolicyVersionPublic]:
    rows = list_policy_versions(session=session)
    current = get_current_policy(session=session).version if rows else None
    return [_public(row, current) for row in rows]


@router.get("/current", response_model=PolicyVersionPublic, responses=AUTH | NO_CURRENT)
def current_policy(session: SessionDep, _: CurrentLabeller) -> PolicyVersionPublic:
    row = get_current_policy(session=session)
    return _public(row, row.version)


@router.put(
    "/current",
    response_model=PolicyVersionPublic,
    responses=ADMIN | {404: error("No such version; list them with GET /api/v1/policies.")} | WRITE,
)
def set_current(body: CurrentPolicyUpdate, session: SessionDep, _: CurrentAdmin) -> PolicyVersionPublic:
    """Point workers at another published version (an older one rolls back)."""
    row = set_current_policy(session=session, version=body.version)
    session.commit()
    return _public(row, row.version)


@router.get(
    "/{version}/lora.safetensors",
    response_class=Response,
    responses={
        200: {
            "content": {"application/octet-stream": {}},
            "description": "The LoRA adapter.",
            "headers": {
                "X-Content-SHA256": {"description": "The file's sha256, hex.", "schema": {"type": "string"}}
            },
        }
    }
    | AUTH
    | {404: error("No such version, or version 0 (the base model, which has no LoRA).")}
    | BLOB_CORRUPT,
)
def download_lora(
    version: VersionPath, session: SessionDep, store: BlobStoreDep, _: CurrentLabeller
) -> Response:
    """The version's LoRA in diffusers format; `X-Content-SHA256` carries its sha256 hex digest.

    The file is checked against that digest before it is sent: a corrupt one is refused (500, naming
    the blob), never served under a digest it does not have."""
    row = get_policy_version(session=session, version=version)
    if row.lora_key is None or row.lora_sha256 is None:
        raise BaseHasNoLora()
    headers = {
        "X-Content-SHA256": row.lora_sha256,
        "Content-Disposition": f'attachment; filename="lora-v{version}.safetensors"',
    }
    path = store.local_path(row.lora_key)
    if path is not None:
        verify_blob(store, row.lora_key, row.lora_sha256)
        return FileResponse(path, media_type="application/octet-stream", headers=headers)
    # No file here (an S3 bucket): check the object in one streamed pass, then stream it out again,
    # so neither pass holds the whole adapter in memory. Keys are written once, so both read the same.
    verify_blob(store, row.lora_key, row.lora_sha256)
    return StreamingResponse(
        _chunks(store.open(row.lora_key)), media_type="application/octet-stream", headers=headers
    )


def _chunks(handle: BinaryIO, size: int = 1 << 20) -> Iterator[bytes]:
    with handle:
        yield from iter(lambda: handle.read(size), b"")
