#!/usr/bin/env bash
# The kit's paper-scale paths on one GPU: one line per check (see benchmarks/gpu_check.py), in a few minutes.
# Usage: bash benchmarks/gpu_check.sh [--checks sft_bf16,dpo_cache] [--out FILE]
# Needs the kit's stack in the Python it finds (.venv/bin/python, else python3) and a CUDA GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 MPLBACKEND=Agg
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/gpu_check nvidia-smi: /'
exec timeout 570 "$PY" benchmarks/gpu_check.py "$@"
