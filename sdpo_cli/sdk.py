"""A small Python client of the sDPO service's HTTP API (httpx only; no server code imported).

    from sdpo_cli.sdk import SDPOClient, APIError

    with SDPOClient("http://127.0.0.1:8000", api_key="sk-…") as client:
        file = client.files.create("train.jsonl")                    # the file object, validated
        job = client.jobs.create(model="sdpo-tiny", training_file=file["id"],
                                 method={"type": "sdpo", "sdpo": {"partition": {"n_steps": 2}}})
        for event in client.jobs.stream_events(job["id"]):          # live, until the job ends
            print(event["message"])
        job = client.jobs.retrieve(job["id"])
        client.checkpoints.download(job["id"], None, "model.tar")   # the final checkpoint

Names follow OpenAI's SDK where the API mirrors OpenAI's (`files.create/list/retrieve/content/
delete`, `jobs.create/list/retrieve/cancel/pause/resume`); objects are the API's JSON as dicts
(shapes in docs/CONTRACTS.md and the service's `/docs`). Every non-2xx answer raises `APIError`
carrying the error envelope; a server that cannot be reached raises `APIConnectionError` (a
subclass). Server-sent events are parsed in one place, `iter_sse`.
"""

from __future__ import annotations

import codecs
import contextlib
import io
import json
import os
import shutil
import tarfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx

__all__ = ["APIConnectionError", "APIError", "SDPOClient", "ServerSentEvent", "TERMINAL_STATUSES", "iter_sse"]

TERMINAL_STATUSES = ("succeeded", "failed", "cancelled")
# Uploads and downloads may take as long as their bytes need; only connecting is bounded.
_TRANSFER_TIMEOUT = httpx.Timeout(None, connect=30.0)
# The server sends a keep-alive comment every 15 s, so a silent minute means a dead connection.
_STREAM_TIMEOUT = httpx.Timeout(30.0, read=60.0)


