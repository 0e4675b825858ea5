"""Rotary position embedding in Hugging Face's rotate-half convention (what Qwen2 checkpoints expect)."""

import jax.numpy as jnp


def rope_cos_sin(positions, head_dim: int, theta: float):
  """cos, sin of shape (B, L, head_dim) for integer `positions` (B, L), computed in float32.

  Same arithmetic as transformers: inv_freq = 1 / theta^(2i/d), angles = position * inv_freq, and the half
  table repeated ([f0..f(d/2-1), f0..f(d/2-1)]) to pair dimension i with i + d/2.
  """
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, cos, sin):
  """x: (B, L, heads, head_dim); cos/sin: (B, L, head_dim). Returns x's dtype.

  cos and sin are cast to x's dtype first, as transformers does, so bf16 runs round the same way.
  """
  cos = cos[:, :, None, :].astype(x.dtype)
  sin = sin[:, :, None, :].astype(x.dtype)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rotated * sin
