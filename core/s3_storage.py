"""An S3-compatible object store (AWS S3, MinIO, Ceph RGW, GCS's S3 interface) behind `Storage`.

Chosen by `SDPO_STORAGE_URL=s3://bucket/prefix`. The endpoint, region and credentials come from
boto3's standard configuration (`AWS_ENDPOINT_URL`, `AWS_REGION`/`AWS_DEFAULT_REGION`,
`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, `~/.aws/config`, instance roles), so MinIO or Ceph
work by setting the endpoint alone. Requests are signed and retried by botocore (standard retry
mode, backoff with jitter); uploads go through boto3's transfer manager (multipart, several parts
in flight) for files on disk; a request body goes up as a multipart upload fed from the request's
own thread, at most four 8 MiB parts in memory).

Layout under the prefix: one object per file (`files/file-…`, `chunks/ftjob-…/step-1.jsonl`), and
a tree (a checkpoint) as one object per file under `<key>/` plus its index `<key>/.sdpo-tree.json`,
written last: the index lists every file with its size and sha256, and a tree without one does
not exist for any reader (`exists`, `get_tree`, `iter_tar`). That is what the local store gets
from a rename: a checkpoint cut off half way is never visible.

A worker reads trees through a size-bounded local cache keyed by the tree's sha256 (over its
files' sha256, so the same checkpoint is the same entry on every host): every file is hashed while
it downloads and compared with the index before the tree is used; a mismatch or a missing object
raises `CorruptObject`. A tree this host uploaded enters the cache by a rename, so the next step
on the same host starts without a download.

URIs are `s3://bucket/prefix/key`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import boto3
import botocore.config
import botocore.exceptions
from boto3.s3.transfer import TransferConfig

from core.errors import PayloadTooLarge
from core.permissions import make_private_dir
from core.storage import (
    CorruptObject,
    PresignedObject,
    Storage,
    StorageUnavailable,
    StoredObject,
    _check_key,
    _tar_header,
)

if TYPE_CHECKING:  # boto3-stubs (the dev extra): the shapes of botocore's and S3's arguments
    from botocore.config import _RetryDict
    from mypy_boto3_s3.type_defs import ObjectIdentifierTypeDef

log = logging.getLogger(__name__)

S3_SCHEME = "s3://"
TREE_INDEX = ".sdpo-tree.json"
_READ_CHUNK = 1 << 20
_PART_BYTES = 8 << 20
_PARTS_IN_FLIGHT = 4
_BLOCK = 512

# Connection problems and server-side 5xx after botocore's own retries: the store is away.
_UNAVAILABLE = (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectionClosedError,
                botocore.exceptions.ReadTimeoutError, botocore.exceptions.ConnectTimeoutError,
                botocore.exceptions.NoCredentialsError)


def parse_s3_url(url: str) -> tuple[str, str]:
    """(bucket, prefix ending in "/" or empty) of `s3://bucket[/prefix]`. Raises ValueError."""
    if not url.startswith(S3_SCHEME):
        raise ValueError(f"not an s3:// url: {url!r}")
    bucket, _, prefix = url[len(S3_SCHEME):].partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {url!r}")
    prefix = prefix.strip("/")
    if prefix:
        _check_key(prefix)
    return bucket, (prefix + "/" if prefix else "")


def _unavailable(exc: BaseException) -> bool:
    if isinstance(exc, _UNAVAILABLE):
        return True
    if isinstance(exc, botocore.exceptions.ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return status >= 500
    return False


def _not_found(exc: BaseException) -> bool:
    return isinstance(exc, botocore.exceptions.ClientError) and exc.response.get("Error", {}).get("Code") in (
        "404", "NoSuchKey", "NotFound", "NoSuchBucket")


class _Translate:
    """Turns botocore's errors into the OSErrors callers already handle: FileNotFoundError for a
    missing object, `StorageUnavailable` for a store that cannot be reached (after retries)."""

    def __init__(self, what: str):
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is None or isinstance(exc, OSError | PayloadTooLarge):
            return
        if _not_found(exc):
            raise FileNotFoundError(f"{self.what}: no such object") from exc
        if _unavailable(exc):
            raise StorageUnavailable(f"the object store is unreachable ({self.what}: {type(exc).__name__})") from exc
        if isinstance(exc, botocore.exceptions.BotoCoreError | botocore.exceptions.ClientError):
            raise StorageUnavailable(f"the object store refused {self.what}: {exc}") from exc


class _HashingReader(io.RawIOBase):
    """A file object over an iterable of chunks: hashes and counts what is read, and raises
    `PayloadTooLarge` as soon as more than `max_bytes` have arrived (the transfer manager reads it
    part by part, so the request body is never whole in memory)."""

    def __init__(self, chunks: Iterable[bytes], max_bytes: int | None):
        self._chunks = iter(chunks)
        self._pending = b""
        self.digest = hashlib.sha256()
        self.size = 0
        self._max = max_bytes

    def readable(self) -> bool:
        return True

    def _next(self) -> bytes:
        for chunk in self._chunks:
            if not chunk:
                continue
            self.size += len(chunk)
            if self._max is not None and self.size > self._max:
                raise PayloadTooLarge(f"The file is larger than the limit of {self._max} bytes.", param="file")
            self.digest.update(chunk)
            return chunk
        return b""

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            out = [self._pending, *iter(self._next, b"")]
            self._pending = b""
            return b"".join(out)
        parts, have = [], 0
        while have < n:
            if not self._pending:
                self._pending = self._next()
                if not self._pending:
                    break
            take = self._pending[: n - have]
            self._pending = self._pending[len(take):]
            parts.append(take)
            have += len(take)
        return b"".join(parts)

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


class _S3Reader(io.RawIOBase):
    """A seekable, read-only file object over one S3 object: reads stream from the current position
    (one GET, reopened after a seek), so a sequential reader costs one request and a Parquet
    reader's footer look-up costs a ranged GET, never a download of the whole object."""

    def __init__(self, client: Any, bucket: str, key: str, size: int):
        self._client, self._bucket, self._key, self._size = client, bucket, key, size
        self._pos = 0
        self._body: Any = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        new = {io.SEEK_SET: offset, io.SEEK_CUR: self._pos + offset, io.SEEK_END: self._size + offset}[whence]
        if new < 0:
            raise ValueError("negative seek position")
        if new != self._pos:
            self._drop_body()
            self._pos = new
        return self._pos

    def _drop_body(self) -> None:
        if self._body is not None:
            self._body.close()
            self._body = None

    def readinto(self, b: Any) -> int:
        if self._pos >= self._size or len(b) == 0:
            return 0
        with _Translate(f"reading {self._key}"):
            if self._body is None:
                self._body = self._client.get_object(Bucket=self._bucket, Key=self._key,
                                                     Range=f"bytes={self._pos}-")["Body"]
            data = self._body.read(len(b))
        if not data:
            raise OSError(f"{self._key} ended at byte {self._pos} of {self._size}")
        b[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self) -> None:
        self._drop_body()
        super().close()


