"""LayerNorm over the last axis, with a one-pass Pallas (Triton) kernel each way for GPUs.

XLA writes LayerNorm as a reduction for the statistics and a separate normalising pass, and its backward as
several more. At the vision tower's shape (16 clips of 3,136 tokens, width 1,024, bf16) flax's LayerNorm
takes 0.124 ms forward and 0.250 ms forward and backward on an H100, against memory floors of 0.061 and 0.153;
these kernels take 0.080 and 0.199, and the hico_2b train step 2% less time (docs/benchmarks.md). Here the
forward kernel reads a block of rows once, keeps it in registers for the mean, the variance and the output,
and writes y with the per-row mean and 1/std; the backward kernel reads x, dy and those statistics once,
writes dx, and sums d(scale) and d(bias) over its rows in registers, so that only one partial row per program
reaches memory.

  impl="xla"     plain jnp, differentiated by jax: runs everywhere (CPU tests, TPUs).
  impl="pallas"  the kernels (GPU; `interpret=True` runs them on CPU for tests).

Both compute in float32 and return x's dtype, as flax's nn.LayerNorm(dtype=x.dtype) does with float32
parameters; the variance is the two-pass E[(x - mean)^2] (flax uses E[x^2] - mean^2), so the two differ by
float32 rounding.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.sharding import PartitionSpec as P

from hico_jax import sharding

IMPLEMENTATIONS = ("xla", "pallas")

# Rows per kernel block: x must have a multiple of ROWS rows per device (the vision tower's 784·T and
# 3,136·T per clip are). 16 rows make the backward spill registers (0.51 ms against 0.20 at the width 1,024).
ROWS = 8
# A whole row stays in registers, so the width must be a power of two (Triton's block shapes) and not
# larger than this.
MAX_WIDTH = 4096
# Programs of the backward kernel: a few per H100 SM, each looping over its share of the row blocks, so
# that the per-program partial sums of d(scale) and d(bias) stay a few hundred rows of memory.
BACKWARD_PROGRAMS = 528


def pallas_supported(shape, rows_name: str | None = None) -> bool:
  """Whether the kernels take x of this shape, its rows split as `rows_name` splits them (see layer_norm)."""
  rows, width = math.prod(shape[:-1]), shape[-1]
  devices = sharding.ambient_size(_row_axes(shape[0], rows_name))
  return width & (width - 1) == 0 and width <= MAX_WIDTH and rows % (ROWS * devices) == 0


def layer_norm(x, scale, bias, epsilon: float, impl: str = "xla", rows_name: str | None = None,
               interpret: bool = False):
  """(..., D) -> (..., D) in x's dtype; scale and bias (D,), any float dtype (used in float32).

  rows_name: the logical axis name (hico_jax.sharding) of x's leading axis. Under a mesh the Pallas kernels
  run per device under shard_map, on the rows that axis puts there (XLA cannot split a kernel call itself:
  it would gather x onto every device)."""
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"layer_norm impl {impl!r} is not one of {IMPLEMENTATIONS}")
  if impl == "xla":
    return _xla_layer_norm(x, scale, bias, epsilon)
  row_axes = _row_axes(x.shape[0], rows_name)
  if not pallas_supported(x.shape, rows_name):
    raise ValueError(f"the Pallas LayerNorm takes a power-of-two width <= {MAX_WIDTH} and a multiple of "
                     f"{ROWS} rows per device; got shape {x.shape} over {sharding.ambient_size(row_axes)} devices")
  rows = x.reshape(-1, x.shape[-1])
  y = _pallas_layer_norm(rows, scale.astype(jnp.float32), bias.astype(jnp.float32), epsilon, row_axes,
                         interpret)
  return y.reshape(x.shape)


def _row_axes(leading: int, rows_name: str | None) -> tuple[str, ...]:
  """The mesh axes x's leading axis is split over, without those of one device (no split, no shard_map)."""
  return tuple(a for a in sharding.ambient_axes(rows_name, divides=leading) if sharding.ambient_size((a,)) > 1)


