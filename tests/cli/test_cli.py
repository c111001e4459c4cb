"""The `sdpo files|jobs|checkpoints` client: a job from upload to download through the command line
only, against the real service (uvicorn, a Celery worker with beat, Postgres, Redis, TRL), with a
webhook receiver told about the steps and the job as they succeed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from argparse import Namespace

import pytest
import yaml

from sdpo_cli.client import ClientError, resolve_target
from tests.e2e.conftest import sample_files
from tests.webhooks.conftest import start_worker_with_beat


def sdpo(*args: str, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdpo_cli.main", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def ok(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return done.stdout


def test_a_job_from_upload_to_download_through_the_cli(service, receiver, tmp_path):
    service.start_api()
    start_worker_with_beat(service, "w1", train=True)
    hook = service.client().post("/v1/webhooks", json={"url": receiver.url + "/hook"}).json()
    receiver.secrets["/hook"] = hook["secret"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDPO_")}
    env.update({"SDPO_URL": service.url, "SDPO_API_KEY": service.admin_key, "SDPO_HOME": str(tmp_path / "nohome"),
                "PYTHONUNBUFFERED": "1"})
    train, held = sample_files(tmp_path)

    uploaded = ok(sdpo("files", "upload", str(train), env=env)).strip()
    assert uploaded.startswith("file-")
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({
        "model": "sdpo-tiny", "training_file": uploaded, "validation_file": str(held), "seed": 0,
        "method": {"type": "sdpo", "sdpo": {"hyperparameters": {"n_epochs": 1},
                                            "partition": {"strategy": "random", "n_steps": 2}}}}))
    created = sdpo("jobs", "create", "--spec", str(spec), "--suffix", "cli", env=env)
    job_id = ok(created).strip()
    assert job_id.startswith("ftjob-") and "uploaded heldout.jsonl" in created.stderr  # a path is uploaded

    started = time.time()
    watched = sdpo("jobs", "watch", job_id, env=env)
    out = ok(watched)
    # A progress bar per step with live metrics, the lifecycle messages, the lineage, the outcome.
    assert "step 1/2 [" in out and "step 2/2 [" in out and "loss 0." in out, out
    assert "- Step 1 succeeded" in out and "- Step 2 succeeded" in out
    lineage = next(line for line in out.splitlines() if line.startswith("lineage: "))
    assert lineage.startswith("lineage: sdpo-tiny -> ftckpt-") and lineage.count("ftckpt-") == 2
    assert f"job {job_id} succeeded: ft:sdpo-tiny:admin:cli:{job_id}" in out
    print(f"watched the job for {time.time() - started:.1f} s")

    listed = ok(sdpo("jobs", "list", env=env))
    assert job_id in listed and "succeeded" in listed and "100.0%" in listed
    target = tmp_path / "model"
    ok(sdpo("checkpoints", "download", job_id, "--extract", "-o", str(target), env=env))
    manifest = json.loads((target / "sdpo_manifest.json").read_text())
    final = lineage.split(" -> ")[-1]
    assert manifest["step"] == 2 and (target / "config.json").is_file()
    tar = tmp_path / "final.tar"
    ok(sdpo("checkpoints", "download", job_id, final, "-o", str(tar), env=env))
    assert tar.stat().st_size > 1000

    # A second job from flags, cancelled; the server URL and key read from a config file.
    config = tmp_path / "sdpo.yaml"
    config.write_text(yaml.safe_dump({"url": service.url, "api_key": service.admin_key}))
    bare = {k: v for k, v in env.items() if k not in ("SDPO_URL", "SDPO_API_KEY")}
    second = ok(sdpo("jobs", "create", "--config", str(config), "--model", "sdpo-tiny", "--training-file", uploaded,
                     "--steps", "2", "--partition", "random", "--epochs", "1", env=bare)).strip()
    assert "cancelled" in ok(sdpo("jobs", "cancel", second, "--config", str(config), env=bare))
    assert json.loads(ok(sdpo("jobs", "get", second, "--json", env={**bare, "SDPO_CONFIG": str(config)})))[
        "status"] == "cancelled"

    refused = sdpo("jobs", "list", "--api-key", "sk-sdpo-wrong", env=env)
    assert refused.returncode == 2 and refused.stderr.startswith("error: Incorrect API key")

    # The webhook heard of both steps and the job (signed: the receiver checked every request).
    deadline = time.time() + 30
    while time.time() < deadline:
        types = [(e["type"], e["data"]["job"]["id"]) for e in receiver.accepted("/hook")]
        if ("job.cancelled", second) in types:
            break
        time.sleep(0.3)
    assert [t for t, j in types if j == job_id] == ["step.succeeded", "step.succeeded", "job.succeeded"], types
    assert ("job.cancelled", second) in types
    assert all(r["verdict"] == "ok" for r in receiver.on("/hook"))


def test_server_and_key_come_from_flags_environment_or_config_file(tmp_path, monkeypatch):
    config = tmp_path / "c.yaml"
    config.write_text("url: http://from-config:1\napi_key: sk-config\n")
    for name in ("SDPO_URL", "SDPO_API_KEY", "SDPO_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SDPO_HOME", str(tmp_path / "home"))
    args = Namespace(url=None, api_key=None, config=str(config))
    assert (resolve_target(args).url, resolve_target(args).api_key) == ("http://from-config:1", "sk-config")
    monkeypatch.setenv("SDPO_URL", "http://from-env:2/")
    monkeypatch.setenv("SDPO_API_KEY", "sk-env")
    assert (resolve_target(args).url, resolve_target(args).api_key) == ("http://from-env:2", "sk-env")
    flags = Namespace(url="http://flag:3", api_key="sk-flag", config=str(config))
    assert (resolve_target(flags).url, resolve_target(flags).api_key) == ("http://flag:3", "sk-flag")
    with pytest.raises(ClientError):
        resolve_target(Namespace(url=None, api_key=None, config=str(tmp_path / "missing.yaml")))


_LOADED = """
import json, sys
from sdpo_cli.main import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
server_side = sorted({m.split('.')[0] for m in sys.modules} & {'core', 'api', 'worker', 'sqlalchemy', 'torch'})
print(json.dumps({"code": code, "server_side": server_side}))
"""


def test_http_commands_never_load_the_server_code_and_local_ones_do(tmp_path):
    def run(*args: str) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SDPO_")}
        # nothing listens on port 9 (discard) here: the HTTP command fails to connect, after parsing
        env.update({"SDPO_URL": "http://127.0.0.1:9", "SDPO_API_KEY": "sk-sdpo-none", "SDPO_HOME": str(tmp_path),
                    "SDPO_DATABASE_URL": f"sqlite:///{tmp_path / 'never-migrated.db'}"})
        done = subprocess.run([sys.executable, "-c", _LOADED, *args], env=env, capture_output=True, text=True,
                              timeout=120)
        return {**json.loads(done.stdout.strip().splitlines()[-1]), "stderr": done.stderr}

    http = run("jobs", "list")
    assert http["code"] != 0 and http["server_side"] == [], http
    # `keys` is a local command: it imports core when it runs (and says the database is not migrated)
    local = run("keys", "list")
    assert local["code"] == 2 and "database not ready" in local["stderr"], local
    assert {"core", "sqlalchemy"} <= set(local["server_side"]), local