class APIError(Exception):
    """A request the service refused (4xx/5xx), with its error envelope.

    Attributes: `status_code` (int; None for a connection error), `message`, `type`, `param` (the
    field or line at fault, or None), `code` (e.g. "invalid_file", "not_found"), `body` (the whole
    `error` object, including extras such as a file's `errors` list and `file_type`; None when the
    answer was not an envelope, e.g. a proxy's HTML page), `headers` (the response's headers).
    """

    def __init__(self, message: str, *, status_code: int | None = None, type: str | None = None,
                 param: str | None = None, code: str | None = None, body: dict[str, Any] | None = None,
                 headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.type = type
        self.param = param
        self.code = code
        self.body = body
        self.headers = dict(headers or {})

    @classmethod
    def from_response(cls, response: httpx.Response) -> APIError:
        """The envelope `{"error": {"message", "type", "param", "code", …}}` of a read response."""
        try:
            error = response.json()["error"]
            message = error["message"]
        except (ValueError, KeyError, TypeError):
            return cls(f"HTTP {response.status_code}: {response.text[:300]}", status_code=response.status_code,
                       headers=response.headers)
        return cls(str(message), status_code=response.status_code, type=error.get("type"),
                   param=error.get("param"), code=error.get("code"), body=error, headers=response.headers)


class APIConnectionError(APIError):
    """The service could not be reached, or the connection broke (no HTTP status)."""


# ------------------------------------------------------------------------------------------------
# Server-sent events: the one parser


@dataclass(frozen=True)
class ServerSentEvent:
    """One dispatched event: `event` ("message" unless named), `data` (the data lines joined with
    "\\n"), `id` (the last event id seen so far in the stream, as the spec says; None if none yet),
    `retry` (a reconnection delay in ms sent with this event, else None)."""

    event: str
    data: str
    id: str | None
    retry: int | None = None


def iter_sse(chunks: Iterable[bytes | str]) -> Iterator[ServerSentEvent]:
    """Parse a `text/event-stream` body given in chunks of any size (bytes as UTF-8, or text), as the
    WHATWG HTML spec's "event stream interpretation" says: lines end in CRLF, LF or CR (also split
    across chunks); `:` starts a comment; `data` lines accumulate; a blank line dispatches the event
    if it has data (a block of comments, `retry:` or `id:` only dispatches nothing); an `id` holding
    NUL is ignored; unknown fields are ignored. An event not ended by a blank line is dropped.

    (httpx-sse was considered: its 0.4 decoder dispatches an empty event at every blank line once an
    id has been seen, so each keep-alive comment would surface as an event.)"""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    buffer = ""
    event = ""
    data: list[str] = []
    last_id: str | None = None
    retry: int | None = None
    pending_cr = False
    for chunk in chunks:
        text = decoder.decode(chunk) if isinstance(chunk, bytes) else chunk
        if not text:
            continue
        if pending_cr and text.startswith("\n"):
            text = text[1:]  # the LF of a CRLF split across chunks
        pending_cr = text.endswith("\r")
        buffer += text
        lines = buffer.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        buffer = lines.pop()  # an unfinished line waits for the next chunk
        for line in lines:
            if line == "":
                if data:
                    yield ServerSentEvent(event or "message", "\n".join(data), last_id, retry)
                event, data, retry = "", [], None
                continue
            if line.startswith(":"):
                continue
            name, colon, value = line.partition(":")
            if colon and value.startswith(" "):
                value = value[1:]
            if name == "data":
                data.append(value)
            elif name == "event":
                event = value
            elif name == "id" and "\0" not in value:
                last_id = value
            elif name == "retry" and value.isdigit():
                retry = int(value)


# ------------------------------------------------------------------------------------------------
# The client and its resources


class SDPOClient:
    """A client of one service. `base_url`: e.g. "http://127.0.0.1:8000"; `api_key`: sent as
    `Authorization: Bearer …` (None: no header); `timeout`: seconds for each ordinary request
    (uploads, downloads and event streams have their own, longer ones); `transport`: an httpx
    transport to use instead of the network (tests, proxies). Use as a context manager, or call
    `close()`."""

    def __init__(self, base_url: str, api_key: str | None = None, *, timeout: float = 60.0,
                 transport: httpx.BaseTransport | None = None):
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout, transport=transport)
        self.files = Files(self)
        self.jobs = Jobs(self)
        self.checkpoints = Checkpoints(self)
        self.models = Models(self)

    def __enter__(self) -> SDPOClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """One request; the decoded JSON body. Raises APIError (status >= 400) or APIConnectionError."""
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise self._connection_error(exc) from exc
        if response.status_code >= 400:
            raise APIError.from_response(response)
        return response.json()

    @contextlib.contextmanager
    def stream(self, method: str, path: str, **kwargs: Any) -> Iterator[httpx.Response]:
        """A streamed response (`with client.stream(…) as response:`), its status already checked.
        Raises APIError (status >= 400) or APIConnectionError, also for a connection that breaks
        while the body is read."""
        try:
            with self._http.stream(method, path, **kwargs) as response:
                _raise_for_status(response)
                yield response
        except httpx.HTTPError as exc:
            raise self._connection_error(exc) from exc

    def _connection_error(self, exc: Exception) -> APIConnectionError:
        return APIConnectionError(f"cannot reach {self.base_url} ({type(exc).__name__})", code="connection_error")


class _Resource:
    def __init__(self, client: SDPOClient):
        self._client = client


