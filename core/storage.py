"""Object storage for uploads, chunks and checkpoints.

`Storage` is the interface the API and the worker use; `LocalStorage` keeps objects under one
folder (a shared volume when API and workers run on several hosts); `core.s3_storage.S3Storage`
keeps them in an S3-compatible bucket (`SDPO_STORAGE_URL=s3://bucket/prefix`), where
`local_path` and `get_tree` download into a size-bounded local cache.

Keys are always built by this service from ids (`files/file-…`, `checkpoints/ftjob-…/step-1`),
never from user input; `_check_key` refuses anything that could escape the root anyway. A user's
filename is kept as metadata in the database only.

URIs look like `local://files/file-abc`: relative to the store's root, so a volume mounted at a
different path on another host still resolves.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import tarfile
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from core.errors import PayloadTooLarge
from core.permissions import FILE_MODE, make_private_dir

LOCAL_SCHEME = "local://"
_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*$")
_BLOCK = 512
_READ_CHUNK = 1 << 20


class StorageUnavailable(OSError):
    """The store could not be reached (or refused the request) after its client's retries."""


class CorruptObject(OSError):
    """A stored object is missing or its bytes differ from the sha256 recorded for it."""


class PresignUnsupported(Exception):
    """This store hands out no presigned URLs (its objects are local files, not reachable by URL)."""


@dataclass(frozen=True)
class PresignedObject:
    """A URL that reads one stored file without credentials until it expires; `path` is the file's
    place in its tree ("" for a lone object), `sha256`/`bytes` what the store recorded for it."""

    path: str
    url: str
    sha256: str | None
    bytes: int | None


@dataclass(frozen=True)
class StoredObject:
    uri: str
    sha256: str
    bytes: int


class Storage(ABC):
    """Where files and checkpoints live. Every method takes or returns a storage URI."""

    scheme: str = ""

    def describe(self) -> str:
        """Where the store is, for errors and probes (no credentials)."""
        return type(self).__name__

    def check(self) -> None:
        """Raise `StorageUnavailable` (an OSError) unless the store can be used now (readiness)."""
        return None

    @abstractmethod
    def uri_for(self, key: str) -> str:
        """The URI an object stored under `key` has (or would have). Raises ValueError for a bad key."""

    #: Whether `presign` / `presign_tree` hand out URLs (an object store); the others raise.
    presigns = False

    def presign(self, uri: str, expires_in: int) -> str:
        """A URL that GETs the object at `uri` for `expires_in` seconds without credentials.
        Raises `PresignUnsupported` (this store), FileNotFoundError (no such object)."""
        raise PresignUnsupported(type(self).__name__)

    def presign_tree(self, uri: str, expires_in: int) -> list[PresignedObject]:
        """One presigned URL per file of the tree at `uri`, with the sha256 and size from its index,
        by path. Raises `PresignUnsupported`, FileNotFoundError (no such tree)."""
        raise PresignUnsupported(type(self).__name__)

    def cached_tree(self, uri: str) -> tuple[Path, bool]:
        """(a local folder holding the tree at `uri`, whether it was a cache hit). A store whose
        objects are local files has nothing to cache: always a hit, no copy."""
        return self.local_path(uri), True

    @abstractmethod
    def save_stream(self, key: str, chunks: Iterable[bytes], *, max_bytes: int | None = None) -> StoredObject:
        """Write `chunks` to `key` atomically, hashing as it goes.

        Raises `PayloadTooLarge` as soon as more than `max_bytes` arrive (the caller stops reading
        its input); nothing is left behind then, nor on any other error.
        """

    @abstractmethod
    def open(self, uri: str) -> BinaryIO:
        """The object's bytes, as a binary file object (the caller closes it)."""

    @abstractmethod
    def local_path(self, uri: str) -> Path:
        """A local path holding the object (for a remote store: a cached download)."""

    @abstractmethod
    def exists(self, uri: str) -> bool: ...

    @abstractmethod
    def delete(self, uri: str) -> None:
        """Remove an object or a tree. Deleting what does not exist is not an error."""

    @abstractmethod
    def put_tree(self, local_dir: str | os.PathLike, key: str) -> str:
        """Copy a directory (a checkpoint) into the store atomically; return its URI."""

    def move_tree(self, local_dir: str | os.PathLike, key: str) -> str:
        """Like put_tree, for a directory the caller no longer needs: a store may take it without
        copying (the local store renames it when it is on the same file system). The source is
        gone on success and left as it was on failure."""
        uri = self.put_tree(local_dir, key)
        shutil.rmtree(local_dir, ignore_errors=True)
        return uri

    @abstractmethod
    def get_tree(self, uri: str, dest_dir: str | os.PathLike) -> Path:
        """Copy a stored directory to `dest_dir` (which must not exist); return it."""

    @abstractmethod
    def iter_tar(self, uri: str) -> Iterator[bytes]:
        """Stream a stored directory as an uncompressed tar, without building it in memory."""


