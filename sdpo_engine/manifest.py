"""Checkpoints that describe themselves: file hashes, a digest of the whole tree, atomic writes.

Pure Python: the worker and the API can verify a checkpoint without importing torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MANIFEST_NAME = "sdpo_manifest.json"
_CHUNK = 1 << 20
# The largest safetensors file of a checkpoint the engine writes (`save_pretrained(max_shard_size=...)`).
# transformers 5 writes up to 50 GB per file; sha256 runs ~1.1 GB/s on one core and cannot split a file,
# so a 7B float32 checkpoint in one 28 GB file took ~25 s to hash after writing and again at every
# verification. At 5 GB (the hub's long-standing shard size) its 6 files hash on 6 cores at once.
CHECKPOINT_SHARD_SIZE = "5GB"


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def hash_workers(n_files: int) -> int:
    """Threads to hash `n_files` with: one per file up to the CPUs this process may use (at most 16)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(n_files, cpus, 16))


def file_hashes(root: str | Path, *, workers: int | None = None) -> dict[str, str]:
    """sha256 of every regular file under `root` except the manifest, keyed by POSIX relative path.

    Files are hashed in parallel, `workers` threads (default `hash_workers`): hashlib releases the GIL
    while it hashes a block, so a sharded checkpoint takes about as long as its largest shard."""
    root = Path(root)
    paths = [p for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST_NAME]
    workers = workers or hash_workers(len(paths))
    if workers == 1:
        digests = [sha256_file(p) for p in paths]
    else:
        # The largest first, so one big file does not start last.
        with ThreadPoolExecutor(workers, thread_name_prefix="sdpo-sha256") as pool:
            futures = {p: pool.submit(sha256_file, p) for p in sorted(paths, key=lambda p: -p.stat().st_size)}
            digests = [futures[p].result() for p in paths]
    return {p.relative_to(root).as_posix(): d for p, d in zip(paths, digests, strict=True)}


def tree_digest(hashes: dict[str, str]) -> str:
    """One sha256 for a checkpoint: over the sorted `path sha256` lines, so it names the exact files."""
    h = hashlib.sha256()
    for rel in sorted(hashes):
        h.update(f"{rel} {hashes[rel]}\n".encode())
    return h.hexdigest()


def checkpoint_identity(path: str | Path) -> dict:
    """Who a checkpoint is: its path and digest (from its manifest when present, else hashed now)."""
    path = Path(path).resolve()
    manifest = read_manifest(path)
    if manifest and manifest.get("checkpoint_sha256"):
        return {"path": str(path), "sha256": manifest["checkpoint_sha256"], "step": manifest.get("step")}
    return {"path": str(path), "sha256": tree_digest(file_hashes(path)), "step": None}


def read_manifest(path: str | Path) -> dict | None:
    p = Path(path) / MANIFEST_NAME
    if not p.is_file():
        return None
    return json.loads(p.read_text())


def verify_checkpoint(path: str | Path) -> list[str]:
    """Files whose bytes differ from the manifest (or are missing/extra). Empty list = intact."""
    manifest = read_manifest(path)
    if manifest is None:
        return [f"{MANIFEST_NAME} missing"]
    expected = manifest.get("files", {})
    actual = file_hashes(path)
    problems = [f"{rel}: missing" for rel in expected if rel not in actual]
    problems += [f"{rel}: unexpected file" for rel in actual if rel not in expected]
    problems += [f"{rel}: sha256 mismatch" for rel in expected if rel in actual and actual[rel] != expected[rel]]
    return problems


def _fsync_files(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())


def _fsync_dirs(root: Path) -> None:
    for d in [root, *[p for p in root.rglob("*") if p.is_dir()]]:
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_checkpoint_atomically(out_dir: str | Path, write: Callable[[Path], None], manifest: dict) -> dict:
    """Let `write(tmp_dir)` fill a temp dir beside `out_dir`, add the manifest last, fsync, rename.

    A reader either sees no `out_dir` or a complete one with a manifest that matches its files: a
    crash mid-write leaves only a `.name.tmp-*` folder that nothing else looks at.
    Returns the manifest as written (with `files` and `checkpoint_sha256`).
    """
    out = Path(out_dir).resolve()
    if out.exists():
        raise FileExistsError(f"output checkpoint {out} already exists")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        # The files go to disk while they are hashed (both read the same page cache; fsync waits on the
        # disk, hashing on the CPU), instead of one after the other.
        with ThreadPoolExecutor(1, thread_name_prefix="sdpo-fsync") as syncer:
            synced = syncer.submit(_fsync_files, tmp)
            hashes = file_hashes(tmp)
        synced.result()  # an fsync error is raised here, in the caller's thread
        manifest = {**manifest, "files": hashes, "checkpoint_sha256": tree_digest(hashes)}
        manifest_path = tmp / MANIFEST_NAME
        manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True))
        with open(manifest_path, "rb") as fh:
            os.fsync(fh.fileno())
        _fsync_dirs(tmp)
        os.rename(tmp, out)
        fd = os.open(out.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
