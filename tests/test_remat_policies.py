"""What each remat policy makes the backward pass keep, read from jax's own residual report.

On CPU the attention is the XLA one, whose output the attention op names; the cuDNN kernel's forward
primitive (what the policies keep on GPU instead of a name) is checked by tools/check_remat_gpu.py, whose
block builders these tests share.
"""

import collections

import pytest

from hico_jax.models import qwen2, vit
from hico_jax.models.qwen2 import REMAT_POLICIES
from tools.check_remat_gpu import decoder_layer_residuals, vision_block_residuals


def _names(residuals) -> collections.Counter:
  """How many residuals of each checkpoint name the backward pass keeps."""
  return collections.Counter(source.split("'")[1] for _, _, source in residuals if source.startswith("named '"))


@pytest.mark.parametrize("policy, expected", [
    ("attn", {"attention_out": 1}),
    ("dots_attn", {"attention_out": 1}),
    ("full", {}),
])
def test_vision_block_keeps_its_attention_output_once(policy, expected):
  config = vit.ViTConfig(image_size=32, patch_size=16, width=32, depth=1, num_heads=2, mlp_dim=64,
                         dtype="float32", remat_policy=policy)
  residuals, _ = vision_block_residuals(config)
  assert _names(residuals) == collections.Counter(expected)


@pytest.mark.parametrize("policy, expected", [
    ("qkv_attn", {"query": 1, "key": 1, "value": 1, "attention_out": 1}),
    ("attn", {"attention_out": 1}),
    ("full", {}),
])
def test_decoder_layer_keeps_what_its_policy_names_once(policy, expected):
  config = qwen2.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                             num_kv_heads=2, head_dim=8, dtype="float32", remat_policy=policy)
  residuals, _ = decoder_layer_residuals(config, length=8)
  assert _names(residuals) == collections.Counter(expected)


class _Primitive:
  def __init__(self, name):
    self.name = name


@pytest.mark.parametrize("policy", ["attn", "dots_attn", "qkv_attn"])
def test_attention_keeping_policies_keep_the_fused_cudnn_forward(policy):
  # The name jax gives the cuDNN flash-attention forward (jax/_src/cudnn/fused_attention_stablehlo.py).
  assert REMAT_POLICIES[policy](_Primitive("dot_product_attention_fwd_wrapper"))
  assert not REMAT_POLICIES["full"](_Primitive("dot_product_attention_fwd_wrapper"))
