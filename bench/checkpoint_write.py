"""A step's checkpoint write and the next step's verification, before and after sharded, parallel
hashing (`sdpo_engine.manifest`).

    python bench/checkpoint_write.py --size 0.5b --shard-size 500MB --repeats 3

transformers 5 saves up to 50 GB per safetensors file, and sha256 cannot split a file: the manifest's
hashes of a 7B float32 checkpoint (28 GB) took one core ~25 s after the write, and again each time a
worker verified it before the next step. The engine now saves shards of at most
`CHECKPOINT_SHARD_SIZE` (5 GB), hashes them on one thread per CPU, and fsyncs the files while they are
hashed. This machine has 2 cores and 24 GiB, so the model is scaled down with the shard size: a random
Qwen2 of `--size` (0.5b: 0.54B parameters, 2.15 GB in float32) in shards of `--shard-size` stands for a
7B float32 model in 5 GB shards (about 4-6 files either way).

Both sides write the same in-memory model in one process, alternating which goes first:
  (a) before:  save_pretrained(max_shard_size="50GB"): one file; sha256 of each file on one thread;
               then fsync of every file, the manifest and the folders; rename
  (b) now:     write_checkpoint_atomically with save_pretrained(max_shard_size=--shard-size): what
               sdpo_engine.step does
Columns (medians over the repeats of each repeat's a/b): wall a/b is the whole write (save, hash,
fsync, rename); after-save a/b the part after save_pretrained returned (hash and fsync: what this
change touches); verify a/b is `verify_checkpoint` of each, as worker/flows.py runs it before the
next step (page cache warm for both). `same` says the tensors of a's file and b's shards are equal.
Raw output goes where --out says (bench/results/...).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def build(size: str):
    import torch
    from gpu_check import SIZES
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hidden, layers, heads, kv, inter, vocab = SIZES[size]
    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, intermediate_size=inter, tie_word_embeddings=True)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config)


def write_before(model, out: Path) -> dict[str, float]:
    """The write as it was: one file, hashed on one thread, then fsynced (the old manifest.py)."""
    from sdpo_engine.manifest import MANIFEST_NAME, _fsync_dirs, _fsync_files, file_hashes, tree_digest

    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    model.save_pretrained(tmp, safe_serialization=True, max_shard_size="50GB")
    t1 = time.perf_counter()
    hashes = file_hashes(tmp, workers=1)
    (tmp / MANIFEST_NAME).write_text(json.dumps({"files": hashes, "checkpoint_sha256": tree_digest(hashes)}))
    _fsync_files(tmp)
    _fsync_dirs(tmp)
    os.rename(tmp, out)
    t2 = time.perf_counter()
    return {"wall": t2 - t0, "after_save": t2 - t1}


def write_now(model, out: Path, shard_size: str) -> dict[str, float]:
    from sdpo_engine.manifest import write_checkpoint_atomically

    marks: dict[str, float] = {}

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=shard_size)
        marks["saved"] = time.perf_counter()

    t0 = time.perf_counter()
    write_checkpoint_atomically(out, write, {})
    t2 = time.perf_counter()
    return {"wall": t2 - t0, "after_save": t2 - marks["saved"]}


def tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="0.5b", help="a bench/gpu_check.py SIZES name (0.5b, 19m, tiny)")
    p.add_argument("--shard-size", default="500MB", help="(b)'s max_shard_size")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    args = p.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    from sdpo_engine.manifest import hash_workers, verify_checkpoint

    model = build(args.size)
    n_params = sum(q.numel() for q in model.parameters())
    root = Path(tempfile.mkdtemp(prefix="sdpo-ckpt-bench-", dir=args.dir))
    rows = []
    same = True
    try:
        for r in range(args.repeats):
            a_dir, b_dir = root / f"a{r}", root / f"b{r}"
            order = ("a", "b") if r % 2 == 0 else ("b", "a")
            got: dict[str, dict] = {}
            for side in order:
                got[side] = write_before(model, a_dir) if side == "a" else write_now(model, b_dir, args.shard_size)
            for side, folder in (("a", a_dir), ("b", b_dir)):
                t = time.perf_counter()
                assert verify_checkpoint(folder) == []
                got[side]["verify"] = time.perf_counter() - t
            if r == 0:
                ta, tb = tensors(a_dir), tensors(b_dir)
                same = ta.keys() == tb.keys() and all((ta[k] == tb[k]).all() for k in ta)
                files_b = len(list(b_dir.glob("*.safetensors")))
                bytes_a = sum(f.stat().st_size for f in a_dir.glob("*.safetensors"))
                del ta, tb
            rows.append(got)
            print(f"repeat {r + 1} ({'/'.join(order)} first): " + "  ".join(
                f"{side}: wall {got[side]['wall']:.2f} s, after save {got[side]['after_save']:.2f} s, "
                f"verify {got[side]['verify']:.2f} s" for side in ("a", "b")), flush=True)
            shutil.rmtree(a_dir)
            shutil.rmtree(b_dir)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    def med(key: str) -> float:
        return statistics.median(g["a"][key] / g["b"][key] for g in rows)

    def sec(side: str, key: str) -> float:
        return statistics.median(g[side][key] for g in rows)

    print(f"\nmodel: random Qwen2 {args.size}, {n_params / 1e9:.2f}B parameters, {bytes_a / 1e9:.2f} GB of safetensors; "
          f"(a) 1 file, (b) {files_b} files of at most {args.shard_size}, hashed on {hash_workers(files_b)} threads "
          f"({os.cpu_count()} CPUs); {args.repeats} repeats")
    print("| wall a/b | a s | b s | after-save a/b | a s | b s | verify a/b | a s | b s | same |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| **{med('wall'):.2f}** | {sec('a', 'wall'):.2f} | {sec('b', 'wall'):.2f} "
          f"| **{med('after_save'):.2f}** | {sec('a', 'after_save'):.2f} | {sec('b', 'after_save'):.2f} "
          f"| **{med('verify'):.2f}** | {sec('a', 'verify'):.2f} | {sec('b', 'verify'):.2f} | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
