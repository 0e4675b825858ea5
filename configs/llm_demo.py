"""The embedded default until the trainer lands: build a decoder on the mesh, run a forward pass over a
batch of prompts and a 16-token greedy generation through the KV cache, print shapes and times.

  python -m hico_jax.demo --config configs/llm_demo.py            # tiny model, seconds on a laptop CPU
  python -m hico_jax.demo --config configs/llm_demo.py:qwen2_5_1_5b --config.model.attention_impl=cudnn

Expected: logits (8, 32, 151936), generated ids (8, 16), and the time of each step.
"""

import ml_collections

from hico_jax import presets


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.model = presets.llm(arg or "tiny", dtype="float32" if (arg or "tiny") == "tiny" else "bfloat16",
                        remat_policy="none")
  c.mesh = (("data", 1), ("fsdp", -1), ("seq", 1), ("tensor", 1))   # (axis, size); one size may be -1
  c.batch_size = 8           # divisible by 1, 2, 4 and 8 devices on the fsdp axis
  c.seq_len = 32             # prompt length
  c.max_new_tokens = 16
  c.seed = 0
  return c
