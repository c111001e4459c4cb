"""The row cap under a file past it: how soon the API refuses it, and what that costs its memory.

    python bench/row_cap.py                      # 1,500,000 rows against the default cap (1,000,000)
    python bench/row_cap.py --rows 1000000       # a file exactly at the cap: accepted, validated whole

Starts uvicorn on the embedded SQLite service in a temp folder (real API process, default settings
but the per-owner quotas, which a benchmark owner would hit), then streams one JSONL upload of
--rows pairs (~70-byte lines, generated on the fly, chunked transfer, no Content-Length) over a raw
socket: the sender stops as soon as the server answers or closes, as a client sending a large
body does. It samples the API process's resident memory every 20 ms (as bench/api_load.py does)
and prints the answer, the seconds from the first byte to the answer, the bytes the client got to
send, and the API's RSS before and at its peak.

Issue #20 measured the refusal before the stream counted rows: 1.5M rows refused after 34 s with a
279 MB API peak (the whole file stored, then parsed, with a 16-byte digest kept per row).
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.api_load import PeakRss, start_server  # noqa: E402


def _blocks(rows: int, boundary: str):
    yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
           f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.jsonl\"\r\n"
           "Content-Type: application/jsonl\r\n\r\n").encode()
    for start in range(0, rows, 4096):
        yield "".join(json.dumps({"prompt": f"What is {i} + {i}?", "chosen": f"{2 * i}.",
                                  "rejected": f"{2 * i + 1}."}) + "\n"
                      for i in range(start, min(rows, start + 4096))).encode()
    yield f"\r\n--{boundary}--\r\n".encode()


def upload(url: str, key: str, api_pid: int, rows: int) -> dict:
    """Send the upload chunked over a raw socket while reading the answer; sample the API's RSS."""
    host, port = url.removeprefix("http://").split(":")
    boundary = "sdpo-bench-" + secrets.token_hex(8)
    sock = socket.create_connection((host, int(port)))
    sock.sendall((f"POST /v1/files HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
                  f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
                  "Transfer-Encoding: chunked\r\n\r\n").encode())
    answered = threading.Event()
    sent = [0]

    def send() -> None:
        try:
            for block in _blocks(rows, boundary):
                if answered.is_set():
                    return
                sock.sendall(f"{len(block):x}\r\n".encode() + block + b"\r\n")
                sent[0] += len(block)
            sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the server answered and closed: the refusal of a body it will not read

    sender = threading.Thread(target=send, daemon=True)
    raw = b""
    with PeakRss(api_pid) as rss:
        started = time.perf_counter()
        sender.start()
        try:
            while b"\r\n\r\n" not in raw:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                raw += chunk
            seconds = time.perf_counter() - started
            answered.set()
            head, _, body = raw.partition(b"\r\n\r\n")
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            while len(body) < length:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                body += chunk
        finally:
            answered.set()
            sender.join(timeout=30)
            time.sleep(0.3)  # one more sample after the answer
            sock.close()
    status = int(head.split(b" ", 2)[1]) if head else None
    return {"status": status, "body": json.loads(body) if body else None, "seconds": seconds,
            "sent_bytes": sent[0], "rss_before": rss.before, "rss_peak": rss.peak}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_500_000)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="sdpo-row-cap-"))
    procs: list = []
    try:
        # The service's own row cap (SDPO_MAX_FILE_ROWS unset), no storage or upload-rate quota in the way.
        url, key, procs = start_server(home, None, None, extra_env={
            "SDPO_MAX_FILE_ROWS": None, "SDPO_MAX_STORAGE_BYTES_PER_OWNER": "0", "SDPO_MAX_UPLOADS_PER_MINUTE": "0"})
        result = upload(url, key, procs[0].pid, args.rows)
        stored = sum(1 for p in (home / "storage").rglob("*") if p.is_file())
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)
        shutil.rmtree(home, ignore_errors=True)
    mib = 1 << 20
    error = (result["body"] or {}).get("error") or {}
    total = sum(len(b) for b in _blocks(args.rows, "sdpo-bench-0000000000000000"))
    print(f"{args.rows:,} rows ({total / 1e6:.0f} MB): HTTP {result['status']} {error.get('code') or ''} "
          f"after {result['seconds']:.2f} s; the client sent {result['sent_bytes'] / 1e6:.1f} MB; "
          f"files left in storage: {stored}")
    if error:
        print(f"  {error.get('message')}")
    growth = result["rss_peak"] - result["rss_before"]
    print(f"API RSS {result['rss_before'] / mib:.0f} MiB before, peak {result['rss_peak'] / mib:.0f} MiB "
          f"(+{growth / mib:.0f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
