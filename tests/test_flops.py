"""The FLOP count against independent numbers: the models' own parameter shapes and the paper's Table 1."""

import math

import jax
import jax.numpy as jnp
import pytest

from hico_jax import flops, presets, sharding
from hico_jax.models.hico import HiCoConfig
from hico_jax.models.qwen2 import Qwen2Config, Qwen2ForCausalLM


@pytest.mark.parametrize("preset", ["qwen2_5_1_5b", "qwen2_7b"])
def test_matmul_params_per_token_equal_the_models_matmul_weights(preset):
  config = Qwen2Config.from_dict(dict(presets.llm(preset)))
  shapes = sharding.unbox_abstract(jax.eval_shape(Qwen2ForCausalLM(config).init, jax.random.key(0),
                                                  jnp.zeros((1, 4), jnp.int32)))["params"]
  leaves = jax.tree_util.tree_flatten_with_path(shapes)[0]
  matmul = sum(math.prod(x.shape) for path, x in leaves if path[-1].key == "kernel")
  if config.tie_word_embeddings:     # the tied head multiplies through the embedding
    matmul += math.prod(shapes["embed_tokens"]["embedding"].shape)
  assert flops.qwen2_matmul_params_per_token(config) == matmul


@pytest.mark.parametrize("frames", sorted(flops.PAPER_TABLE1_TFLOPS))
def test_paper_table1_is_reproduced_within_10_percent(frames):
  config = Qwen2Config.from_dict(dict(presets.llm("qwen2_7b")))
  ours = flops.paper_table1_flops(config, frames) / 1e12
  assert abs(ours / flops.PAPER_TABLE1_TFLOPS[frames] - 1) < 0.10


def test_umt_clip_flops_match_a_hand_count_for_umt_l_at_224():
  vit = HiCoConfig.from_dict(dict(presets.hico("hico_7b"))).vit
  tokens, width = 784, 1024
  hand = 23 * (2 * tokens * 12 * width ** 2 + 4 * tokens ** 2 * width) + 2 * tokens * 768 * width
  # Merge steps 784 -> 392 -> 196 -> 98 -> 64: |A|·|B| 64-d scores, then r one-hot rows over |B| tokens.
  merge = sum(2 * (p // 2) ** 2 * 64 + 2 * r * (p // 2) * width
              for p, r in ((784, 392), (392, 196), (196, 98), (98, 34)))
  projector = 2 * 64 * (1024 * 3584 + 3584 ** 2)
  assert flops.umt_clip_forward_flops(vit, 3584) == hand + merge + projector


def test_umt_tile_flops_match_a_hand_count_for_an_image_tile_at_448():
  vit = HiCoConfig.from_dict(dict(presets.hico("hico_2b"))).vit
  tokens, width = 784, 1024                     # one 448 frame: 28 x 28 patches, merged alone 784 -> 64
  hand = 23 * (2 * tokens * 12 * width ** 2 + 4 * tokens ** 2 * width) + 2 * tokens * 768 * width
  merge = sum(2 * (p // 2) ** 2 * 64 + 2 * r * (p // 2) * width
              for p, r in ((784, 392), (392, 196), (196, 98), (98, 34)))
  projector = 2 * 64 * (1024 * 1536 + 1536 ** 2)
  assert flops.umt_tile_forward_flops(vit, 1536) == hand + merge + projector


def test_dropout_flops_equal_the_plain_count_when_nothing_drops_and_sum_stage_lengths_otherwise():
  from hico_jax.models.qwen2 import Qwen2Config
  from hico_jax.models.visual_dropout import VisualDropoutConfig
  config = Qwen2Config.from_dict(dict(presets.llm("qwen2_7b")))
  keep_all = VisualDropoutConfig(layers=(4, 18), ratios=(1.0, 1.0, 1.0))
  assert flops.qwen2_dropout_forward_flops(config, keep_all, 128, 16000) == pytest.approx(
      flops.qwen2_forward_flops(config, 16128), rel=1e-12)
  card = VisualDropoutConfig(layers=(4, 18), ratios=(1.0, 0.75, 0.25))
  head = 2 * config.hidden_size * config.vocab_size
  per_layer = lambda n: (flops.qwen2_forward_flops(config, n) - head * n) / config.num_layers
  expected = 4 * per_layer(16128) + 14 * per_layer(12128) + 10 * per_layer(4128) + head * 4128
  assert flops.qwen2_dropout_forward_flops(config, card, 128, 16000) == pytest.approx(expected, rel=1e-12)


def test_train_count_takes_the_output_head_only_at_supervised_positions():
  config = HiCoConfig.from_dict(dict(presets.hico("hico_2b")))
  llm = config.llm
  every = flops.hico_train_flops(config, 4608, 256)
  answers_only = flops.hico_train_flops(config, 4608, 256, supervised=512)
  # 3 x forward of a (4608 - 512) x 1536 by 1536 x 151,936 product that the loss no longer computes.
  assert every - answers_only == 3 * 2 * (4608 - 512) * llm.hidden_size * llm.vocab_size
  assert flops.hico_train_flops(config, 4608, 256, supervised=4608) == every
