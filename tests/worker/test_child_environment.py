"""The environment a training process gets (worker/supervisor.child_environment): the libraries' and the
accelerator's settings pass, credentials do not, even under an allowed prefix (HF_TOKEN under HF_)."""

from __future__ import annotations

import pytest

from worker.supervisor import child_environment

PASSES = {"HF_HOME": "/cache/hf", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "0,1",
          "NCCL_DEBUG": "WARN", "OMP_NUM_THREADS": "4", "TOKENIZERS_PARALLELISM": "false", "PATH": "/usr/bin"}
DROPPED = {"HF_TOKEN": "hf_abc", "HUGGING_FACE_HUB_TOKEN": "hf_def", "HF_HUB_TOKEN": "hf_ghi",
           "HUGGINGFACE_API_KEY": "k", "TORCH_HUB_AUTH": "x", "ACCELERATE_SECRET": "s",
           "AWS_SECRET_ACCESS_KEY": "aws", "SDPO_ADMIN_KEY": "admin", "SDPO_DATABASE_URL": "postgresql://u:p@h/db"}


@pytest.fixture
def worker_env(monkeypatch):
    for name, value in {**PASSES, **DROPPED}.items():
        monkeypatch.setenv(name, value)


def test_settings_pass_and_credentials_do_not(worker_env):
    env = child_environment()
    assert {name: env.get(name) for name in PASSES} == PASSES
    leaked = sorted(name for name in DROPPED if name in env)
    assert not leaked, f"reached a training process: {leaked}"
    assert not any(value in env.values() for value in DROPPED.values())


def test_extra_is_added_after_the_filter(worker_env):
    env = child_environment({"SDPO_STEP": "1"})
    assert env["SDPO_STEP"] == "1" and env["PYTHONUNBUFFERED"] == "1" and "HF_TOKEN" not in env
