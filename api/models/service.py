"""Models: list what a caller may train from; let an admin register server-side models."""

from __future__ import annotations

import os
import re
from pathlib import Path

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.deps import AppServices, Principal
from api.models import repository
from api.models.schemas import ModelRegister
from core.clock import utcnow
from core.errors import Conflict, InvalidRequest, NotFound, PermissionDenied
from core.models import ModelSource, RegisteredModel
from core.storage import LOCAL_SCHEME
from sdpo_engine.config import ConfigError, StepConfig

# No ":" (reserved for ft: names) and no "/" (ids are path segments).
MODEL_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
RESERVED_PREFIXES = ("ft-", "ftckpt-", "ftjob-", "file-")


def list_models(db: Session, principal: Principal) -> list[RegisteredModel]:
    """The models the caller may use: the system's and its own fine-tuned ones, oldest first."""
    return repository.list_visible(db, principal.owner)


def get_model(db: Session, principal: Principal, model_id: str) -> RegisteredModel:
    row = repository.get_visible(db, principal.owner, model_id)
    if row is None:
        raise NotFound(f"The model '{model_id}' does not exist.", param="model", code="model_not_found")
    return row


def delete_model(db: Session, principal: Principal, model_id: str) -> RegisteredModel:
    """Delete one of the caller's fine-tuned models (OpenAI's DELETE /v1/models/{model}): it is no
    longer listed or usable as a base; the job that made it and its checkpoints stay (a checkpoint
    can still be branched from as `ftckpt-…`). 404 for an unknown model, another owner's or one
    already deleted; 403 `model_not_deletable` for a system model; 409 `model_in_use` while an
    unfinished job starts from it."""
    row = repository.get_visible(db, principal.owner, model_id, for_update=True)
    if row is None:
        raise NotFound(f"The model '{model_id}' does not exist.", param="model", code="model_not_found")
    if row.owner is None:
        raise PermissionDenied(f"The model '{model_id}' is a system model; only your own fine-tuned models can be "
                               "deleted.", param="model", code="model_not_deletable")
    users = repository.active_jobs_on(db, row.id)
    if users:
        raise Conflict(f"The model '{model_id}' is the base of unfinished job(s) {', '.join(users)}; cancel them "
                       "or wait for them to finish.", param="model", code="model_in_use")
    row.deleted_at = utcnow()
    db.flush()
    return row


def register_model(db: Session, services: AppServices, principal: Principal, body: ModelRegister) -> RegisteredModel:
    """Register a server path as a system model (visible to every owner). Raises `InvalidRequest`
    (400) for a bad id, path (`param` "path": relative, missing, outside SDPO_MODEL_ROOTS, inside the
    storage folder but not a checkpoint of the caller's own, not a model of `format`) or defaults;
    `Conflict` (409) for a taken id."""
    if not MODEL_ID_RE.match(body.id) or body.id.startswith(RESERVED_PREFIXES):
        raise InvalidRequest("id must be 1 to 128 of letters, digits, '.', '_' or '-', and must not start with "
                             f"{', '.join(RESERVED_PREFIXES)}.", param="id", code="invalid_value")
    path = _check_path(services, body.path, body.format)
    _check_not_others_storage(db, services, principal, path)
    defaults = dict(body.default_hyperparameters or {})
    try:
        # Checked now so that every job on this model starts from valid defaults.
        StepConfig.from_dict(defaults)
    except ConfigError as exc:
        raise InvalidRequest(exc.message, param=f"default_hyperparameters.{exc.param}",
                             code="invalid_hyperparameter") from None
    if "seed" in defaults:
        raise InvalidRequest("seed is set per job, not per model.", param="default_hyperparameters.seed",
                             code="unknown_parameter")
    if repository.exists(db, body.id):
        raise Conflict(f"A model named '{body.id}' already exists.", param="id", code="model_exists")
    row = RegisteredModel(
        id=body.id,
        owner=None,  # registered by an admin for everyone
        source=ModelSource.GGUF if body.format == "gguf" else ModelSource.LOCAL,
        uri=path.as_uri(),
        default_hyperparameters=defaults,
    )
    db.add(row)
    try:
        db.flush()
    except IntegrityError:  # a concurrent registration of the same id won the race
        raise Conflict(f"A model named '{body.id}' already exists.", param="id", code="model_exists") from None
    return row


def _check_path(services: AppServices, raw: str, fmt: str) -> Path:
    path = Path(raw)
    if not path.is_absolute():
        raise InvalidRequest("path must be absolute.", param="path", code="invalid_value")
    path = path.resolve()
    roots = services.settings.model_roots
    if roots and not any(path.is_relative_to(root) for root in roots):
        raise InvalidRequest("path is outside the folders allowed by SDPO_MODEL_ROOTS.", param="path",
                             code="path_not_allowed")
    if fmt == "hf":
        if not (path / "config.json").is_file():
            raise InvalidRequest("path must be a Hugging Face model directory (with config.json).", param="path",
                                 code="invalid_model_path")
    elif not (path.is_file() and path.suffix == ".gguf"):
        raise InvalidRequest("path must be a .gguf file.", param="path", code="invalid_model_path")
    return path


# How many entries of a model directory are looked at for links into the store (a model directory
# holds a handful of files; a huge one is refused rather than walked).
MAX_MODEL_DIR_ENTRIES = 10_000


def _check_not_others_storage(db: Session, services: AppServices, principal: Principal, path: Path) -> None:
    """Refuse a path inside the storage folder (uploads, every owner's checkpoints, trainer state)
    unless it is exactly a checkpoint of the caller's own jobs: a system model is visible to all
    owners, so registering another owner's checkpoint would publish their work. `path` is already
    resolved (symlinks and ".." followed); a model directory outside the store whose files link
    into it is refused too, since loading it would read the store."""
    root = Path(services.settings.storage_dir).resolve()
    if path.is_relative_to(root):
        uri = LOCAL_SCHEME + path.relative_to(root).as_posix()
        if repository.owned_checkpoint_at(db, principal.owner, uri) is None:
            raise InvalidRequest("path is inside the storage folder and is not a checkpoint of your own jobs.",
                                 param="path", code="path_in_storage")
        return
    if path.is_dir():
        seen = 0
        for folder, dirs, files in os.walk(path):  # symlinked folders are listed, not entered
            entries = [Path(folder, name) for name in (*dirs, *files)]
            seen += len(entries)
            if seen > MAX_MODEL_DIR_ENTRIES:
                raise InvalidRequest(f"path holds more than {MAX_MODEL_DIR_ENTRIES} entries; not a model directory.",
                                     param="path", code="invalid_model_path")
            if any(entry.resolve().is_relative_to(root) for entry in entries if entry.is_symlink()):
                raise InvalidRequest("path links to files inside the storage folder.", param="path",
                                     code="path_in_storage")