class S3Storage(Storage):
    """Objects in an S3 bucket under a prefix; a local cache of downloads under `cache_dir`
    (at most `cache_bytes`, least recently used trees go first)."""

    scheme = S3_SCHEME

    def __init__(self, url: str, cache_dir: str | os.PathLike, *, cache_bytes: int = 50 << 30,
                 max_attempts: int = 5, client: Any = None):
        self.url = url
        self.bucket, self.prefix = parse_s3_url(url)
        # Standard retry mode (exponential backoff with jitter on throttling, 5xx and connection
        # errors); AWS_MAX_ATTEMPTS / AWS_RETRY_MODE, when set, win over this default.
        retries: _RetryDict = {}
        if "AWS_RETRY_MODE" not in os.environ:
            retries["mode"] = "standard"
        if "AWS_MAX_ATTEMPTS" not in os.environ:
            retries["max_attempts"] = max_attempts
        config = botocore.config.Config(retries=retries or None, connect_timeout=5, read_timeout=60,
                                        max_pool_connections=16)
        # boto3 reads AWS_ENDPOINT_URL(_S3), the region and the credentials from the environment
        # and ~/.aws: a MinIO or Ceph endpoint needs no code here.
        self.client = client or boto3.session.Session().client("s3", config=config)
        self.transfer = TransferConfig(multipart_threshold=_PART_BYTES, multipart_chunksize=_PART_BYTES,
                                       max_concurrency=4, io_chunksize=256 << 10)
        self.cache = TreeCache(Path(cache_dir), cache_bytes)
        self._tmp_dir = Path(cache_dir) / ".tmp"

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    # -- keys and URIs

    def uri_for(self, key: str) -> str:
        _check_key(key)
        return f"{S3_SCHEME}{self.bucket}/{self.prefix}{key}"

    def _object_key(self, uri: str) -> str:
        start = f"{S3_SCHEME}{self.bucket}/{self.prefix}"
        if not uri.startswith(start):
            raise ValueError(f"not a uri of this store ({start}…): {uri!r}")
        key = uri[len(start):]
        _check_key(key)
        return self.prefix + key

    # -- probes

    def check(self) -> None:
        """Raises `StorageUnavailable` unless the bucket answers (readiness)."""
        with _Translate(f"HEAD bucket {self.bucket}"):
            self.client.head_bucket(Bucket=self.bucket)

    # -- objects

    def save_stream(self, key: str, chunks: Iterable[bytes], *, max_bytes: int | None = None) -> StoredObject:
        uri = self.uri_for(key)
        reader = _HashingReader(chunks, max_bytes)
        with _Translate(f"uploading {key}"):
            self._upload_stream(self._object_key(uri), reader)
        return StoredObject(uri=uri, sha256=reader.digest.hexdigest(), bytes=reader.size)

    def _upload_stream(self, object_key: str, reader: _HashingReader) -> None:
        """A multipart upload fed from `reader` in the calling thread, parts sent by a small pool.

        Not the transfer manager: it reads a stream in a thread of its own, and a request body
        can only be pulled from the thread serving the request (the API's event loop hands the
        chunks to that thread). At most `_PARTS_IN_FLIGHT` parts of `_PART_BYTES` are in memory.
        Any failure (a part, the caller's stream, a limit) aborts the upload: no billed parts
        stay behind, and no object appears."""
        data = reader.read(_PART_BYTES)
        if len(data) < _PART_BYTES:  # all of it fits in one part: one PUT
            self.client.put_object(Bucket=self.bucket, Key=object_key, Body=data)
            return
        upload_id = self.client.create_multipart_upload(Bucket=self.bucket, Key=object_key)["UploadId"]
        try:
            parts: list[concurrent.futures.Future] = []
            with concurrent.futures.ThreadPoolExecutor(max_workers=_PARTS_IN_FLIGHT) as pool:
                number = 1
                while data:
                    running = [f for f in parts if not f.done()]
                    if len(running) >= _PARTS_IN_FLIGHT:
                        concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
                    for done in parts:
                        if done.done() and (failure := done.exception()) is not None:
                            raise failure
                    parts.append(pool.submit(self._upload_part, object_key, upload_id, number, data))
                    number += 1
                    data = reader.read(_PART_BYTES)
                etags = [f.result() for f in parts]
            self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=object_key, UploadId=upload_id,
                MultipartUpload={"Parts": [{"PartNumber": i, "ETag": tag} for i, tag in enumerate(etags, 1)]})
        except BaseException:
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=object_key, UploadId=upload_id)
            except Exception:  # the store is away: its lifecycle rules expire the parts; the error is the upload's
                log.warning("could not abort the multipart upload of %s", object_key, exc_info=True)
            raise

    def _upload_part(self, object_key: str, upload_id: str, number: int, data: bytes) -> str:
        return self.client.upload_part(Bucket=self.bucket, Key=object_key, UploadId=upload_id,
                                       PartNumber=number, Body=data)["ETag"]

    def open(self, uri: str) -> BinaryIO:
        key = self._object_key(uri)
        with _Translate(f"opening {key}"):
            size = self.client.head_object(Bucket=self.bucket, Key=key)["ContentLength"]
        return io.BufferedReader(_S3Reader(self.client, self.bucket, key, size), buffer_size=_READ_CHUNK)

    def exists(self, uri: str) -> bool:
        key = self._object_key(uri)
        with _Translate(f"looking up {key}"):
            try:
                self.client.head_object(Bucket=self.bucket, Key=key)
                return True
            except botocore.exceptions.ClientError as exc:
                if not _not_found(exc):
                    raise
            try:
                self.client.head_object(Bucket=self.bucket, Key=f"{key}/{TREE_INDEX}")
                return True
            except botocore.exceptions.ClientError as exc:
                if not _not_found(exc):
                    raise
        return False

    def delete(self, uri: str) -> None:
        key = self._object_key(uri)
        with _Translate(f"deleting {key}"):
            # The index first: a tree stops existing before any of its files go.
            self.client.delete_objects(Bucket=self.bucket, Delete={
                "Objects": [{"Key": f"{key}/{TREE_INDEX}"}, {"Key": key}], "Quiet": True})
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=key + "/"):
                batch: list[ObjectIdentifierTypeDef] = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                if batch:
                    self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})

    def local_path(self, uri: str) -> Path:
        """A tree: its cached copy (downloaded and verified on a miss). A file: a cached download."""
        key = self._object_key(uri)
        index = self._find_index(key)
        if index is not None:
            return self._cached_tree(key, index)[0]
        return self.cache.object_path(hashlib.sha256(key.encode()).hexdigest(),
                                      lambda path: self._download_object(key, path))

    def _download_object(self, key: str, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
        try:
            with _Translate(f"downloading {key}"):
                self.client.download_file(self.bucket, key, str(tmp), Config=self.transfer)
            os.replace(tmp, path)  # objects are never rewritten under a key (ids are new every time)
        finally:
            tmp.unlink(missing_ok=True)

    # -- trees (checkpoints)

    def put_tree(self, local_dir: str | os.PathLike, key: str) -> str:
        return self._upload_tree(Path(local_dir), key)[0]

    def move_tree(self, local_dir: str | os.PathLike, key: str) -> str:
        """Upload, then keep the local folder as this host's cached copy (a rename into the cache):
        the next step here reads it without a download."""
        source = Path(local_dir)
        uri, index = self._upload_tree(source, key)
        self.cache.adopt(source, index)
        return uri

    def get_tree(self, uri: str, dest_dir: str | os.PathLike) -> Path:
        key = self._object_key(uri)
        index = self._read_index(key)
        dest = Path(dest_dir)
        if dest.exists():
            raise FileExistsError(dest)
        self._download_tree(key, index, dest)
        return dest

    def cached_tree(self, uri: str) -> tuple[Path, bool]:
        """(local copy of the tree at `uri`, whether it was already cached here). Raises
        `CorruptObject` when a file is missing or differs from the index, FileNotFoundError when
        there is no such tree, `StorageUnavailable` when the store cannot be reached."""
        key = self._object_key(uri)
        return self._cached_tree(key, self._read_index(key))

    # -- presigned URLs

    presigns = True

    def presign(self, uri: str, expires_in: int) -> str:
        key = self._object_key(uri)
        with _Translate(f"looking up {key}"):
            self.client.head_object(Bucket=self.bucket, Key=key)  # FileNotFoundError: no URL to nothing
            return self._presigned_get(key, expires_in)

    def presign_tree(self, uri: str, expires_in: int) -> list[PresignedObject]:
        key = self._object_key(uri)
        index = self._read_index(key)
        with _Translate(f"signing {key}"):
            return [PresignedObject(path=rel, url=self._presigned_get(f"{key}/{rel}", expires_in),
                                    sha256=meta["sha256"], bytes=meta["bytes"])
                    for rel, meta in sorted(index["files"].items())]

    def _presigned_get(self, object_key: str, expires_in: int) -> str:
        # Signed here with the store's credentials (SigV4, no request to the store).
        return self.client.generate_presigned_url("get_object", Params={"Bucket": self.bucket, "Key": object_key},
                                                  ExpiresIn=expires_in)

    @contextlib.contextmanager
    def leased_tree(self, uri: str) -> Iterator[tuple[Path, bool]]:
        """`cached_tree` held for the `with` block: no worker process on this host evicts the
        folder until the block ends (same errors)."""
        key = self._object_key(uri)
        index = self._read_index(key)
        with self.cache.lease(index, lambda dest: self._download_tree(key, index, dest)) as found:
            yield found

    def iter_tar(self, uri: str) -> Iterator[bytes]:
        key = self._object_key(uri)
        index = self._read_index(key)
        return self._tar_stream(key, index)

    # -- internals

    def _read_index(self, key: str) -> dict:
        """The tree's index (FileNotFoundError: no such tree, or one cut off before its index)."""
        index = self._find_index(key)
        if index is None:
            raise FileNotFoundError(f"no stored tree {key}")
        return index

    def _find_index(self, key: str) -> dict | None:
        try:
            with _Translate(f"reading the index of {key}"):
                body = self.client.get_object(Bucket=self.bucket, Key=f"{key}/{TREE_INDEX}")["Body"].read()
        except FileNotFoundError:
            return None
        return json.loads(body)

    def _upload_tree(self, source: Path, key: str) -> tuple[str, dict]:
        if not source.is_dir():
            raise NotADirectoryError(source)
        uri = self.uri_for(key)
        base = self._object_key(uri)
        if self._find_index(base) is not None:
            raise FileExistsError(f"a stored object already has this key: {key}")
        files = []
        for path in sorted(p for p in source.rglob("*") if p.is_file() and not p.is_symlink()):
            rel = path.relative_to(source).as_posix()
            if rel == TREE_INDEX:
                raise ValueError(f"{TREE_INDEX} is reserved in a stored tree")
            files.append((rel, path))
        index_files = {}
        try:
            for rel, path in files:
                digest = hashlib.sha256()
                size = 0
                with open(path, "rb") as f, _Translate(f"uploading {base}/{rel}"):
                    hashing = _FileHasher(f, digest)
                    # boto3-stubs types Fileobj as IO | StreamingBody; boto3 reads any object with read()
                    self.client.upload_fileobj(hashing, self.bucket, f"{base}/{rel}",  # type: ignore[arg-type]
                                               Config=self.transfer)
                    size = hashing.size
                index_files[rel] = {"bytes": size, "sha256": digest.hexdigest()}
            index = {"files": index_files, "sha256": tree_sha256(index_files)}
            # The index last: until it exists, no reader sees the tree.
            with _Translate(f"writing the index of {base}"):
                self.client.put_object(Bucket=self.bucket, Key=f"{base}/{TREE_INDEX}",
                                       Body=json.dumps(index, sort_keys=True).encode())
        except BaseException:
            try:
                self.delete(uri)
            except OSError:  # the store is away: the parts stay invisible (no index), the error is the upload's
                log.warning("could not remove the partial tree %s", uri, exc_info=True)
            raise
        return uri, index

    def _cached_tree(self, key: str, index: dict) -> tuple[Path, bool]:
        return self.cache.get(index, lambda dest: self._download_tree(key, index, dest))

    def _download_tree(self, key: str, index: dict, dest: Path) -> None:
        make_private_dir(self._tmp_dir)
        tmp = self._tmp_dir / uuid.uuid4().hex
        files = sorted(index["files"].items())
        # Each file is hashed in a thread while the next one downloads (a checkpoint in 5 GB shards: ~4.5 s
        # of sha256 per shard that no longer waits in line); every file is checked before the rename.
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        hashers = concurrent.futures.ThreadPoolExecutor(max(1, min(len(files), cpus, 8)),
                                                        thread_name_prefix="sdpo-s3-sha256")
        checks: list[tuple[str, dict, Path, concurrent.futures.Future[str]]] = []

        def check(done_only: bool) -> None:
            for rel, meta, target, digest in checks:
                if done_only and not digest.done():
                    continue
                if digest.result() != meta["sha256"] or target.stat().st_size != meta["bytes"]:
                    raise CorruptObject(f"{rel}: sha256 mismatch after download")

        try:
            for rel, meta in files:
                check(done_only=True)  # a corrupt file already hashed stops the download early
                target = tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    with _Translate(f"downloading {key}/{rel}"):
                        self.client.download_file(self.bucket, f"{key}/{rel}", str(target), Config=self.transfer)
                except FileNotFoundError as exc:
                    raise CorruptObject(f"{rel}: missing from the store") from exc
                checks.append((rel, meta, target, hashers.submit(_sha256_file, target)))
            check(done_only=False)
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(tmp, dest)
            except OSError:
                if not dest.is_dir():  # else another process on this host filled the same entry first
                    raise
        finally:
            hashers.shutdown(wait=True, cancel_futures=True)  # no thread still reads what is removed next
            shutil.rmtree(tmp, ignore_errors=True)

    def _tar_stream(self, key: str, index: dict) -> Iterator[bytes]:
        dirs: set[str] = set()
        now = int(time.time())
        for rel, meta in sorted(index["files"].items()):
            parts = rel.split("/")
            for depth in range(1, len(parts)):
                d = "/".join(parts[:depth])
                if d not in dirs:
                    dirs.add(d)
                    yield _tar_header(d, None, now)
            yield _tar_header(rel, meta["bytes"], now)
            sent = 0
            with _Translate(f"reading {key}/{rel}"):
                body = self.client.get_object(Bucket=self.bucket, Key=f"{key}/{rel}")["Body"]
                for block in body.iter_chunks(_READ_CHUNK):
                    sent += len(block)
                    yield block
            if sent != meta["bytes"]:
                raise CorruptObject(f"{rel}: {sent} bytes in the store, the index says {meta['bytes']}")
            if sent % _BLOCK:
                yield b"\0" * (_BLOCK - sent % _BLOCK)
        yield b"\0" * (2 * _BLOCK)


class _FileHasher(io.RawIOBase):
    """A local file read for an upload, hashed on the way (one read of the file, not two)."""

    def __init__(self, f: BinaryIO, digest: Any):
        self._f, self._digest, self.size = f, digest, 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._digest.update(data)
        self.size += len(data)
        return data

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


def tree_sha256(files: dict[str, dict]) -> str:
    """One sha256 for a stored tree: over its sorted `path sha256` lines (the same tree, the same
    digest, on any host)."""
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(f"{rel} {files[rel]['sha256']}\n".encode())
    return h.hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_READ_CHUNK):
            h.update(block)
    return h.hexdigest()


