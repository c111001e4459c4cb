"""`?presigned=true` on the download routes (`GET /v1/files/{id}/content`,
`GET /v1/fine_tuning/jobs/{id}/checkpoints/{id}/content`): instead of the bytes, JSON with
presigned GET URLs into the S3 store, so a large download goes from the store to the client
without passing through the API. docs/CONTRACTS.md "Presigned downloads" is the contract.

    file:        {"object": "file.presigned", "url", "expires_at", "sha256", "bytes"}
    checkpoint:  {"object": "checkpoint.presigned", "expires_at", "files": [{"path", "url", "sha256", "bytes"}]}

`expires_at` is Unix seconds. The local store has no URLs to give: 400 `presigned_unsupported`
(param `presigned`) in the error envelope.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from fastapi import Query

from core.errors import InvalidRequest
from core.storage import PresignedObject, Storage

DEFAULT_EXPIRES_IN = 3600
MAX_EXPIRES_IN = 7 * 24 * 3600  # SigV4's limit for a presigned URL


@dataclass(frozen=True)
class PresignParams:
    presigned: bool
    expires_in: int


def presign_params(
    presigned: bool = Query(False, description="Answer with presigned URLs into the S3 store (JSON) instead of the "
                                              "bytes. 400 presigned_unsupported on a local store."),
    expires_in: int = Query(DEFAULT_EXPIRES_IN, ge=60, le=MAX_EXPIRES_IN,
                            description="Seconds the presigned URLs stay valid (60 to 604800)."),
) -> PresignParams:
    return PresignParams(presigned, expires_in)


def require_presigning(storage: Storage) -> None:
    """Raises InvalidRequest (400 presigned_unsupported) unless `storage` hands out URLs."""
    if not storage.presigns:
        raise InvalidRequest("Presigned URLs need the S3 store (SDPO_STORAGE_URL=s3://…); this service keeps its "
                             "files on a local folder. Download the content without `presigned`.",
                             param="presigned", code="presigned_unsupported")


def expires_at(expires_in: int) -> int:
    """Unix seconds when URLs signed from now on for `expires_in` seconds stop working; taken
    before signing and floored, so a client never counts on a second the store does not give."""
    return int(time.time()) + expires_in


def file_body(obj: PresignedObject, expires: int) -> dict:
    """The JSON for one file; `expires` from `expires_at`, taken before signing."""
    return {"object": "file.presigned", "url": obj.url, "expires_at": expires, "sha256": obj.sha256,
            "bytes": obj.bytes}


def tree_body(objects: list[PresignedObject], expires: int) -> dict:
    """The JSON for a checkpoint, its files by path; `expires` from `expires_at`, taken before signing."""
    return {"object": "checkpoint.presigned", "expires_at": expires,
            "files": [{"path": o.path, "url": o.url, "sha256": o.sha256, "bytes": o.bytes} for o in objects]}
