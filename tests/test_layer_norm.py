"""ops/layer_norm against an independent float64 numpy LayerNorm and against flax's nn.LayerNorm: the Pallas
kernels (run on CPU in interpret mode), their gradients, their per-device split under a mesh, and the ViT
switch that selects them."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hico_jax import sharding
from hico_jax.models.vit import UMTViT, ViTConfig
from hico_jax.ops import layer_norm as ln

EPS = 1e-6


def numpy_layer_norm(x, scale, bias, dy):
  """Float64 forward and the textbook backward of y = (x - mean)/sqrt(var + eps)·scale + bias."""
  x, scale, bias, dy = (np.asarray(a, np.float64) for a in (x, scale, bias, dy))
  mean = x.mean(-1, keepdims=True)
  rstd = 1 / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + EPS)
  x_hat = (x - mean) * rstd
  g = dy * scale
  dx = rstd * (g - g.mean(-1, keepdims=True) - x_hat * (g * x_hat).mean(-1, keepdims=True))
  rows = tuple(range(x.ndim - 1))
  return x_hat * scale + bias, dx, (dy * x_hat).sum(rows), dy.sum(rows)


def _inputs(shape, seed=0):
  rng = np.random.default_rng(seed)
  width = shape[-1]
  # Rows with a large offset and different spreads: a one-pass E[x^2] - mean^2 or a missing centring term
  # in the backward shows up here.
  x = rng.normal(size=shape) * rng.uniform(0.5, 4, size=shape[:-1] + (1,)) + 3.0
  return (x.astype(np.float32), (1 + 0.3 * rng.normal(size=width)).astype(np.float32),
          (0.2 * rng.normal(size=width)).astype(np.float32), rng.normal(size=shape).astype(np.float32))


def _run(impl, x, scale, bias, dy, rows_name=None):
  f = lambda x, s, b: ln.layer_norm(x, s, b, EPS, impl, rows_name, interpret=True)
  y, vjp = jax.vjp(jax.jit(f), x, scale, bias)
  return [np.asarray(a, np.float64) for a in (y, *vjp(dy))]


@pytest.mark.parametrize("impl", ln.IMPLEMENTATIONS)
def test_matches_float64_reference_and_gradients(impl):
  x, scale, bias, dy = _inputs((3, 16, 128))
  for name, got, want in zip(("y", "dx", "dscale", "dbias"), _run(impl, x, scale, bias, dy),
                             numpy_layer_norm(x, scale, bias, dy)):
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * max(1.0, np.abs(want).max()), err_msg=name)


def test_pallas_matches_flax_in_bfloat16():
  x, scale, bias, dy = _inputs((2, 32, 256), seed=1)
  x, dy = jnp.asarray(x, jnp.bfloat16), jnp.asarray(dy, jnp.bfloat16)
  flax_ln = lambda x, s, b: nn.LayerNorm(epsilon=EPS, dtype=jnp.bfloat16).apply(
      {"params": {"scale": s, "bias": b}}, x)
  y, vjp = jax.vjp(flax_ln, x, scale, bias)
  want = [np.asarray(a, np.float64) for a in (y, *vjp(dy))]
  got = _run("pallas", x, scale, bias, dy)
  for name, g, w in zip(("y", "dx", "dscale", "dbias"), got, want):
    # One bf16 rounding of y and dx apart (flax's variance is E[x^2] - mean^2, ours centred).
    np.testing.assert_allclose(g, w, rtol=0, atol=2 ** -7 * max(1.0, np.abs(w).max()), err_msg=name)


@pytest.mark.parametrize("mesh_config", [[("data", 4), ("tensor", 2)], [("fsdp", 2), ("seq", 2), ("tensor", 2)]])
def test_pallas_split_over_a_mesh_equals_one_device(mesh_config):
  """Rows split over the clip axes, replicated over tensor: d(scale) must sum each row once (a reduction
  over the replicated tensor axis would double it)."""
  x, scale, bias, dy = _inputs((8, 24, 128), seed=2)
  want = numpy_layer_norm(x, scale, bias, dy)
  with jax.set_mesh(sharding.make_mesh(mesh_config)), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    assert ln._row_axes(8, "act_clips"), "the rows should be split over the mesh"
    got = _run("pallas", x, scale, bias, dy, rows_name="act_clips")
  for name, g, w in zip(("y", "dx", "dscale", "dbias"), got, want):
    np.testing.assert_allclose(g, w, rtol=0, atol=2e-5 * max(1.0, np.abs(w).max()), err_msg=name)


def test_unsupported_shapes_and_names_are_refused():
  x, scale, bias, _ = _inputs((3, 5, 128))        # 15 rows: not a multiple of the kernel's row block
  assert not ln.pallas_supported(x.shape)
  with pytest.raises(ValueError, match="multiple of"):
    ln.layer_norm(x, scale, bias, EPS, "pallas")
  assert not ln.pallas_supported((16, 96))        # width not a power of two
  with pytest.raises(ValueError, match="not one of"):
    ln.layer_norm(x, scale, bias, EPS, "triton")
  with pytest.raises(ValueError, match="norm_impl"):
    ViTConfig.from_dict({"norm_impl": "cudnn"})


def test_vit_with_pallas_norms_equals_xla_norms(monkeypatch):
  """The switch reaches every LayerNorm of the tower (norm1, norm2, the final one) and changes nothing but
  rounding. Interpret mode stands in for the GPU."""
  monkeypatch.setattr(ln, "_pallas_layer_norm", _interpreted(ln._pallas_layer_norm))
  calls = []
  monkeypatch.setattr(ln, "_forward_call", _counted(ln._forward_call, calls))
  cfg = dict(image_size=32, patch_size=16, width=128, depth=2, num_heads=2, mlp_dim=256, dtype="float32")
  frames = jax.random.normal(jax.random.key(0), (2, 4, 32, 32, 3))
  xla_vit = UMTViT(ViTConfig.from_dict(cfg))
  params = xla_vit.init(jax.random.key(1), frames)
  want = xla_vit.apply(params, frames)
  got = UMTViT(ViTConfig.from_dict({**cfg, "norm_impl": "pallas"})).apply(params, frames)
  assert len(calls) == 2 * 2 + 1
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-4)


def _interpreted(custom_vjp_fn):
  def call(x, scale, bias, epsilon, row_axes, interpret):
    del interpret
    return custom_vjp_fn(x, scale, bias, epsilon, row_axes, True)
  return call


def _counted(fn, calls):
  def call(*args, **kwargs):
    calls.append(args[0].shape)
    return fn(*args, **kwargs)
  return call
