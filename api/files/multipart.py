"""A streaming reader for the upload's multipart body.

Starlette's `request.form()` spools the whole file to a temporary file before the endpoint runs,
so a 50 GB upload would be written out in full before its size could be refused. This reader
yields the file part's bytes while the request is still arriving, so the storage layer can hash
them, write them once, and stop at the size limit.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from python_multipart.multipart import MultipartParseError, MultipartParser, parse_options_header

from core.errors import InvalidRequest

FILE_FIELD = "file"
MAX_FIELD_BYTES = 64 * 1024
MAX_PARTS = 16
MAX_HEADER_BYTES = 8 * 1024
# Form fields the OpenAI SDK may send that this service accepts and ignores.
IGNORED_FIELDS = ("expires_after[anchor]", "expires_after[seconds]")


class MultipartUpload:
    """Parse a multipart/form-data body with exactly one file part named `file`.

    Iterate `file_chunks(raw_chunks)` to receive the file's bytes; once it is exhausted,
    `fields` holds the text fields and `filename` the client's file name.
    """

    def __init__(self, content_type: str | None, allowed_fields: Iterable[str]):
        mime, options = parse_options_header(content_type or "")
        boundary = options.get(b"boundary")
        if mime != b"multipart/form-data" or not boundary:
            raise InvalidRequest("Uploads must be sent as multipart/form-data with a 'file' part.",
                                 param="file", code="invalid_content_type")
        self.allowed = set(allowed_fields) | set(IGNORED_FIELDS)
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self.saw_file = False
        self._pending: list[bytes] = []
        self._parts = 0
        self._header_field = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._current: str | None = None  # FILE_FIELD, a text field name, or None
        self._field_buffer = bytearray()
        self._finished = False
        self._parser = MultipartParser(boundary, callbacks={
            "on_part_begin": self._part_begin,
            "on_header_field": self._on_header_field,
            "on_header_value": self._on_header_value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        })

    def file_chunks(self, raw_chunks: Iterable[bytes]) -> Iterator[bytes]:
        for raw in raw_chunks:
            if not raw:
                continue
            try:
                self._parser.write(raw)
            except MultipartParseError:
                raise InvalidRequest("The multipart body is malformed.", param="file",
                                     code="invalid_multipart") from None
            if self._pending:
                pending, self._pending = self._pending, []
                yield from pending
        if not self._finished:
            raise InvalidRequest("The multipart body ended early.", param="file", code="invalid_multipart")
        if not self.saw_file:
            raise InvalidRequest("Missing required parameter: 'file'.", param="file",
                                 code="missing_required_parameter")

    # -- parser callbacks

    def _part_begin(self) -> None:
        self._parts += 1
        if self._parts > MAX_PARTS:
            raise InvalidRequest("Too many parts in the multipart body.", code="invalid_multipart")
        self._headers = {}
        self._current = None
        self._field_buffer = bytearray()

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]
        self._check_header_size()

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]
        self._check_header_size()

    def _check_header_size(self) -> None:
        # A part's headers are a line or two; without a bound they would grow with the body.
        if len(self._header_field) + len(self._header_value) > MAX_HEADER_BYTES or len(self._headers) > 16:
            raise InvalidRequest("A part's headers in the multipart body are too long.", code="invalid_multipart")

    def _header_end(self) -> None:
        self._headers[self._header_field.lower()] = self._header_value
        self._header_field = b""
        self._header_value = b""

    def _headers_finished(self) -> None:
        _disposition, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if name == FILE_FIELD:
            if self.saw_file:
                raise InvalidRequest("Send exactly one file per upload.", param="file", code="invalid_value")
            self.saw_file = True
            raw_name = options.get(b"filename", b"")
            self.filename = raw_name.decode("utf-8", "replace")
        elif name not in self.allowed:
            raise InvalidRequest(f"Unknown parameter: '{name}'.", param=name or None, code="unknown_parameter")
        self._current = name

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._current == FILE_FIELD:
            self._pending.append(bytes(data[start:end]))
            return
        self._field_buffer += data[start:end]
        if len(self._field_buffer) > MAX_FIELD_BYTES:
            raise InvalidRequest(f"The form field '{self._current}' is too long.", param=self._current,
                                 code="invalid_value")

    def _part_end(self) -> None:
        if self._current and self._current != FILE_FIELD:
            self.fields[self._current] = self._field_buffer.decode("utf-8", "replace")
        self._current = None

    def _end(self) -> None:
        self._finished = True
