#!/usr/bin/env bash
# One process on this machine, all its local devices in the mesh. Any extra arguments reach the program,
# e.g. launch/local.sh --config configs/llm_demo.py:qwen2_5_1_5b --config.model.attention_impl=cudnn
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
if [ "$#" -eq 0 ]; then set -- --config configs/llm_demo.py; fi
exec "$PYTHON" -m hico_jax.demo "$@"
