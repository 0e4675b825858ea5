"""Random params for tiny HiCo checkpoints in tests, without compiling the model."""

import flax.linen as nn
import jax
import numpy as np

from hico_jax.models import hico


def random_hico_params(config, seed):
  """Random params of every leaf from the shapes alone: test_hico's init-then-noise runs the whole model at
  224 px (12 s eagerly on 2 cores) for values a random checkpoint does not need. Norm scales around 1, every
  other leaf (biases included, so a dropped one shows) N(0, 0.1). Not smaller: with N(0, 0.05) weights the
  merge's token similarities come close enough to tie that torch and XLA merged a few clips differently."""
  shapes = nn.unbox(jax.eval_shape(hico.HiCo(config).init, jax.random.key(0), *hico.init_inputs(config)))["params"]
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    if jax.tree_util.keystr(path).endswith("['scale']"):
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    return rng.normal(0.0, 0.1, leaf.shape).astype(np.float32)
  return jax.tree_util.tree_map_with_path(fill, shapes)
