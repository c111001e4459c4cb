"""One worker process of tests/storage/test_cache_race.py: reads stored trees through the shared
cache folder and checks every file of every tree it is handed against the tree's index.

    python -m tests.storage.cache_race_child URL CACHE_DIR CACHE_BYTES SEED ITERATIONS URI...

Prints one JSON line: {"hits", "misses", "reads", "errors": [first few problems]}. The endpoint and
credentials come from the standard AWS variables."""

from __future__ import annotations

import hashlib
import json
import random
import sys
from pathlib import Path

from core.s3_storage import S3Storage


def _check(folder: Path, index: dict) -> list[str]:
    problems = []
    for rel, meta in sorted(index["files"].items()):
        try:
            data = (folder / rel).read_bytes()
        except OSError as exc:
            problems.append(f"{rel}: {type(exc).__name__}")
            continue
        if hashlib.sha256(data).hexdigest() != meta["sha256"]:
            problems.append(f"{rel}: sha256 differs ({len(data)} bytes)")
    return problems


def main(argv: list[str]) -> None:
    url, cache_dir, cache_bytes, seed, iterations, *uris = argv
    store = S3Storage(url, Path(cache_dir), cache_bytes=int(cache_bytes))
    indexes = {uri: store._read_index(store._object_key(uri)) for uri in uris}
    rng = random.Random(int(seed))
    errors: list[str] = []
    reads = 0
    for k in range(int(iterations)):
        uri = rng.choice(uris)
        if k % 2:  # the worker's way: a pinned entry, read after the call
            folder, _ = store.cached_tree(uri)
            problems = _check(folder, indexes[uri])
        else:  # an explicit lease
            with store.leased_tree(uri) as (folder, _):
                problems = _check(folder, indexes[uri])
        reads += 1
        errors += [f"{uri.rsplit('/', 1)[-1]} ({'pinned' if k % 2 else 'leased'}): {p}" for p in problems]
    print(json.dumps({"hits": store.cache.hits, "misses": store.cache.misses, "reads": reads, "errors": errors[:10]}))


if __name__ == "__main__":
    main(sys.argv[1:])
