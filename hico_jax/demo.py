"""Builds the configured decoder on the mesh, runs a forward pass and a greedy generation, prints shapes
and times: a quick check of a decoder config on a mesh (README's main command is hico_jax.train.default).

  python -m hico_jax.demo --config configs/llm_demo.py
"""

import time

from absl import app
from absl import logging
import flax.linen as nn
import jax
import numpy as np
from ml_collections import config_flags

from hico_jax import sharding
from hico_jax.infer import generate as generation
from hico_jax.models import qwen2
from hico_jax.validate import validate

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file (configs/*.py[:arg])", lock_config=True)


def main(argv):
  del argv
  config = _CONFIG.value
  mesh = sharding.make_mesh(config.mesh)
  model_config = validate(config, mesh)     # before anything compiles
  model = qwen2.Qwen2ForCausalLM(model_config)
  print(f"mesh {dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} device(s)")

  rng = np.random.default_rng(config.seed)
  prompts = rng.integers(0, model_config.vocab_size, (config.batch_size, config.seq_len)).astype(np.int32)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    start = time.perf_counter()
    abstract = jax.eval_shape(model.init, jax.random.key(config.seed), prompts[:, :8])
    param_shardings = sharding.logical_to_sharding(abstract, mesh)
    params = nn.unbox(jax.jit(model.init, out_shardings=param_shardings)(jax.random.key(config.seed),
                                                                          prompts[:, :8]))
    jax.block_until_ready(params)
    count = sum(x.size for x in jax.tree.leaves(params))
    print(f"initialised {count / 1e6:.2f}M parameters in {time.perf_counter() - start:.2f} s")

    ids = jax.device_put(prompts, sharding.named_sharding(mesh, "act_batch", "act_len"))
    forward = jax.jit(lambda p, x: model.apply(p, x)[0])
    for label in ("forward (compile + run)", "forward"):
      start = time.perf_counter()
      logits = jax.block_until_ready(forward(params, ids))
      print(f"{label}: logits {logits.shape} {logits.dtype} in {time.perf_counter() - start:.3f} s")

    for label in ("generate (compile + run)", "generate"):
      start = time.perf_counter()
      new_ids = generation.generate(model, params, prompts, max_new_tokens=config.max_new_tokens)
      elapsed = time.perf_counter() - start
      print(f"{label}: ids {new_ids.shape} in {elapsed:.3f} s "
            f"({config.batch_size * config.max_new_tokens / elapsed:.0f} tokens/s)")
  print("first row:", new_ids[0].tolist())
  logging.info("done")


if __name__ == "__main__":
  app.run(main)
