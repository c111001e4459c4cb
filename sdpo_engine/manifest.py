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
from pathlib import Path

MANIFEST_NAME = "sdpo_manifest.json"
_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def file_hashes(root: str | Path) -> dict[str, str]:
    """sha256 of every regular file under `root` except the manifest, keyed by POSIX relative path."""
    root = Path(root)
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name != MANIFEST_NAME:
            out[path.relative_to(root).as_posix()] = sha256_file(path)
    return out


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


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
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
        hashes = file_hashes(tmp)
        manifest = {**manifest, "files": hashes, "checkpoint_sha256": tree_digest(hashes)}
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        _fsync_tree(tmp)
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