class TreeCache:
    """Local copies of stored trees, `root/trees/<tree sha256>/`, and of downloaded files (chunks,
    uploads), `root/objects/<sha256 of the key>`, at most `max_bytes` in all: the least recently
    used go first when a new one comes in (one that alone exceeds the bound is kept until the next).

    Several worker processes on one host share the folder. Each entry has a lock file,
    `root/locks/<entry name>` (POSIX `flock`): a process holds it shared while the entry is in use
    (from before it looks for the entry until it lets go of it, filling included), and an evictor
    takes it exclusive without waiting, so an entry that any process uses is skipped, never
    deleted under it. An evicted entry is renamed into `root/.trash` while locked (it disappears
    for everyone at once; a half-deleted folder is never seen as a cache hit) and its lock file
    unlinked, then deleted. One eviction pass runs at a time on the host (`root/.evict.lock`), so
    two processes filling at once do not both evict for the same bytes.

    `get`/`local_path` callers (worker/workdir.py) read the returned folder after the call, so the
    process keeps the entries it was given last pinned (`PINNED` of them, shared locks it holds
    until newer ones replace them, `release` or the process's end): a step's initial checkpoint,
    base model and chunk stay put while it trains, without the caller holding anything. `lease`
    holds one for exactly a `with` block."""

    PINNED = 4

    def __init__(self, root: Path, max_bytes: int):
        self.root = root
        self.max_bytes = max_bytes
        self.trees = root / "trees"
        self.objects = root / "objects"
        self.locks = root / "locks"
        self._pins: collections.OrderedDict[str, int] = collections.OrderedDict()  # entry name -> locked fd
        self._pins_lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def _entry(self, index: dict) -> Path:
        return self.trees / index["sha256"]

    # -- locks

    def _lock(self, name: str, mode: int) -> int | None:
        """An fd of `locks/<name>` holding flock `mode`; None when `mode` has LOCK_NB and another
        process holds it. Retries when an evictor unlinked the file while this process waited for
        it (the lock would be on a file nobody else can find)."""
        make_private_dir(self.locks)
        path = self.locks / name
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, mode)
            except BlockingIOError:
                os.close(fd)
                return None
            except BaseException:
                os.close(fd)
                raise
            try:
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)

    def _pin(self, name: str, fd: int) -> None:
        """Keep `fd` (a shared lock on entry `name`) until newer pins push it out."""
        drop: list[int] = []
        with self._pins_lock:
            old = self._pins.pop(name, None)
            if old is not None:
                drop.append(old)
            self._pins[name] = fd
            while len(self._pins) > self.PINNED:
                drop.append(self._pins.popitem(last=False)[1])
        for old_fd in drop:
            os.close(old_fd)  # releases that shared lock (another fd of this process may still hold one)

    def release(self) -> None:
        """Let go of every entry this process has pinned (they become evictable)."""
        with self._pins_lock:
            fds = list(self._pins.values())
            self._pins.clear()
        for fd in fds:
            os.close(fd)

    @contextlib.contextmanager
    def lease(self, index: dict, fill: Callable[[Path], None]) -> Iterator[tuple[Path, bool]]:
        """`get` for the `with` block only: (folder, hit) that no process evicts until the block ends."""
        entry = self._entry(index)
        fd = self._lock(entry.name, fcntl.LOCK_SH)
        assert fd is not None
        try:
            yield self._get_locked(entry, fill)
        finally:
            os.close(fd)

    # -- entries

    def get(self, index: dict, fill: Callable[[Path], None]) -> tuple[Path, bool]:
        """(the tree's folder, whether it was here already); `fill(folder)` makes it on a miss.
        The entry stays pinned by this process (see the class)."""
        entry = self._entry(index)
        fd = self._lock(entry.name, fcntl.LOCK_SH)
        assert fd is not None
        try:
            found = self._get_locked(entry, fill)
        except BaseException:
            os.close(fd)
            raise
        self._pin(entry.name, fd)
        return found

    def _get_locked(self, entry: Path, fill: Callable[[Path], None]) -> tuple[Path, bool]:
        # The entry's lock is held shared: no evictor removes it between the look and the use.
        if entry.is_dir():
            os.utime(entry)  # recently used
            self.hits += 1
            return entry, True
        make_private_dir(self.trees)
        fill(entry)  # two processes may fill at once: the second rename finds the first's folder
        os.utime(entry)
        self.misses += 1
        self.evict(keep=entry)
        return entry, False

    def object_path(self, name: str, fill: Callable[[Path], None]) -> Path:
        """`objects/<name>`, made by `fill(path)` when absent; pinned like `get`'s trees."""
        path = self.objects / name
        fd = self._lock(f"o-{name}", fcntl.LOCK_SH)
        assert fd is not None
        try:
            if path.is_file():
                os.utime(path)  # recently used
            else:
                make_private_dir(self.objects)
                fill(path)
                self.evict(keep=path)
        except BaseException:
            os.close(fd)
            raise
        self._pin(f"o-{name}", fd)
        return path

    def adopt(self, source: Path, index: dict) -> None:
        """Take a folder just uploaded as the cached copy of its tree (a rename; a copy across
        file systems is not worth it: it is simply not cached)."""
        entry = self._entry(index)
        make_private_dir(self.trees)
        fd = self._lock(entry.name, fcntl.LOCK_SH)
        try:
            try:
                os.rename(source, entry)
            except OSError:
                shutil.rmtree(source, ignore_errors=True)
                return
            self.evict(keep=entry)
        finally:
            if fd is not None:
                os.close(fd)

    def evict(self, keep: Path | None = None) -> None:
        """Remove the least recently used trees and downloaded files (chunks, uploads) until the
        cache holds at most `max_bytes` (`keep`, just used, stays even when alone too large, and
        so does every entry some process holds: see the class)."""
        make_private_dir(self.root)
        guard = os.open(self.root / ".evict.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(guard, fcntl.LOCK_EX)
            self._evict(keep)
        finally:
            os.close(guard)  # releases the host-wide eviction lock

    def _evict(self, keep: Path | None) -> None:
        trash = self.root / ".trash"
        if trash.is_dir():  # what a process killed mid-delete left (only evictors, one at a time, write here)
            for leftover in trash.iterdir():
                if leftover.is_dir():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink(missing_ok=True)
        entries = []
        for folder, prefix in ((self.trees, ""), (self.objects, "o-")):
            if not folder.is_dir():
                continue
            for entry in folder.iterdir():
                try:
                    if entry.is_dir():
                        size = sum(p.stat().st_size for p in entry.rglob("*") if p.is_file())
                    elif entry.name.startswith("."):  # a download in progress
                        continue
                    else:
                        size = entry.stat().st_size
                    entries.append((entry.stat().st_mtime, entry, prefix + entry.name, size))
                except FileNotFoundError:  # gone meanwhile (a rename of a fill that lost its race)
                    continue
        total = sum(e[3] for e in entries)
        for _, entry, lock_name, size in sorted(entries, key=lambda e: e[0]):
            if total <= self.max_bytes:
                break
            if entry == keep:
                continue
            fd = self._lock(lock_name, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if fd is None:
                continue  # in use by some process (or by this one): it stays
            try:
                make_private_dir(trash)
                doomed = trash / uuid.uuid4().hex
                try:
                    os.rename(entry, doomed)
                except FileNotFoundError:
                    continue
                (self.locks / lock_name).unlink(missing_ok=True)
            finally:
                os.close(fd)
            if doomed.is_dir():
                shutil.rmtree(doomed, ignore_errors=True)
            else:
                doomed.unlink(missing_ok=True)
            total -= size
