"""Building blocks shared by the decoder and the vision tower: layers, the dtype and remat-policy tables."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hico_jax.ops import attention_blocks, layer_norm as layer_norm_ops

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _attention_outputs(prim, *args, **params):
  """The attention's outputs: for cuDNN, its flash-attention forward primitive (output and softmax
  statistics; it lives inside jax, out of reach of checkpoint_name), for the other implementations the value
  ops/attention_blocks.py names. Keeping them spares the backward pass from re-running the attention forward."""
  return (prim.name.startswith("dot_product_attention_fwd")
          or jax.checkpoint_policies.save_only_these_names(attention_blocks.OUTPUT_NAME)(prim, *args, **params))


# The names the layers give the values a policy may keep: the attention's inputs (after their biases) and the
# MLP's pre-activations (the vision tower's fc1 output after its bias; the decoder's gate and up).
ATTENTION_INPUT_NAMES = ("query", "key", "value")
MLP_HIDDEN_NAME = "mlp_hidden"

# What the backward pass may keep instead of recomputing, per decoder layer or vision block. "dots" keeps every
# projection output (q, k, v, o, gate, up, down) as the matmul leaves it, before any bias: most memory, least
# recompute; "dots_attn" also keeps the attention's outputs, so nothing but elementwise work is recomputed.
# "qkv_attn" keeps the attention inputs and outputs, recomputing the MLP. "qkv_mlp_attn" also keeps the MLP's
# pre-activations, so only the attention's output projection is recomputed; kept after their biases, unlike
# "dots", so the biases stay in the matmuls' epilogues. "attn" keeps only the attention outputs. "full" keeps
# only the layer input.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_attn": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable, _attention_outputs),
    "qkv_attn": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.save_only_these_names(*ATTENTION_INPUT_NAMES), _attention_outputs),
    # Seven of the vision block's twelve activation widths, all that `attn` remakes but the out projection's:
    # for GPUs with memory to spare (which policy where: docs/benchmarks.md, the train step on an H200).
    "qkv_mlp_attn": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.save_only_these_names(*ATTENTION_INPUT_NAMES, MLP_HIDDEN_NAME), _attention_outputs),
    # Only the attention's outputs: for the vision tower at 448 px, where attention is a third of the FLOPs
    # and saving every projection would not fit.
    "attn": _attention_outputs,
}


def normal_init(names, std=0.02):
  """Normal(0, std) initialiser boxed with logical axis names (transformers' init for Qwen2 and UMT)."""
  return nn.with_logical_partitioning(nn.initializers.normal(std), names)


def constrain(x, names):
  return nn.with_logical_constraint(x, names)


def exact_gelu(x):
  """GELU with the exact erf, x·(1 + erf(x/√2))/2, computed in float32 and returned in x's dtype.

  What torch's nn.GELU() computes. jax.nn.gelu(approximate=False) writes it through erfc, whose
  exp-and-divide costs twice the time of this form on an H100 (a bf16 (25088, 4096) activation: 0.31 ms
  against 0.16 ms, the memory-bound floor being 0.14): a tenth of the vision tower's forward pass. The two
  differ only where 1 + erf(x/√2) rounds to 0 in float32 (x < −5.5), where |GELU(x)| < 1e-7.
  """
  y = x.astype(jnp.float32)
  return (0.5 * y * (1.0 + jax.lax.erf(y * (1.0 / math.sqrt(2.0))))).astype(x.dtype)


def add_bias(y, bias):
  """y + bias, for a bias over y's trailing dims (e.g. (heads, head_dim) after a projection), added on a
  view with those dims merged. XLA then sees one bias vector over the matmul's output columns and adds it in
  the GEMM's epilogue; over the unmerged dims it writes the broadcast bias out at the activation's full
  size and adds it as a second input (measured on the vision tower's q and v: four activation-sized writes
  per block)."""
  lead = y.shape[:y.ndim - bias.ndim]
  return (y.reshape(*lead, -1) + bias.reshape(-1).astype(y.dtype)).reshape(y.shape)


class Projection(nn.Module):
  """A linear map written as one einsum over named axes, e.g. (B, L, D) -> (B, L, heads, head_dim).

  nn.DenseGeneral would do the maths, but it initialises a flattened 2-D kernel and then reshapes it,
  which breaks 3-D logical partitioning under a mesh."""
  equation: str                           # e.g. "bld,dnh->blnh"
  shape: tuple[int, ...]                  # kernel shape
  names: tuple[str, ...]                  # kernel logical axes
  bias_names: tuple[str, ...] | None      # logical axes of a bias over the output dims; None: no bias
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", normal_init(self.names), self.shape, self.param_dtype)
    y = jnp.einsum(self.equation, x, kernel.astype(self.dtype))
    if self.bias_names is not None:
      bias_shape = self.shape[len(self.shape) - len(self.bias_names):]
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.bias_names),
                        bias_shape, self.param_dtype)
      y = add_bias(y, bias)
    return y


class LayerNorm(nn.Module):
  """nn.LayerNorm's parameters (scale, bias over the last axis) and maths, through ops/layer_norm so that a
  GPU run can take the one-pass Pallas kernels (impl="pallas"; shapes they do not take fall back to XLA).
  rows_name: the logical name of x's leading axis, by which the kernels find their rows under a mesh."""
  epsilon: float
  dtype: Any
  param_dtype: Any
  impl: str = "xla"
  rows_name: str | None = None

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (width,),
                       self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), (width,),
                      self.param_dtype)
    impl = self.impl if layer_norm_ops.pallas_supported(x.shape, self.rows_name) else "xla"
    return layer_norm_ops.layer_norm(x, scale, bias, self.epsilon, impl, self.rows_name).astype(self.dtype)
