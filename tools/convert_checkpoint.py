#!/usr/bin/env python
"""Converts checkpoints: Hugging Face layouts <-> training run directories (orbax), released parts -> a run.

  python tools/convert_checkpoint.py hf-to-orbax path/to/VideoChat-Flash-Qwen2_5-2B_res448 runs/imported
  python tools/convert_checkpoint.py orbax-to-hf runs/tiny/stage2 out/hf --dtype bfloat16 [--step 700]
  python tools/convert_checkpoint.py parts-to-orbax --vision UMT-L_f4_vision.pt \\
      --llm Qwen2.5-1.5B-Instruct runs/2b/init --image_size 448

The program is hico_jax/cli/convert_checkpoint.py (its --help says the rest); hico_jax comes from `pip install -e .`.
"""

import sys

from hico_jax.cli.convert_checkpoint import main

if __name__ == "__main__":
  sys.exit(main())
