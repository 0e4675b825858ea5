#!/usr/bin/env python
"""Tuning sweeps of the embedded default: many stage-2 runs of configs/tiny_synthetic.py at once, each with

  python tools/sweep_default.py runs.jsonl --parallel 6 --out sweep.jsonl

The program is hico_jax/cli/sweep_default.py (its --help says the rest); hico_jax comes from `pip install -e .`.
"""

import sys

from hico_jax.cli.sweep_default import main

if __name__ == "__main__":
  sys.exit(main())
