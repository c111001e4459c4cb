"""Validate an upload while it streams into the store: the request's chunks go to the store and,
through a bounded pipe, to the validator running in a thread of its own, so a JSONL file is read
once (no read-back from the store afterwards) and the upload takes max(store, validate), not the
sum. A Parquet file (told by its first bytes) is validated after it is stored: its rows can only
be read from its footer, at the end.

Memory stays bounded: the pipe holds at most `PIPE_CHUNKS` chunks; when the validator falls
behind, the request thread waits (the client's upload slows down rather than the API filling up).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

PARQUET_MAGIC = b"PAR1"
PIPE_CHUNKS = 16
_HEAD_LIMIT = 1 << 20
_EOF = object()
_ABORT = object()


class _Aborted(Exception):
    """The writer gave up (the upload failed): the validator stops."""


class Pipe:
    """The writer thread `put`s chunks, then `close`s (or `abort`s); the reader thread reads them
    as a binary file with `read`, `readline` and `seek(0)` while within its first megabyte (how
    the validator tells Parquet from JSONL by the first four bytes)."""

    def __init__(self, maxsize: int = PIPE_CHUNKS, head_limit: int = _HEAD_LIMIT):
        self._queue: queue.Queue[Any] = queue.Queue(maxsize)
        self._head_limit = head_limit
        self.reader_gone = threading.Event()
        self._buf = b""
        self._pos = 0
        self._eof = False
        self._head = True  # the first megabyte read is kept, for seek(0)

    # -- writer side

    def put(self, chunk: Any) -> None:
        while not self.reader_gone.is_set():
            try:
                self._queue.put(chunk, timeout=0.2)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        self.put(_EOF)

    def abort(self) -> None:
        self.put(_ABORT)

    # -- reader side

    def _fill(self) -> bool:
        if self._eof:
            return False
        item = self._queue.get()
        if item is _ABORT:
            raise _Aborted()
        if item is _EOF:
            self._eof = True
            return False
        if self._head and len(self._buf) < self._head_limit:
            self._buf += item
        else:
            self._head = False
            self._buf = self._buf[self._pos:] + item
            self._pos = 0
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        if offset != 0 or whence != 0 or not self._head:
            raise OSError("a pipe only rewinds to its start, before its first megabyte")
        self._pos = 0
        return 0

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            while self._fill():
                pass
            out = self._buf[self._pos:]
        else:
            while len(self._buf) - self._pos < n and self._fill():
                pass
            out = self._buf[self._pos:self._pos + n]
        self._pos += len(out)
        return out

    def readline(self, limit: int = -1) -> bytes:
        searched = 0
        while True:
            end = len(self._buf) if limit < 0 else min(len(self._buf), self._pos + limit)
            found = self._buf.find(b"\n", self._pos + searched, end)
            if found >= 0:
                end = found + 1
                break
            if limit >= 0 and end - self._pos >= limit:
                break
            searched = end - self._pos  # _fill may move the unread bytes to the buffer's start
            if not self._fill():
                end = len(self._buf)
                break
        out = self._buf[self._pos:end]
        self._pos = end
        return out


class ValidatingTee:
    """Wraps the upload's chunks (`chunks()`, handed to the store) and validates them as they pass
    with `validate(file_object) -> report` in a thread, unless the file is Parquet (`report()` is
    then None and the caller validates the stored object)."""

    def __init__(self, source: Iterable[bytes], validate: Callable[[Any], dict[str, Any]]):
        self._source = source
        self._validate = validate
        self._pipe: Pipe | None = None
        self._thread: threading.Thread | None = None
        self._report: dict[str, Any] | None = None
        self._error: BaseException | None = None
        self.parquet = False

    def _run(self) -> None:
        assert self._pipe is not None
        try:
            self._report = self._validate(self._pipe)
        except _Aborted:
            pass
        except BaseException as exc:  # raised in the request's thread by report()
            self._error = exc
        finally:
            self._pipe.reader_gone.set()  # a writer waiting on a full pipe goes on

    def chunks(self) -> Iterator[bytes]:
        it = iter(self._source)
        head: list[bytes] = []
        size = 0
        for chunk in it:
            if chunk:
                head.append(chunk)
                size += len(chunk)
            if size >= len(PARQUET_MAGIC):
                break
        self.parquet = b"".join(head).startswith(PARQUET_MAGIC)
        if self.parquet:
            yield from head
            yield from it
            return
        self._pipe = Pipe()
        self._thread = threading.Thread(target=self._run, name="upload-validator", daemon=True)
        self._thread.start()
        for chunk in head:
            self._pipe.put(chunk)
            yield chunk
        for chunk in it:
            if chunk:
                self._pipe.put(chunk)
                yield chunk
        self._pipe.close()

    def abort(self) -> None:
        """The upload failed: stop the validator (it may be waiting for more bytes) and wait for it."""
        if self._pipe is not None and self._thread is not None:
            self._pipe.abort()
            self._thread.join()

    def report(self) -> dict[str, Any] | None:
        """The validator's report once the stream has ended (None for Parquet); re-raises its error."""
        if self._thread is None:
            return None
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._report
