"""Two worker processes share one cache folder with a bound smaller than two trees, and read ten
stored trees in random order at the same time: each fill evicts what the other may be reading.
No process ever finds a file of a tree it was handed missing or different from the index (the
entry's lock keeps it), and afterwards the folder holds whole trees within the bound and no
leftovers. Real processes, a real S3-protocol server (moto), real flock."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from core.s3_storage import S3Storage

FILES, FILE_BYTES = 8, 32 << 10  # a tree: 8 files of 32 KiB (256 KiB)
BOUND = 300 << 10  # room for one tree, not two
TREES = 10  # more than the two processes pin together (TreeCache.PINNED each)


def test_two_processes_fill_and_evict_one_small_cache_at_once(moto_server, tmp_path, monkeypatch):
    for name, value in moto_server.env().items():
        monkeypatch.setenv(name, value)
    url = f"s3://{moto_server.new_bucket()}/p"
    uploader = S3Storage(url, tmp_path / "uploader-cache", max_attempts=2)
    uris = []
    for t in range(TREES):
        src = tmp_path / f"tree-{t}"
        src.mkdir()
        for f in range(FILES):
            (src / f"shard-{f}.bin").write_bytes(os.urandom(FILE_BYTES))
        uris.append(uploader.put_tree(src, f"checkpoints/j/ck-{t}"))

    cache = tmp_path / "shared-cache"
    root = Path(__file__).resolve().parents[2]
    procs = [subprocess.Popen([sys.executable, "-m", "tests.storage.cache_race_child", url, str(cache), str(BOUND),
                               str(seed), "40", *uris], cwd=root, env=os.environ.copy(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for seed in (1, 2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))

    for result in results:
        assert result["errors"] == [], result
        assert result["reads"] == 40
    # The race happened: trees were evicted and fetched again (10 trees, 80 reads, room for one).
    assert sum(r["misses"] for r in results) > 2 * TREES, results

    store = S3Storage(url, cache, cache_bytes=BOUND)
    indexes = {index["sha256"]: index for index in (store._read_index(store._object_key(u)) for u in uris)}
    store.cache.evict()  # both processes are gone: nothing is pinned any more
    entries = list((cache / "trees").iterdir())
    assert sum(p.stat().st_size for e in entries for p in e.rglob("*") if p.is_file()) <= BOUND
    for entry in entries:  # every entry left is a whole tree
        index = indexes[entry.name]
        assert sorted(p.name for p in entry.iterdir()) == sorted(index["files"])
        for rel, meta in index["files"].items():
            assert hashlib.sha256((entry / rel).read_bytes()).hexdigest() == meta["sha256"]
    assert not list((cache / ".trash").glob("*"))
    assert not list((cache / ".tmp").glob("*"))
