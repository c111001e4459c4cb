"""Checkpoint manifests: parallel hashing, the atomic write (hashing and fsync overlapped), and a
checkpoint saved in several safetensors shards that the next sDPO step loads and verifies."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import pytest

from sdpo_engine import manifest
from sdpo_engine.manifest import (
    MANIFEST_NAME,
    file_hashes,
    read_manifest,
    tree_digest,
    verify_checkpoint,
    write_checkpoint_atomically,
)


def _tree(root: Path) -> dict[str, bytes]:
    """Files of different sizes, one in a subfolder, one empty."""
    files = {"a.bin": os.urandom(3 << 20), "b.bin": os.urandom(5000), "sub/c.json": b'{"x": 1}', "empty": b""}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def test_parallel_hashes_equal_serial_and_hashlib(tmp_path, monkeypatch):
    files = _tree(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("{}")  # never hashed
    expected = {rel: hashlib.sha256(data).hexdigest() for rel, data in files.items()}
    threads: set[str] = set()
    real = manifest.sha256_file

    def spy(path):
        threads.add(threading.current_thread().name)
        return real(path)

    monkeypatch.setattr(manifest, "sha256_file", spy)
    assert file_hashes(tmp_path, workers=1) == expected
    assert threads == {threading.current_thread().name}
    threads.clear()
    parallel = file_hashes(tmp_path, workers=4)
    assert parallel == expected and list(parallel) == sorted(expected)  # same order as the serial walk
    assert all(name.startswith("sdpo-sha256") for name in threads)
    assert manifest.hash_workers(1) == 1 and 1 <= manifest.hash_workers(100) <= 16


def test_atomic_write_hashes_fsyncs_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    out = tmp_path / "ckpt"
    written = write_checkpoint_atomically(out, _tree, {"step": 1})
    assert verify_checkpoint(out) == []
    assert read_manifest(out) == written and written["step"] == 1
    assert written["checkpoint_sha256"] == tree_digest(written["files"])
    # Every file, the manifest and every folder reached the disk (under the temporary name).
    names = {Path(p).name for p in synced}
    assert {"a.bin", "b.bin", "c.json", "empty", MANIFEST_NAME, "sub"} <= names
    assert any(Path(p).name.startswith(".ckpt.tmp-") for p in synced)

    # An fsync that fails (a full or broken disk) while the files are hashed: raised, nothing left.
    def failing(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("a.bin"):
            raise OSError(5, "Input/output error")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(OSError, match="Input/output"):
        write_checkpoint_atomically(tmp_path / "bad", _tree, {"step": 2})
    # A write that fails half-way: raised, nothing left either.
    def half(root: Path) -> None:
        (root / "model.safetensors").write_bytes(b"x" * 100)
        raise RuntimeError("disk full")

    monkeypatch.setattr(os, "fsync", real_fsync)
    with pytest.raises(RuntimeError, match="disk full"):
        write_checkpoint_atomically(tmp_path / "half", half, {"step": 3})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_checkpoint_in_shards_is_verified_and_trains_the_next_step(tmp_path, tiny_model, chunk_files, monkeypatch):
    """A model larger than CHECKPOINT_SHARD_SIZE is saved as several safetensors files and an index:
    each in the manifest, verified, and step 2 starts from it (and takes it as its reference) with the
    same weights as step 1 saved."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from sdpo_engine import step as step_module
    from sdpo_engine.step import run_step
    from tests.engine.test_step import _spec

    monkeypatch.setattr(step_module, "CHECKPOINT_SHARD_SIZE", "100KB")  # the tiny model is ~1 MB
    run_step(_spec(tmp_path, tiny_model, chunk_files[0]), emit=lambda e: None)
    out = tmp_path / "out-1"
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    files = read_manifest(out)["files"]
    assert set(shards) | {"model.safetensors.index.json"} <= set(files)
    assert verify_checkpoint(out) == []
    # One changed byte in one shard is found.
    victim = out / shards[1]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 1
    victim.write_bytes(bytes(data))
    assert verify_checkpoint(out) == [f"{shards[1]}: sha256 mismatch"]
    data[-1] ^= 1
    victim.write_bytes(bytes(data))

    saved = {k: v for shard in shards for k, v in load_file(out / shard).items()}
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype="float32").state_dict()
    assert all((loaded[k] == v).all() for k, v in saved.items())
    events: list[dict] = []
    summary = run_step(_spec(tmp_path, out, chunk_files[1], index=2), emit=events.append)
    assert summary["reference"]["sha256"] == read_manifest(out)["checkpoint_sha256"]
    assert abs(summary["first_loss"] - 0.6931) < 1e-3
