#!/usr/bin/env bash
# One process on this machine, all its local devices in the mesh.
#   launch/local.sh --config configs/hico_2b.py:stage3 --workdir runs/hico_2b/stage3 [--config.k=v ...]
# With no arguments: the embedded default (synthetic data, tiny model, every stage).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
if [ "$#" -eq 0 ]; then exec "$PYTHON" -m hico_jax.train.default; fi
if command -v nvidia-smi >/dev/null 2>&1; then source launch/xla_flags.sh; fi
exec "$PYTHON" -m hico_jax.train "$@"
