"""/healthz, /readyz (database, broker and file store reachable) and the OpenAPI docs."""

from __future__ import annotations


def test_healthz_and_readyz(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ready", "checks": {"database": "ok", "broker": "ok",
                                                                     "storage": "ok"}}


def test_readyz_is_503_when_the_broker_is_down(make_client):
    client = make_client(broker_url="redis://127.0.0.1:1/0")
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["database"] == "ok" and response.json()["checks"]["broker"] != "ok"


def test_docs_and_openapi(client):
    assert client.get("/docs").status_code == 200
    schema = client.get("/openapi.json").json()
    assert "/v1/fine_tuning/jobs/{job_id}/steps" in schema["paths"]
    create = schema["paths"]["/v1/fine_tuning/jobs"]["post"]["requestBody"]["content"]["application/json"]
    assert create["schema"]["$ref"] == "#/components/schemas/JobCreate"
    assert "PartitionSpec" in schema["components"]["schemas"]
