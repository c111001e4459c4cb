"""A Parquet upload of 100,000 pairs against the same pairs in JSONL: the API's peak memory growth and
time, and whether both get the same validation report (issue #13).

    python bench/parquet_upload.py                       # own servers: embedded SQLite in a temp folder
    python bench/parquet_upload.py --pairs 100000 --postgres postgresql+psycopg://postgres@127.0.0.1:5432/test

Writes the pairs (seeded; about 640 characters each, a `source` and an ignored `id` field) once as
JSONL and once as Parquet (pyarrow's defaults: one row group, dictionary encoding, snappy), then
for each file starts a fresh API process (uvicorn, as bench/api_load.py does, so each upload starts
from the same baseline), streams the file to POST /v1/files in 1 MB chunks (chunked transfer, so
nothing but the server's own streaming bounds its memory), and samples the API process's resident
memory every 10 ms. The Parquet file is uploaded a second time to the same process: the first
upload's growth includes importing pyarrow (about 40 MiB, once per process), the second's does not.
Columns:
  bytes     the file's size
  seconds   the upload's wall time (streaming, hashing, validating every row, the database row)
  rss       the API's resident memory before the upload, in MiB
  peak      its peak during the upload, in MiB
  growth    peak - rss, in MiB (the figure that must stay under --max-growth-mb for Parquet)
Exits 1 if an upload failed, the two reports (format, rows, stats, warnings) differ, or the Parquet
upload's growth reaches --max-growth-mb (150 MiB).
"""

from __future__ import annotations

import argparse
import json
import random
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.api_load import PeakRss, start_server  # noqa: E402

MIB = 1 << 20
WORDS = ("the of and to in is was for on that with as by at from it an be this are or which model data "
         "answer question prefer reason step result value").split()


def write_pairs(n: int, folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """`n` valid pairs as pairs.jsonl and pairs.parquet (the same rows, in the same order)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)

    def text(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    rows = [{"prompt": f"Question {i}: {text(30)}?", "chosen": f"Answer {i}: {text(60)}.",
             "rejected": f"Wrong {i}: {text(50)}.", "source": ("easy", "hard")[i % 2], "id": f"row-{i}"}
            for i in range(n)]
    jsonl, parquet = folder / "pairs.jsonl", folder / "pairs.parquet"
    with jsonl.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    return jsonl, parquet


def upload(url: str, key: str, api_pid: int, path: Path) -> dict:
    """Stream `path` as a multipart upload while sampling the API process's RSS."""
    boundary = "sdpo-bench-" + secrets.token_hex(8)

    def body():
        yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
               f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{path.name}\"\r\n"
               "Content-Type: application/octet-stream\r\n\r\n").encode()
        with path.open("rb") as f:
            while block := f.read(MIB):
                yield block
        yield f"\r\n--{boundary}--\r\n".encode()

    with PeakRss(api_pid, interval=0.01) as rss:
        started = time.perf_counter()
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=3600) as c:
            response = c.post("/v1/files", content=body(),
                              headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        seconds = time.perf_counter() - started
    ok = response.status_code == 200
    return {"status": response.status_code, "file": response.json() if ok else None,
            "error": None if ok else response.text[:500], "bytes": path.stat().st_size, "seconds": seconds,
            "rss_before": rss.before, "rss_peak": rss.peak}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=100_000)
    p.add_argument("--postgres", help="SQLAlchemy URL of a database to migrate and use (default: SQLite)")
    p.add_argument("--max-growth-mb", type=float, default=150.0)
    p.add_argument("--keep", action="store_true", help="keep the temp folder (files, server logs)")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="sdpo-bench-parquet-"))
    results = {}
    try:
        jsonl, parquet = write_pairs(args.pairs, work)
        for name, path in (("parquet", parquet), ("jsonl", jsonl)):
            home = work / f"home-{name}"
            home.mkdir()
            url, key, procs = start_server(home, args.postgres, None)
            try:
                results[name] = upload(url, key, procs[0].pid, path)
                if name == "parquet":  # again in the same process: pyarrow is imported by now
                    results["parquet, 2nd"] = upload(url, key, procs[0].pid, path)
            finally:
                for proc in procs:
                    proc.terminate()
                for proc in procs:
                    proc.wait(timeout=30)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    print(f"{args.pairs} pairs; API resident memory while each file uploads (fresh API process each)")
    print(f"{'file':<13} {'bytes':>11} {'seconds':>8} {'rss':>6} {'peak':>6} {'growth':>7}")
    for name, r in results.items():
        print(f"{name:<13} {r['bytes']:>11} {r['seconds']:>8.1f} {r['rss_before'] / MIB:>6.0f} "
              f"{r['rss_peak'] / MIB:>6.0f} {(r['rss_peak'] - r['rss_before']) / MIB:>7.0f}")
    failed = [f"{name}: HTTP {r['status']} {r['error']}" for name, r in results.items() if r["status"] != 200]
    if not failed:
        same = ("format", "rows", "stats", "warnings")
        a, b = results["parquet"]["file"], results["jsonl"]["file"]
        differ = [k for k in same if a[k] != b[k]]
        print(f"same report (format, rows, stats, warnings): {'yes' if not differ else 'NO: ' + ', '.join(differ)}")
        print("warnings: " + "; ".join(f"{w['code']} ({w['count']})" for w in a["warnings"]) if a["warnings"]
              else "warnings: none")
        if differ:
            failed.append(f"the reports differ in {', '.join(differ)}")
        growth = (results["parquet"]["rss_peak"] - results["parquet"]["rss_before"]) / MIB
        if growth >= args.max_growth_mb:
            failed.append(f"Parquet upload grew the API by {growth:.0f} MiB (limit {args.max_growth_mb:.0f})")
    for line in failed:
        print("FAILED: " + line)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