def _xla_layer_norm(x, scale, bias, epsilon):
  xf = x.astype(jnp.float32)
  mean = jnp.mean(xf, axis=-1, keepdims=True)
  centred = xf - mean
  rstd = lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + epsilon)
  return (centred * rstd * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _pallas_layer_norm(x, scale, bias, epsilon, row_axes, interpret):
  return _forward(x, scale, bias, epsilon, row_axes, interpret)[0]


def _per_device(kernel_call, row_axes, in_specs, out_specs):
  """kernel_call on each device's rows under shard_map, or as it is without a split. Pallas calls cannot
  state how their outputs vary over the mesh, hence check_vma=False; the custom VJP above shard_map means
  shard_map is never transposed, so no reduction is inserted behind our back."""
  if not row_axes:
    return kernel_call
  rows = P(row_axes, None)
  spec = {"rows": rows, "row": P(row_axes), "all": P()}
  return jax.shard_map(kernel_call, in_specs=tuple(spec[s] for s in in_specs),
                       out_specs=tuple(spec[s] for s in out_specs), check_vma=False)


def _forward_kernel(x_ref, scale_ref, bias_ref, y_ref, mean_ref, rstd_ref, *, epsilon):
  x = x_ref[...].astype(jnp.float32)
  mean = jnp.mean(x, axis=1)
  centred = x - mean[:, None]
  rstd = lax.rsqrt(jnp.mean(centred * centred, axis=1) + epsilon)
  y = centred * rstd[:, None] * scale_ref[...][None, :] + bias_ref[...][None, :]
  y_ref[...] = y.astype(y_ref.dtype)
  mean_ref[...] = mean
  rstd_ref[...] = rstd


def _forward(x, scale, bias, epsilon, row_axes, interpret):
  call = functools.partial(_forward_call, epsilon=epsilon, interpret=interpret)
  y, mean, rstd = _per_device(call, row_axes, ("rows", "all", "all"), ("rows", "row", "row"))(x, scale, bias)
  return y, (x, scale, mean, rstd)


def _forward_call(x, scale, bias, *, epsilon, interpret):
  n, width = x.shape
  row_block = pl.BlockSpec((ROWS, width), lambda i: (i, 0))
  stat_block = pl.BlockSpec((ROWS,), lambda i: (i,))
  feature_block = pl.BlockSpec((width,), lambda i: (0,))
  y, mean, rstd = pl.pallas_call(
      functools.partial(_forward_kernel, epsilon=epsilon),
      out_shape=(jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct((n,), jnp.float32),
                 jax.ShapeDtypeStruct((n,), jnp.float32)),
      grid=(n // ROWS,),
      in_specs=(row_block, feature_block, feature_block),
      out_specs=(row_block, stat_block, stat_block),
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
      interpret=interpret,
      name="layer_norm_forward",
  )(x, scale, bias)
  return y, mean, rstd


def _backward_kernel(x_ref, dy_ref, mean_ref, rstd_ref, scale_ref, dx_ref, dscale_ref, dbias_ref, *,
                     num_blocks):
  program, programs = pl.program_id(0), pl.num_programs(0)
  width = x_ref.shape[1]
  scale = scale_ref[...]

  def block(i, sums):
    dscale, dbias = sums
    rows = pl.ds(pl.multiple_of((program + i * programs) * ROWS, ROWS), ROWS)
    x = x_ref[rows, :].astype(jnp.float32)
    dy = dy_ref[rows, :].astype(jnp.float32)
    rstd = rstd_ref[rows]
    x_hat = (x - mean_ref[rows][:, None]) * rstd[:, None]
    weighted = dy * scale[None, :]
    # d/dx of (x - mean)·rstd·scale: the two mean terms are the projections out of the centring and the norm.
    mean_weighted_x_hat = jnp.mean(weighted * x_hat, axis=1)
    mean_weighted = jnp.mean(weighted, axis=1)
    dx = (weighted - x_hat * mean_weighted_x_hat[:, None] - mean_weighted[:, None]) * rstd[:, None]
    dx_ref[rows, :] = dx.astype(dx_ref.dtype)
    return dscale + jnp.sum(dy * x_hat, axis=0), dbias + jnp.sum(dy, axis=0)

  # Program p takes row blocks p, p + programs, p + 2·programs, ...
  trips = (num_blocks - program + programs - 1) // programs
  zeros = jnp.zeros((width,), jnp.float32)
  dscale, dbias = lax.fori_loop(0, trips, block, (zeros, zeros))
  dscale_ref[pl.ds(program, 1), :] = dscale[None, :]
  dbias_ref[pl.ds(program, 1), :] = dbias[None, :]


def _backward(epsilon, row_axes, interpret, residuals, dy):
  del epsilon
  x, scale, mean, rstd = residuals
  call = functools.partial(_backward_call, interpret=interpret)
  # The per-program partial sums come back stacked over the devices; their sum is d(scale) and d(bias).
  dx, dscale, dbias = _per_device(call, row_axes, ("rows", "rows", "row", "row", "all"),
                                  ("rows", "rows", "rows"))(x, dy, mean, rstd, scale)
  return dx, dscale.sum(0), dbias.sum(0)


def _backward_call(x, dy, mean, rstd, scale, *, interpret):
  n, width = x.shape
  num_blocks = n // ROWS
  programs = min(BACKWARD_PROGRAMS, num_blocks)
  dx, dscale, dbias = pl.pallas_call(
      functools.partial(_backward_kernel, num_blocks=num_blocks),
      out_shape=(jax.ShapeDtypeStruct(x.shape, x.dtype),
                 jax.ShapeDtypeStruct((programs, width), jnp.float32),
                 jax.ShapeDtypeStruct((programs, width), jnp.float32)),
      grid=(programs,),
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
      interpret=interpret,
      name="layer_norm_backward",
  )(x, dy, mean, rstd, scale)
  return dx, dscale, dbias


_pallas_layer_norm.defvjp(_forward, _backward)
