"""What each remat policy makes the backward pass keep, read from jax's own residual report.

On CPU the attention is the XLA one, whose output the attention op names; the cuDNN kernel's forward
primitive (what the policies keep on GPU instead of a name) is checked by tools/check_remat_gpu.py, whose
block builders these tests share.
"""

import collections

import jax
import pytest

from hico_jax.models import qwen2, vit
from hico_jax.models.layers import REMAT_POLICIES
from tools.check_remat_gpu import decoder_layer_residuals, vision_block_residuals


def _names(residuals) -> collections.Counter:
  """How many residuals of each checkpoint name the backward pass keeps."""
  return collections.Counter(source.split("'")[1] for _, _, source in residuals if source.startswith("named '"))


def _tiny_vit(policy: str = "none") -> vit.ViTConfig:
  return vit.ViTConfig(image_size=32, patch_size=16, width=32, depth=1, num_heads=2, mlp_dim=64, dtype="float32",
                       remat_policy=policy)


def _tiny_vision_block(policy: str = "none"):
  """(block, params, x) for one vision block of _tiny_vit(policy) on two clips."""
  config = _tiny_vit(policy)
  x = jax.random.normal(jax.random.key(0), (2, config.clip_frames * config.tokens_per_frame, config.width))
  block = vit.ViTBlock(config)
  return block, block.init(jax.random.key(1), x, None), x


@pytest.mark.parametrize("policy, expected", [
    ("attn", {"attention_out": 1}),
    ("dots_attn", {"attention_out": 1}),
    ("qkv_attn", {"query": 1, "key": 1, "value": 1, "attention_out": 1}),
    ("qkv_mlp_attn", {"query": 1, "key": 1, "value": 1, "mlp_hidden": 1, "attention_out": 1}),
    ("full", {}),
])
def test_vision_block_keeps_what_its_policy_names_once(policy, expected):
  residuals, _ = vision_block_residuals(_tiny_vit(policy))
  assert _names(residuals) == collections.Counter(expected)


@pytest.mark.parametrize("policy, expected", [
    ("qkv_attn", {"query": 1, "key": 1, "value": 1, "attention_out": 1}),
    ("qkv_mlp_attn", {"query": 1, "key": 1, "value": 1, "mlp_hidden": 2, "attention_out": 1}),   # gate and up
    ("attn", {"attention_out": 1}),
    ("full", {}),
])
def test_decoder_layer_keeps_what_its_policy_names_once(policy, expected):
  config = qwen2.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                             num_kv_heads=2, head_dim=8, dtype="float32", remat_policy=policy)
  residuals, _ = decoder_layer_residuals(config, length=8)
  assert _names(residuals) == collections.Counter(expected)


def _matmuls(jaxpr) -> int:
  """dot_generals in a jaxpr and every jaxpr inside it (the remat's recompute is one)."""
  count = 0
  for eqn in jaxpr.eqns:
    count += eqn.primitive.name == "dot_general"
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          count += _matmuls(inner)
  return count


def _vision_block_gradient_matmuls(policy: str) -> int:
  block, params, x = _tiny_vision_block(policy)
  loss = jax.checkpoint(lambda p, x: block.apply(p, x, None)[0].sum(), policy=REMAT_POLICIES[policy])
  return _matmuls(jax.make_jaxpr(jax.grad(loss))(params, x).jaxpr)


def test_vision_block_recomputes_no_projection_it_keeps():
  # attn recomputes q, k, v and fc1 (and the out projection); keeping them after their biases leaves four
  # matmuls fewer, one fewer than qkv_attn (fc1), whatever else the block's gradient holds.
  assert _vision_block_gradient_matmuls("attn") - _vision_block_gradient_matmuls("qkv_mlp_attn") == 4
  assert _vision_block_gradient_matmuls("qkv_attn") - _vision_block_gradient_matmuls("qkv_mlp_attn") == 1


def _named_value_sources(fn, params, *args) -> dict[str, tuple[set[str], set[str]]]:
  """checkpoint name -> (the parameters the named value depends on, the primitives upstream of it), read off
  the forward jaxpr: where in the computation each name sits."""
  closed = jax.make_jaxpr(fn)(params, *args)
  param_paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  upstream = {var: ({path}, set()) for var, path in zip(closed.jaxpr.invars, param_paths)}
  named = {}
  for eqn in closed.jaxpr.eqns:
    sources, primitives = set(), {eqn.primitive.name}
    for var in eqn.invars:
      if not hasattr(var, "val") and var in upstream:   # literals (constants) have a value and no source
        sources |= upstream[var][0]
        primitives |= upstream[var][1]
    if eqn.primitive.name == "name":
      named[eqn.params["name"]] = (sources, primitives - {"name"})
    for var in eqn.outvars:
      upstream[var] = (sources, primitives)
  return named


def test_vision_block_names_q_v_and_the_mlp_pre_activation_after_their_biases_and_before_the_gelu():
  # Named before a bias, the kept value would be the bare matmul output and the bias add would run again in
  # the backward pass, outside the GEMM's epilogue (what `dots` does).
  block, params, x = _tiny_vision_block()
  named = _named_value_sources(lambda p, x: block.apply(p, x, None)[0], params, x)
  depends_on = lambda name, param: any(f"['{param}']" in path for path in named[name][0])
  assert depends_on("query", "q_bias") and depends_on("value", "v_bias")
  assert not depends_on("key", "q_bias") and not depends_on("key", "v_bias")   # k has no bias
  assert any("['fc1']['bias']" in path for path in named["mlp_hidden"][0])
  assert "erf" not in named["mlp_hidden"][1]   # before the GELU


def test_vision_block_keeps_the_mlp_pre_activation_and_the_attention_inputs_whole():
  config = _tiny_vit("qkv_mlp_attn")
  residuals, (clips, tokens, _, _) = vision_block_residuals(config)
  shapes = {source: shape for shape, _, source in residuals if source.startswith("named '")}
  assert shapes["named 'mlp_hidden'"] == f"float32[{clips},{tokens},{config.mlp_dim}]"
  for name in ("query", "key", "value"):
    assert shapes[f"named '{name}'"] == f"float32[{clips},{tokens},{config.num_heads},{config.head_dim}]"


class _Primitive:
  def __init__(self, name):
    self.name = name


@pytest.mark.parametrize("policy", ["attn", "dots_attn", "qkv_attn", "qkv_mlp_attn"])
def test_attention_keeping_policies_keep_the_fused_cudnn_forward(policy):
  # The name jax gives the cuDNN flash-attention forward (jax/_src/cudnn/fused_attention_stablehlo.py).
  assert REMAT_POLICIES[policy](_Primitive("dot_product_attention_fwd_wrapper"))
  assert not REMAT_POLICIES["full"](_Primitive("dot_product_attention_fwd_wrapper"))
