"""The client SDK (sdpo_cli.sdk): its SSE parser, and files, jobs and errors against a real API
server (uvicorn, Postgres, Redis)."""

from __future__ import annotations

import json

import httpx
import pytest

from core.settings import Settings
from sdpo_cli import local
from sdpo_cli.sdk import APIConnectionError, APIError, SDPOClient, ServerSentEvent, iter_sse
from tests.conftest import jsonl_bytes, preference_rows

# ------------------------------------------------------------------------------------------------
# iter_sse: the one parser of text/event-stream


def test_sse_events_split_anywhere_across_chunks_parse_the_same():
    body = ("retry: 1000\n\n: keep-alive\n\nid: ftevent-1\ndata: {\"a\": \"é\"}\n\n"
            "id: ftevent-2\nevent: done\ndata: {\"status\": \"succeeded\"}\n\n").encode()
    whole = list(iter_sse([body]))
    assert whole == [ServerSentEvent("message", '{"a": "é"}', "ftevent-1"),
                     ServerSentEvent("done", '{"status": "succeeded"}', "ftevent-2")]
    for size in (1, 2, 3, 7):  # split inside lines, inside "\n\n" and inside the two bytes of é
        assert list(iter_sse(body[i:i + size] for i in range(0, len(body), size))) == whole


def test_sse_multi_line_data_comments_line_endings_and_ids():
    text = (": a comment\r\ndata: first\r\ndata:second\r\n\r\n"  # CRLF; no space after the colon
            "data\rdata: x\r\r"                                  # CR only; a field with no colon
            "id: keep\n: only a comment and an id\n\n"           # no data: nothing dispatched
            "id: bad\0id\ndata: y\nretry: 250\nunknown: z\n\n"   # NUL id ignored, id carried over
            "data: never ended")
    events = list(iter_sse([text[:20], text[20:21], text[21:]]))
    assert events == [ServerSentEvent("message", "first\nsecond", None),
                      ServerSentEvent("message", "\nx", None),
                      ServerSentEvent("message", "y", "keep", 250)]
    # A CR at the end of one chunk and the LF at the start of the next are one line ending.
    assert list(iter_sse(["data: a\r", "\n\r", "\n"])) == [ServerSentEvent("message", "a", None)]


def test_stream_events_resumes_with_last_event_id_after_a_dropped_connection():
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("Last-Event-ID"))
        if len(seen) == 1:
            def broken():
                yield b'retry: 10\n\nid: e1\ndata: {"id": "e1"}\n\n'
                raise httpx.ReadError("connection reset")
            return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=broken())
        return httpx.Response(200, headers={"content-type": "text/event-stream"},
                              content=b'id: e2\ndata: {"id": "e2"}\n\nevent: done\ndata: {"status": "succeeded"}\n\n')

    with SDPOClient("http://sdpo.test", "sk-x", transport=httpx.MockTransport(handler)) as client:
        assert [e["id"] for e in client.jobs.stream_events("ftjob-1")] == ["e1", "e2"]
    assert seen == [None, "e1"]


# ------------------------------------------------------------------------------------------------
# Against the real API


@pytest.fixture(autouse=True)
def _clean(request):
    if "make_live_server" in request.fixturenames:
        request.getfixturevalue("clean_state")
    yield


def test_files_and_jobs_through_the_sdk_and_errors_as_api_error(make_live_server, user_key, tmp_path):
    url = make_live_server()
    path = tmp_path / "train.jsonl"
    path.write_bytes(jsonl_bytes(preference_rows(12)))
    with SDPOClient(url, user_key) as client:
        file = client.files.create(path)
        assert file["id"].startswith("file-") and file["rows"] == 12 and file["filename"] == "train.jsonl"
        assert client.files.retrieve(file["id"])["id"] == file["id"]
        assert [f["id"] for f in client.files.list()["data"]] == [file["id"]]
        assert client.files.content(file["id"]) == path.read_bytes()

        # A refused file: the envelope, with every bad line named, and nothing stored.
        rows = preference_rows(3)
        rows[1]["rejected"] = rows[1]["chosen"]
        with open(tmp_path / "bad.jsonl", "wb") as fh:
            fh.write(jsonl_bytes(rows))
        with pytest.raises(APIError) as refused:
            client.files.create(tmp_path / "bad.jsonl")
        assert refused.value.status_code == 400 and refused.value.type == "invalid_request_error"
        assert refused.value.code == "invalid_file"
        assert [(e["line"], e["field"]) for e in refused.value.body["errors"]] == [(2, "rejected")]
        assert len(client.files.list()["data"]) == 1

        with pytest.raises(APIError) as bad_field:
            client.jobs.create(model="no-such-model", training_file=file["id"])
        assert bad_field.value.status_code == 400 and bad_field.value.param == "model"
        with pytest.raises(APIError) as missing:
            client.jobs.retrieve("ftjob-missing")
        assert missing.value.status_code == 404 and missing.value.message

        assert client.files.delete(file["id"])["deleted"] is True
        with pytest.raises(APIError) as gone:
            client.files.retrieve(file["id"])
        assert gone.value.status_code == 404

    with SDPOClient(url, "sk-sdpo-wrong") as client, pytest.raises(APIError) as wrong:
        client.files.list()
    assert wrong.value.status_code == 401 and wrong.value.message.startswith("Incorrect API key")
    with SDPOClient("http://127.0.0.1:1", user_key) as client, pytest.raises(APIConnectionError) as down:
        client.jobs.list()
    assert down.value.status_code is None and "cannot reach http://127.0.0.1:1" in str(down.value)


def test_the_cli_finds_sdpo_home_where_the_server_settings_do(tmp_path, monkeypatch):
    monkeypatch.delenv("SDPO_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    assert local.home() == Settings().home
    monkeypatch.setenv("SDPO_HOME", "~/elsewhere")
    assert local.home() == Settings().home
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "service.json").write_text(json.dumps({"url": "http://127.0.0.1:1"}))
    assert local.running_service(tmp_path / "home") is None  # written, but nobody answers
