"""Docker files: no engine runs here, so check what can be checked without one — the compose file
parses, has the services the design names, and its commands are the ones the tests run."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _dockerfile_cmds() -> dict[str, list[str]]:
    text = (ROOT / "Dockerfile").read_text()
    stages = re.split(r"^FROM ", text, flags=re.M)[1:]
    cmds = {}
    for stage in stages:
        name = stage.split()[2] if " AS " in stage.splitlines()[0] else stage.split()[0]
        m = re.search(r"^CMD (\[.*\])$", stage, flags=re.M)
        if m:
            cmds[name] = yaml.safe_load(m.group(1))
    return cmds


def test_compose_has_the_production_services_and_a_gpu_worker():
    services = _compose()["services"]
    assert {"postgres", "redis", "migrate", "api", "worker"} <= set(services)
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]
    assert services["migrate"]["command"] == ["alembic", "upgrade", "head"]
    assert services["api"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    for name in ("api", "worker"):
        assert any(v.endswith(":/data") for v in services[name]["volumes"]), "storage must be shared"
    env = _compose()["x-sdpo-env"]
    assert env["SDPO_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert env["SDPO_BROKER_URL"].startswith("redis://")


def test_commands_are_the_ones_the_tests_run():
    services = _compose()["services"]
    dockerfile = _dockerfile_cmds()
    e2e = (ROOT / "tests" / "e2e" / "conftest.py").read_text()
    up = (ROOT / "sdpo_cli" / "up.py").read_text()

    api_cmd = services["api"]["command"]
    assert api_cmd[:3] == ["uvicorn", "api.main:create_app", "--factory"] == dockerfile["api"][:3]
    assert '"api.main:create_app", "--factory"' in e2e and '"api.main:create_app", "--factory"' in up
    module, attr = api_cmd[1].split(":")
    assert callable(getattr(importlib.import_module(module), attr))

    worker_cmd = services["worker"]["command"]
    assert worker_cmd[:4] == ["celery", "-A", "worker.app", "worker"] == dockerfile["worker"][:4]
    assert '"-A", "worker.app", "worker"' in e2e and '"-A", "worker.app", "worker"' in up
    app = importlib.import_module("worker.app").app
    importlib.import_module("worker.tasks")
    assert {"sdpo.prepare_job", "sdpo.run_step", "sdpo.finalize_job", "sdpo.reap"} <= set(app.tasks)
    assert "sdpo.train" in shlex.join(worker_cmd)
    assert app.conf.task_routes["sdpo.run_step"]["queue"] == "sdpo.train"
    assert app.conf.task_acks_late and app.conf.worker_prefetch_multiplier == 1