class LocalStorage(Storage):
    """Objects as files under `root`. Writes go to a temp name, are fsynced, then renamed, so a
    reader (or a crash) never sees half an object."""

    scheme = LOCAL_SCHEME

    def __init__(self, root: str | os.PathLike):
        # Users' data and models: folders this store creates are owner-only (0700), files 0600
        # (core/permissions.py); existing ones keep their modes.
        self.root = make_private_dir(Path(root).resolve())
        self._tmp = make_private_dir(self.root / ".tmp")

    def describe(self) -> str:
        return "local folder"

    def check(self) -> None:
        if not os.access(self._tmp, os.W_OK):
            raise StorageUnavailable(errno.EACCES, "the storage folder is not writable")

    # -- keys and URIs

    def uri_for(self, key: str) -> str:
        _check_key(key)
        return LOCAL_SCHEME + key

    def _path(self, uri: str) -> Path:
        if not uri.startswith(LOCAL_SCHEME):
            raise ValueError(f"not a local storage uri: {uri!r}")
        key = uri[len(LOCAL_SCHEME):]
        _check_key(key)
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root):  # belt and braces: _check_key already refuses ".."
            raise ValueError(f"storage key escapes the root: {key!r}")
        return path

    def _temp_path(self) -> Path:
        return self._tmp / uuid.uuid4().hex

    # -- objects

    def save_stream(self, key: str, chunks: Iterable[bytes], *, max_bytes: int | None = None) -> StoredObject:
        uri = self.uri_for(key)
        final = self._path(uri)
        tmp = self._temp_path()
        digest = hashlib.sha256()
        size = 0
        try:
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE), "wb") as out:
                for chunk in chunks:
                    if not chunk:
                        continue
                    size += len(chunk)
                    if max_bytes is not None and size > max_bytes:
                        raise PayloadTooLarge(
                            f"The file is larger than the limit of {max_bytes} bytes.", param="file")
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            make_private_dir(final.parent)
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return StoredObject(uri=uri, sha256=digest.hexdigest(), bytes=size)

    def open(self, uri: str) -> BinaryIO:
        return open(self._path(uri), "rb")

    def local_path(self, uri: str) -> Path:
        return self._path(uri)

    def exists(self, uri: str) -> bool:
        return self._path(uri).exists()

    def delete(self, uri: str) -> None:
        path = self._path(uri)
        if path.is_dir():
            # Rename first so a half-deleted tree is never visible under its key.
            doomed = self._temp_path()
            os.replace(path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    # -- trees (checkpoints)

    def put_tree(self, local_dir: str | os.PathLike, key: str) -> str:
        source = Path(local_dir)
        if not source.is_dir():
            raise NotADirectoryError(source)
        uri = self.uri_for(key)
        final = self._path(uri)
        tmp = self._temp_path()
        try:
            shutil.copytree(source, tmp)
            _restrict_tree(tmp)
            _fsync_tree(tmp)
            make_private_dir(final.parent)
            os.replace(tmp, final)  # fails if `final` is a non-empty directory: never overwrite
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return uri

    def move_tree(self, local_dir: str | os.PathLike, key: str) -> str:
        """A checkpoint the worker wrote under the store's root (its work folder) becomes an object by
        a rename: no second copy of multi-gigabyte weights between two sDPO steps. Files are fsynced
        first, as put_tree does; another file system falls back to put_tree's copy."""
        source = Path(local_dir)
        if not source.is_dir():
            raise NotADirectoryError(source)
        uri = self.uri_for(key)
        final = self._path(uri)
        _restrict_tree(source)
        _fsync_tree(source)
        make_private_dir(final.parent)
        if final.exists():
            raise FileExistsError(errno.EEXIST, "a stored object already has this key", str(final))
        try:
            os.rename(source, final)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            return super().move_tree(source, key)
        return uri

    def get_tree(self, uri: str, dest_dir: str | os.PathLike) -> Path:
        dest = Path(dest_dir)
        shutil.copytree(self._path(uri), dest)
        return dest

    def iter_tar(self, uri: str) -> Iterator[bytes]:
        root = self._path(uri)
        if not root.is_dir():
            raise FileNotFoundError(uri)
        return _tar_stream(root)


def _check_key(key: str) -> None:
    if not _KEY_RE.match(key) or any(part in (".", "..") for part in key.split("/")):
        raise ValueError(f"invalid storage key: {key!r}")


def _restrict_tree(root: Path) -> None:
    """A tree becoming a stored object loses group and other access bits (a checkpoint written by
    a process with a wider umask must not stay readable by everyone)."""
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            os.chmod(path, mode & 0o700)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())


