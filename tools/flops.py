#!/usr/bin/env python
"""Model FLOPs from the command line; the counting itself lives in hico_jax/flops.py, the one place.

  python tools/flops.py --preset qwen2_5_1_5b --seq_len 16384
"""

from __future__ import annotations

import argparse

from hico_jax import presets
from hico_jax.flops import qwen2_forward_flops, qwen2_matmul_params_per_token, qwen2_train_flops
from hico_jax.models.qwen2 import Qwen2Config


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default="qwen2_5_1_5b", choices=sorted(presets.LLM_PRESETS))
  parser.add_argument("--seq_len", type=int, default=4096)
  args = parser.parse_args()
  config = Qwen2Config.from_dict(dict(presets.llm(args.preset)))
  params = qwen2_matmul_params_per_token(config)
  print(f"{args.preset}: {params / 1e9:.3f} G matmul params per token; forward "
        f"{qwen2_forward_flops(config, args.seq_len) / 1e12:.2f} TFLOP and training "
        f"{qwen2_train_flops(config, args.seq_len) / 1e12:.2f} TFLOP per {args.seq_len}-token sequence")


if __name__ == "__main__":
  main()