def _params(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


class Files(_Resource):
    """`/v1/files`: preference files (JSONL or Parquet), validated on upload."""

    def create(self, file: str | os.PathLike[str] | IO[bytes], *, purpose: str = "fine-tune",
               filename: str | None = None) -> dict[str, Any]:
        """Upload a path or a binary file object. Returns the file object (`id`, `rows`, `format`,
        `file_type`, `stats`, `warnings`, …). Raises APIError 400 `invalid_file` with `body["errors"]`
        (`line`, `field`, `reason` per bad line or row) when the file is refused."""
        if isinstance(file, (str, os.PathLike)):
            path = Path(file)
            with open(path, "rb") as fh:
                return self.create(fh, purpose=purpose, filename=filename or path.name)
        name = filename or Path(getattr(file, "name", "upload.jsonl")).name
        if not file.seekable():  # a pipe: read whole, as the type is told by its first bytes
            file = io.BytesIO(file.read())
        start = file.tell()
        magic = file.read(4)
        file.seek(start)
        # The server tells JSONL from Parquet by the bytes; the media type only helps proxies and logs.
        media_type = "application/vnd.apache.parquet" if magic == b"PAR1" else "application/jsonl"
        return self._client.request("POST", "/v1/files", files={"file": (name, file, media_type)},
                                    data={"purpose": purpose}, timeout=_TRANSFER_TIMEOUT)

    def list(self, *, after: str | None = None, limit: int | None = None, order: str | None = None,
             purpose: str | None = None) -> dict[str, Any]:
        """`{"object": "list", "data": [file, …], "has_more": bool}`, newest first unless order="asc"."""
        return self._client.request("GET", "/v1/files", params=_params(after=after, limit=limit, order=order,
                                                                        purpose=purpose))

    def retrieve(self, file_id: str) -> dict[str, Any]:
        """The file object. Raises APIError 404 for a file that is not the caller's."""
        return self._client.request("GET", f"/v1/files/{file_id}")

    def content(self, file_id: str) -> bytes:
        """The stored bytes of the file, as uploaded."""
        with self._client.stream("GET", f"/v1/files/{file_id}/content", timeout=_TRANSFER_TIMEOUT) as r:
            return r.read()

    def delete(self, file_id: str) -> dict[str, Any]:
        """`{"id", "object": "file", "deleted": true}`. Raises APIError 409 while an active job uses it."""
        return self._client.request("DELETE", f"/v1/files/{file_id}")


class Jobs(_Resource):
    """`/v1/fine_tuning/jobs`: dpo and sdpo jobs, their steps, events and checkpoints."""

    def create(self, *, model: str, training_file: str | None = None, validation_file: str | None = None,
               method: Mapping[str, Any] | None = None, suffix: str | None = None, seed: int | None = None,
               metadata: Mapping[str, str] | None = None, idempotency_key: str | None = None,
               extra_body: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Create a job (the body as OpenAI's, `method.type` "dpo" or "sdpo"; `extra_body` fields are
        sent as well). Returns the job object (`id`, `status`, `n_steps`, …). A retry with the same
        `idempotency_key` gets the first reply. Raises APIError 400 naming the bad field in `param`."""
        body = _params(model=model, training_file=training_file, validation_file=validation_file,
                       method=dict(method) if method else None, suffix=suffix, seed=seed,
                       metadata=dict(metadata) if metadata else None)
        body.update(extra_body or {})
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._client.request("POST", "/v1/fine_tuning/jobs", json=body, headers=headers)

    def list(self, *, after: str | None = None, limit: int | None = None,
             metadata: Mapping[str, str] | None = None) -> dict[str, Any]:
        """`{"object": "list", "data": [job, …], "has_more": bool}`, newest first; `metadata` filters
        on equal values (`metadata[key]=value`)."""
        params = _params(after=after, limit=limit)
        params.update({f"metadata[{k}]": v for k, v in (metadata or {}).items()})
        return self._client.request("GET", "/v1/fine_tuning/jobs", params=params)

    def retrieve(self, job_id: str) -> dict[str, Any]:
        """The job object with its `progress` (`step`, `percent`, `queue_position`, …)."""
        return self._client.request("GET", f"/v1/fine_tuning/jobs/{job_id}")

    def steps(self, job_id: str) -> dict[str, Any]:
        """`{"data": [step, …]}` in order: `index`, `status`, `reference_checkpoint`,
        `output_checkpoint`, `metrics` (`first_loss`, `last_loss`, `reward_accuracy`, …)."""
        return self._client.request("GET", f"/v1/fine_tuning/jobs/{job_id}/steps")

    def events(self, job_id: str, *, after: str | None = None, limit: int | None = None) -> dict[str, Any]:
        """One page of events, newest first: `{"data": [event, …], "has_more": bool}`."""
        return self._client.request("GET", f"/v1/fine_tuning/jobs/{job_id}/events",
                                    params=_params(after=after, limit=limit))

    def stream_events(self, job_id: str, *, last_event_id: str | None = None, max_reconnects: int = 30,
                      ) -> Iterator[dict[str, Any]]:
        """Every event of the job live, oldest first (after `last_event_id` if given), as event objects
        (`id`, `type` "message" or "metrics", `level`, `message`, `data`); the iteration ends when the
        server's `done` frame says the job has finished. A dropped connection, or the server's
        periodic close, is resumed with `Last-Event-ID` after the server's `retry` delay, so nothing is
        lost or repeated. Raises APIError for a refused stream (404, 429 `too_many_streams`), and
        APIConnectionError after `max_reconnects` failed attempts in a row."""
        failures, delay = 0, 1.0
        while True:
            headers = {"Accept": "text/event-stream", "Cache-Control": "no-store"}
            if last_event_id:
                headers["Last-Event-ID"] = last_event_id
            try:
                with self._client.stream("GET", f"/v1/fine_tuning/jobs/{job_id}/events",
                                               params={"stream": "true"}, headers=headers,
                                               timeout=_STREAM_TIMEOUT) as response:
                    failures = 0
                    for sse in iter_sse(response.iter_bytes()):
                        if sse.retry is not None:
                            delay = sse.retry / 1000
                        if sse.event == "done":
                            return
                        last_event_id = sse.id or last_event_id
                        yield json.loads(sse.data)
            except APIConnectionError:
                failures += 1
                if failures > max_reconnects:
                    raise
            time.sleep(delay)

    def checkpoints(self, job_id: str, *, after: str | None = None, limit: int | None = None) -> dict[str, Any]:
        """`{"data": [checkpoint, …]}`, newest step first: `id`, `step_index`, `bytes`, `metrics`."""
        return self._client.request("GET", f"/v1/fine_tuning/jobs/{job_id}/checkpoints",
                                    params=_params(after=after, limit=limit))

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel now; returns the job. Raises APIError 409 for a finished job."""
        return self._client.request("POST", f"/v1/fine_tuning/jobs/{job_id}/cancel")

    def pause(self, job_id: str) -> dict[str, Any]:
        """Pause (queued: at once; running: after the step saves its state); returns the job."""
        return self._client.request("POST", f"/v1/fine_tuning/jobs/{job_id}/pause")

    def resume(self, job_id: str) -> dict[str, Any]:
        """Resume a paused job from its first unfinished step; returns the job."""
        return self._client.request("POST", f"/v1/fine_tuning/jobs/{job_id}/resume")

    def wait(self, job_id: str, *, timeout: float | None = None, poll_interval: float = 1.0) -> dict[str, Any]:
        """Poll until the job is succeeded, failed or cancelled; returns it. Raises TimeoutError after
        `timeout` seconds (None: no limit)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.retrieve(job_id)
            if job["status"] in TERMINAL_STATUSES:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout:.0f} s")
            time.sleep(poll_interval)


class Checkpoints(_Resource):
    """A job's checkpoints as files."""

    def download(self, job_id: str, checkpoint_id: str | None, path: str | os.PathLike[str], *,
                 extract: bool = False) -> int:
        """Save checkpoint `checkpoint_id` (None: the job's latest) to `path`: a tar file, or with
        `extract` a directory. Written to a hidden partial path first and renamed, so an interrupted
        download never looks complete. Returns the bytes received. Raises FileExistsError if `path`
        exists, APIError 404 for an unknown job or checkpoint (or a job with none yet)."""
        target = Path(path)
        if target.exists():
            raise FileExistsError(f"{target} already exists")
        if checkpoint_id is None:
            data = self._client.jobs.checkpoints(job_id, limit=1)["data"]
            if not data:
                raise APIError(f"job {job_id} has no checkpoint yet", status_code=404, code="not_found")
            checkpoint_id = data[0]["id"]
        partial = target.with_name(f".{target.name}.partial")
        tar_path = partial.with_suffix(".tar") if extract else partial
        size = 0
        url = f"/v1/fine_tuning/jobs/{job_id}/checkpoints/{checkpoint_id}/content"
        try:
            with self._client.stream("GET", url, timeout=_TRANSFER_TIMEOUT) as response:
                with open(tar_path, "wb") as fh:
                    for chunk in response.iter_bytes():
                        fh.write(chunk)
                        size += len(chunk)
            if extract:
                shutil.rmtree(partial, ignore_errors=True)
                with tarfile.open(tar_path) as tar:
                    tar.extractall(partial, filter="data")
                tar_path.unlink()
        except BaseException:
            tar_path.unlink(missing_ok=True)
            raise
        partial.rename(target)
        return size


class Models(_Resource):
    """`/v1/models`: registered base models and fine-tuned outputs."""

    def list(self) -> dict[str, Any]:
        """`{"object": "list", "data": [model, …]}`."""
        return self._client.request("GET", "/v1/models")

    def retrieve(self, model_id: str) -> dict[str, Any]:
        """One model. Raises APIError 404 when it is not registered (or not the caller's)."""
        return self._client.request("GET", f"/v1/models/{model_id}")

    def create(self, *, id: str, path: str, format: str = "hf",
               default_hyperparameters: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Register a model on the server's disk (admin key). Raises APIError 403 for other keys."""
        body = _params(id=id, path=path, format=format,
                       default_hyperparameters=dict(default_hyperparameters) if default_hyperparameters else None)
        return self._client.request("POST", "/v1/models", json=body)


def _raise_for_status(response: httpx.Response) -> None:
    if response.status_code >= 400:
        response.read()
        raise APIError.from_response(response)
