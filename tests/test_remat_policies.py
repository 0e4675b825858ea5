"""What each remat policy makes the backward pass keep, read from jax's own residual report.

On CPU the attention is the XLA one, whose output the attention op names; the cuDNN kernel's forward
primitive (what the policies keep on GPU instead of a name) is checked by tools/check_remat_gpu.py.
"""

import collections

import jax
import jax.numpy as jnp
import pytest
from jax._src.ad_checkpoint import saved_residuals

from hico_jax.models import qwen2, vit
from hico_jax.ops import rope
from hico_jax.models.qwen2 import REMAT_POLICIES


def _saved_names(f, *args) -> collections.Counter:
  """How many residuals of each checkpoint name the backward pass of f keeps."""
  names = collections.Counter()
  for _, source in saved_residuals(f, *args):
    if source.startswith("named '"):
      names[source.split("'")[1]] += 1
  return names


def _vit_block_names(policy: str) -> collections.Counter:
  config = vit.ViTConfig(image_size=32, patch_size=16, width=32, depth=1, num_heads=2, mlp_dim=64,
                         dtype="float32", remat_policy=policy)
  block = jax.checkpoint(lambda params, x: vit.ViTBlock(config).apply(params, x, None)[0].sum(),
                         policy=REMAT_POLICIES[policy], prevent_cse=False)
  x = jax.random.normal(jax.random.key(0), (2, 16, 32))
  params = vit.ViTBlock(config).init(jax.random.key(1), x, None)
  return _saved_names(block, params, x)


def _decoder_layer_names(policy: str) -> collections.Counter:
  config = qwen2.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                             num_kv_heads=2, head_dim=8, dtype="float32", remat_policy=policy)
  length = 8
  cos, sin = rope.rope_cos_sin(jnp.arange(length)[None], config.head_dim, config.rope_theta)
  meta = {"cos": cos, "sin": sin, "segment_ids": None, "slots": None}
  layer = qwen2.DecoderLayer(config)
  x = jax.random.normal(jax.random.key(0), (1, length, 32))
  params = layer.init(jax.random.key(1), x, meta, None)
  f = jax.checkpoint(lambda params, x: layer.apply(params, x, meta, None)[0].sum(),
                     policy=REMAT_POLICIES[policy], prevent_cse=False)
  return _saved_names(f, params, x)


@pytest.mark.parametrize("policy, expected", [
    ("attn", {"attention_out": 1}),
    ("dots_attn", {"attention_out": 1}),
    ("full", {}),
])
def test_vision_block_keeps_its_attention_output_once(policy, expected):
  assert _vit_block_names(policy) == collections.Counter(expected)


@pytest.mark.parametrize("policy, expected", [
    ("qkv_attn", {"query": 1, "key": 1, "value": 1, "attention_out": 1}),
    ("attn", {"attention_out": 1}),
    ("full", {}),
])
def test_decoder_layer_keeps_what_its_policy_names_once(policy, expected):
  assert _decoder_layer_names(policy) == collections.Counter(expected)


class _Primitive:
  def __init__(self, name):
    self.name = name


@pytest.mark.parametrize("policy", ["attn", "dots_attn", "qkv_attn"])
def test_attention_keeping_policies_keep_the_fused_cudnn_forward(policy):
  # The name jax gives the cuDNN flash-attention forward (jax/_src/cudnn/fused_attention_stablehlo.py).
  assert REMAT_POLICIES[policy](_Primitive("dot_product_attention_fwd_wrapper"))
  assert not REMAT_POLICIES["full"](_Primitive("dot_product_attention_fwd_wrapper"))
