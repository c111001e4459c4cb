"""/v1/models: admins register server-side models; everyone lists system models and their own
fine-tuned ones; only an admin ever names a server path."""

from __future__ import annotations

import pytest

from tests.conftest import bearer

MODELS = "/v1/models"


@pytest.fixture
def hf_dir(tmp_path):
    path = tmp_path / "models" / "tiny-hf"
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


def test_admin_registers_hf_and_gguf_models(client, admin_key, user_key, hf_dir, tmp_path):
    response = client.post(MODELS, headers=bearer(admin_key), json={
        "id": "tiny-hf", "path": str(hf_dir), "default_hyperparameters": {"learning_rate": 1e-3}})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body == {"id": "tiny-hf", "object": "model", "created": body["created"], "owned_by": "system",
                    "source": "local", "default_hyperparameters": {"learning_rate": 1e-3},
                    "fine_tuning_job_id": None}
    gguf = tmp_path / "small.gguf"
    gguf.write_bytes(b"GGUF")
    response = client.post(MODELS, headers=bearer(admin_key), json={"id": "small", "path": str(gguf),
                                                                      "format": "gguf"})
    assert response.status_code == 200 and response.json()["source"] == "gguf"
    # Everyone sees system models; nobody sees the server path.
    listed = client.get(MODELS, headers=bearer(user_key)).json()
    assert listed["object"] == "list" and {m["id"] for m in listed["data"]} == {"tiny-hf", "small"}
    assert str(hf_dir) not in str(listed)
    assert client.get(f"{MODELS}/tiny-hf", headers=bearer(user_key)).json()["id"] == "tiny-hf"
    assert client.get(f"{MODELS}/nope", headers=bearer(user_key)).status_code == 404


def test_registration_is_admin_only(client, user_key, hf_dir, count_rows):
    before = count_rows()
    response = client.post(MODELS, headers=bearer(user_key), json={"id": "m", "path": str(hf_dir)})
    assert response.status_code == 403 and response.json()["error"]["code"] == "admin_required"
    assert count_rows() == before


@pytest.mark.parametrize(("body", "code", "param"), [
    ({"id": "m", "path": "relative/dir"}, "invalid_value", "path"),
    ({"id": "m", "path": "/definitely/not/here"}, "invalid_model_path", "path"),
    ({"id": "m", "path": "HF_FILE"}, "invalid_model_path", "path"),
    ({"id": "m", "path": "HF_DIR", "format": "gguf"}, "invalid_model_path", "path"),
    ({"id": "m", "path": "HF_DIR", "format": "onnx"}, "invalid_value", "format"),
    ({"id": "ft:x", "path": "HF_DIR"}, "invalid_value", "id"),
    ({"id": "ftckpt-x", "path": "HF_DIR"}, "invalid_value", "id"),
    ({"id": "m", "path": "HF_DIR", "default_hyperparameters": {"beta": -1}}, "invalid_hyperparameter",
     "default_hyperparameters.beta"),
    ({"id": "m", "path": "HF_DIR", "extra": 1}, "unknown_parameter", "extra"),
    ({"path": "HF_DIR"}, "missing_required_parameter", "id"),
])
def test_bad_registrations(client, admin_key, hf_dir, count_rows, body, code, param):
    replace = {"HF_DIR": str(hf_dir), "HF_FILE": str(hf_dir / "config.json")}
    body = {k: replace.get(v, v) if isinstance(v, str) else v for k, v in body.items()}
    before = count_rows()
    response = client.post(MODELS, headers=bearer(admin_key), json=body)
    assert response.status_code == 400, response.text
    assert (response.json()["error"]["code"], response.json()["error"]["param"]) == (code, param)
    assert count_rows() == before


def test_duplicate_id_is_409(client, admin_key, hf_dir):
    body = {"id": "dup", "path": str(hf_dir)}
    assert client.post(MODELS, headers=bearer(admin_key), json=body).status_code == 200
    response = client.post(MODELS, headers=bearer(admin_key), json=body)
    assert response.status_code == 409 and response.json()["error"]["code"] == "model_exists"


def test_model_roots_allow_list(make_client, admin_key, hf_dir, tmp_path):
    allowed = tmp_path / "models"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "config.json").write_text("{}")
    client = make_client(model_roots=[allowed])
    response = client.post(MODELS, headers=bearer(admin_key), json={"id": "out", "path": str(elsewhere)})
    assert response.status_code == 400 and response.json()["error"]["code"] == "path_not_allowed"
    # A path that climbs out with ".." is judged where it really points.
    sneaky = str(allowed / ".." / "elsewhere")
    response = client.post(MODELS, headers=bearer(admin_key), json={"id": "out", "path": sneaky})
    assert response.json()["error"]["code"] == "path_not_allowed"
    assert client.post(MODELS, headers=bearer(admin_key), json={"id": "in", "path": str(hf_dir)}).status_code == 200
