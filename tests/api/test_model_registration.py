"""POST /v1/models (admin) and the storage folder: a system model is visible to every owner, so a
path inside the store (another owner's checkpoint, an upload, trainer state) is refused however it
is spelled (.., a symlink, a model folder whose files link into the store), unless it is exactly a
checkpoint of the admin's own jobs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from core.keys import ADMIN_OWNER
from core.storage import LocalStorage
from tests.api.factories import checkpoint_row, file_row, job_row
from tests.conftest import bearer

MODELS = "/v1/models"


def _stored_checkpoint(db, settings, tmp_path, owner: str):
    """A checkpoint of a job of `owner`, stored for real; returns its row and its folder."""
    tree = tmp_path / f"ckpt-{owner}"
    tree.mkdir()
    (tree / "config.json").write_text("{}")
    (tree / "model.safetensors").write_bytes(b"weights")
    job = job_row(db, owner, file_row(db, owner).id)
    row = checkpoint_row(db, job, storage=LocalStorage(settings.storage_dir), tree=tree)
    return row, LocalStorage(settings.storage_dir).local_path(row.uri)


def _spellings(stored: Path, storage_root: Path, tmp_path: Path) -> dict[str, str]:
    """The same stored checkpoint named in ways that resolve into the store."""
    link = tmp_path / "innocent-looking"
    link.symlink_to(stored, target_is_directory=True)
    linked_files = tmp_path / "linked-files"
    linked_files.mkdir()
    for name in ("config.json", "model.safetensors"):
        (linked_files / name).symlink_to(stored / name)
    return {
        "plain": str(stored),
        "dot-dot": str(storage_root / "checkpoints" / ".." / stored.relative_to(storage_root)),
        "symlinked folder": str(link),
        "folder of symlinked files": str(linked_files),
    }


@pytest.mark.parametrize("spelling", ["plain", "dot-dot", "symlinked folder", "folder of symlinked files"])
def test_another_owners_checkpoint_is_refused_however_spelled(client, db, settings, admin_key, user_key, base_model,
                                                              tmp_path, count_rows, spelling):
    _row, stored = _stored_checkpoint(db, settings, tmp_path, "alice")
    path = _spellings(stored, Path(settings.storage_dir), tmp_path)[spelling]
    before = count_rows()
    response = client.post(MODELS, headers=bearer(admin_key), json={"id": "published", "path": path})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"], error["type"]) == ("path", "path_in_storage", "invalid_request_error")
    assert count_rows() == before
    assert all(m["id"] != "published" for m in client.get(MODELS, headers=bearer(user_key)).json()["data"])


def test_other_things_in_the_store_are_refused(client, settings, admin_key, count_rows):
    root = Path(settings.storage_dir)
    planted = root / "files" / "planted-model"  # e.g. a folder next to the uploads
    planted.mkdir(parents=True)
    (planted / "config.json").write_text("{}")
    gguf = root / "files" / "upload.gguf"
    gguf.write_bytes(b"GGUF")
    before = count_rows()
    for body in ({"id": "m1", "path": str(planted)}, {"id": "m2", "path": str(gguf), "format": "gguf"},
                 {"id": "m3", "path": str(root)}):
        response = client.post(MODELS, headers=bearer(admin_key), json=body)
        assert response.status_code == 400, (body, response.text)
        assert response.json()["error"]["param"] == "path", body
    assert count_rows() == before


def test_the_admins_own_checkpoint_may_be_registered(client, db, settings, admin_key, user_key, base_model,
                                                    tmp_path):
    _row, stored = _stored_checkpoint(db, settings, tmp_path, ADMIN_OWNER)
    response = client.post(MODELS, headers=bearer(admin_key), json={"id": "house-model", "path": str(stored)})
    assert response.status_code == 200, response.text
    assert response.json()["owned_by"] == "system"
    assert client.get(f"{MODELS}/house-model", headers=bearer(user_key)).status_code == 200
    # Also through "..": judged by where it points.
    dotted = str(Path(settings.storage_dir) / "checkpoints" / ".." / stored.relative_to(settings.storage_dir))
    response = client.post(MODELS, headers=bearer(admin_key), json={"id": "house-model-2", "path": dotted})
    assert response.status_code == 200, response.text


def test_a_model_folder_outside_the_store_still_registers(client, admin_key, tmp_path):
    folder = tmp_path / "models" / "plain"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    os.symlink(folder / "config.json", folder / "alias.json")  # links that stay outside the store are fine
    response = client.post(MODELS, headers=bearer(admin_key), json={"id": "plain", "path": str(folder)})
    assert response.status_code == 200, response.text