def _tar_stream(root: Path) -> Iterator[bytes]:
    """Yield a tar of `root` (entries relative to it) a header or a megabyte at a time.

    `tarfile` would copy each member whole into its output; writing headers with `tobuf()` and
    the contents ourselves keeps memory flat for multi-gigabyte weight files.
    """
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        stat = path.stat()
        if path.is_dir():
            yield _tar_header(rel, None, int(stat.st_mtime))
            continue
        if not path.is_file():
            continue  # links and devices have no place in a checkpoint
        size = stat.st_size
        yield _tar_header(rel, size, int(stat.st_mtime))
        sent = 0
        with open(path, "rb") as f:
            while sent < size:
                block = f.read(min(_READ_CHUNK, size - sent))
                if not block:
                    raise OSError(f"{path} shrank while being sent")
                sent += len(block)
                yield block
        remainder = size % _BLOCK
        if remainder:
            yield b"\0" * (_BLOCK - remainder)
    yield b"\0" * (2 * _BLOCK)  # end-of-archive marker


def _tar_header(name: str, size: int | None, mtime: int) -> bytes:
    """A PAX tar header for a directory (`size` None) or a regular file of `size` bytes."""
    info = tarfile.TarInfo(name)
    info.mtime = mtime
    if size is None:
        info.type, info.mode = tarfile.DIRTYPE, 0o755
    else:
        info.size, info.mode = size, 0o644
    return info.tobuf(format=tarfile.PAX_FORMAT)


_STORES: dict[tuple, Storage] = {}


def make_storage(storage_dir: str | os.PathLike, url: str | None = None, *,
                 cache_bytes: int = 50 << 30) -> Storage:
    """The store for these settings: `url` `s3://bucket/prefix` is an S3-compatible bucket (with
    its local cache under `storage_dir/cache`), none the local folder `storage_dir`. One instance
    S3 store per configuration and process (its client's connection pool is worth reusing)."""
    if not url:
        return LocalStorage(storage_dir)
    if not url.startswith("s3://"):
        raise ValueError(f"SDPO_STORAGE_URL must be s3://bucket[/prefix], not {url!r}")
    key = (str(storage_dir), url, cache_bytes)
    store = _STORES.get(key)
    if store is None:
        from core.s3_storage import S3Storage  # boto3 only where an S3 store is configured

        store = _STORES[key] = S3Storage(url, Path(storage_dir) / "cache", cache_bytes=cache_bytes)
    return store
