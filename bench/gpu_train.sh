#!/usr/bin/env bash
# Tokens/s per GPU and MFU of the nightshift trainer on this machine's GPUs: a ~1.07B-parameter Llama-shaped
# model (SmolLM2's vocabulary, 2,048 hidden, 16 layers, GQA 32/8 heads), bf16, 2,048-token blocks, ZeRO-2 then
# ZeRO-3, through the same `torchrun ... --module nightshift.training.trainer` command the DAG runs.
#
#   bash bench/gpu_train.sh            # from a fresh clone; installs into .venv-gpu (~3 min), then ~3 min of runs
#
# Goal: MFU >= 45% (model FLOPs 6N + attention 12·L·H·T per token, against the GPU's dense bf16 peak).
# Needs a CUDA GPU and the package index (PyPI and download.pytorch.org); set GPU_BENCH_PYTHON to an interpreter
# that already has torch (CUDA), deepspeed, transformers, peft and this package to skip the install.
# GPU_BENCH_SMOKE=1 runs the same steps on CPU with a tiny model, to check the script itself.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
if [[ -n "${GPU_BENCH_PYTHON:-}" ]]; then
  PY=$GPU_BENCH_PYTHON
else
  VENV=${GPU_BENCH_VENV:-.venv-gpu}
  if [[ ! -x $VENV/bin/python ]]; then
    python3 -m venv "$VENV"
  fi
  PY=$VENV/bin/python
  "$PY" -m pip install -q --no-input --upgrade pip
  "$PY" -m pip install -q --no-input --index-url https://download.pytorch.org/whl/cu128 torch==2.13.0
  "$PY" -m pip install -q --no-input -r docker/trainer/requirements.txt
  "$PY" -m pip install -q --no-input --no-deps -e .
fi
echo "install: $(( $(date +%s) - started )) s"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PATH="$(dirname "$PY"):$PATH"
if [[ -n "${GPU_BENCH_SMOKE:-}" ]]; then
  export DS_ACCELERATOR=cpu
fi
"$PY" bench/gpu_train.py "$@"
echo "total: $(( $(date +%s) - started )) s (goal: under 480 s from a fresh clone)"
