"""HTTP only: parse, call the service, respond."""

from __future__ import annotations

from collections.abc import Iterator

import anyio.from_thread
from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.deps import AppServices, Principal, get_db, get_principal, get_services
from api.files import quotas, service
from api.files.schemas import FileDeleted, FileList, FileObject
from api.idempotency import idempotency_key, respond
from api.presign import PresignParams, expires_at, file_body, presign_params, require_presigning
from api.slowloris import rate_limited_body
from core.db import read_only_session
from core.errors import PayloadTooLarge

router = APIRouter(prefix="/v1/files", tags=["files"])

# Room for the multipart envelope (boundaries, part headers, the purpose field) around the file.
_MULTIPART_OVERHEAD = 64 * 1024

_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object",
            "required": ["file", "purpose"],
            "properties": {
                "file": {"type": "string", "format": "binary",
                         "description": "Preference pairs: JSONL (one pair a line) or Parquet (one pair a "
                                        "row), standard, conversational or OpenAI format."},
                "purpose": {"type": "string", "enum": ["fine-tune"]},
            },
        }}},
    }
}


def _blocking_chunks(request: Request) -> Iterator[bytes]:
    """The request body as a plain iterator, for code running in a worker thread: each chunk is
    awaited on the event loop as it is needed, so the body is never buffered whole."""
    stream = rate_limited_body(request).__aiter__()  # 408 for a client that sends too slowly

    async def next_chunk() -> bytes | None:
        try:
            return await stream.__anext__()
        except StopAsyncIteration:
            return None

    while (chunk := anyio.from_thread.run(next_chunk)) is not None:
        yield chunk


@router.post("", response_model=FileObject, openapi_extra=_UPLOAD_BODY,
             summary="Upload a preference file, JSONL or Parquet (streamed, validated row by row)")
async def create_file(
    request: Request,
    principal: Principal = Depends(get_principal),
    db: Session = Depends(get_db),
    services: AppServices = Depends(get_services),
) -> JSONResponse:
    limit = services.settings.max_upload_bytes
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit + _MULTIPART_OVERHEAD:
        raise PayloadTooLarge(f"The file is larger than the limit of {limit} bytes.", param="file")

    def upload() -> JSONResponse:
        # The owner's quotas first: an owner at a limit is refused before a byte of the body is read.
        with read_only_session(services.session_factory) as quota_db:  # over before the body is read
            allowance = quotas.admit_upload(quota_db, services.settings, principal.owner,
                                            int(length) if length and length.isdigit() else None,
                                            idempotency_key=idempotency_key(request))
        received = service.receive_upload(db, services, request.headers.get("content-type"),
                                          _blocking_chunks(request), allowance=allowance)
        return respond(request, db, principal, received.identity(), lambda: FileObject.from_row(
            service.create_file(db, principal, received, settings=services.settings)))

    # Storage writes, hashing, validation and the database are blocking: run them off the loop.
    return await run_in_threadpool(upload)


@router.get("", response_model=FileList)
def list_files(
    after: str | None = None,
    limit: int | None = Query(None, description="1 to 10,000 (default 10,000)."),
    order: str = Query("desc", description="asc or desc by creation time."),
    purpose: str | None = None,
    principal: Principal = Depends(get_principal),
    db: Session = Depends(get_db),
):
    rows, has_more = service.list_files(db, principal, after=after, limit=limit, order=order, purpose=purpose)
    return FileList.page(rows, has_more=has_more)


@router.get("/{file_id}", response_model=FileObject)
def retrieve_file(file_id: str, principal: Principal = Depends(get_principal), db: Session = Depends(get_db)):
    return FileObject.from_row(service.get_file(db, principal, file_id))


@router.get("/{file_id}/content", response_class=StreamingResponse,
            responses={200: {"content": {"application/octet-stream": {}, "application/json": {}}}})
def file_content(
    file_id: str,
    principal: Principal = Depends(get_principal),
    db: Session = Depends(get_db),
    services: AppServices = Depends(get_services),
    presign: PresignParams = Depends(presign_params),
) -> Response:
    """The file's bytes; with `presigned=true`, a presigned URL into the S3 store (api/presign.py)."""
    if presign.presigned:
        require_presigning(services.storage)
    row = service.get_file(db, principal, file_id)
    if presign.presigned:
        expires = expires_at(presign.expires_in)
        return JSONResponse(file_body(service.presigned_file(services, row, presign.expires_in), expires))
    return StreamingResponse(
        service.file_content(services, row),
        media_type="application/octet-stream",
        headers={"Content-Length": str(row.bytes),
                 "Content-Disposition": f"attachment; filename=\"{row.id}.jsonl\""},
    )


@router.delete("/{file_id}", response_model=FileDeleted)
def delete_file(
    file_id: str,
    principal: Principal = Depends(get_principal),
    db: Session = Depends(get_db),
    services: AppServices = Depends(get_services),
):
    return FileDeleted(id=service.delete_file(db, services, principal, file_id).id, deleted=True)
