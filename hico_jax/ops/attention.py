"""One attention entry point; implementations behind `impl`.

  xla    reference: explicit boolean causal + segment mask, fp32 softmax, runs everywhere (and decode).
  cudnn  `jax.nn.dot_product_attention(implementation="cudnn")`: fused flash attention on NVIDIA GPUs.

Ring attention (sequence parallelism) arrives later behind this same function.

Shapes: q (B, T, N, H); k, v (B, S, K, H) with N a multiple of K (grouped-query attention). Segment ids are
int32 with 0 marking padding; a query sees a key when both have the same segment and the key's slot is not
after the query's slot. Real tokens (segment >= 1) thus never see padding, and a padding query still sees
itself, so no softmax row is empty (an empty row is NaN in fused kernels, and NaN * 0 poisons gradients).
Slots are indices into the key sequence: by default query t sits at slot t + (S - T), i.e. the queries are
the last T keys (training: S == T; decode: the cache is longer).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "cudnn")


def attention(q, k, v, *, q_segment_ids=None, kv_segment_ids=None, q_slots=None, impl: str = "xla",
              causal: bool = True):
  """Grouped-query attention, causal unless told otherwise (the vision tower). Returns (B, T, N, H) in q's
  dtype.

  q_segment_ids (B, T), kv_segment_ids (B, S): None means one unpadded sequence per row.
  q_slots (B, T): the key index each query sits at (KV-cache decode); None means the last T keys.
  """
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"attention impl {impl!r} is not one of {IMPLEMENTATIONS}")
  num_heads, num_kv_heads = q.shape[2], k.shape[2]
  if num_heads % num_kv_heads:
    raise ValueError(f"query heads ({num_heads}) must be a multiple of key/value heads ({num_kv_heads})")
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("pass both q_segment_ids and kv_segment_ids, or neither")
  if impl == "cudnn" and q_slots is None and q.shape[1] == k.shape[1]:
    return _cudnn_attention(q, k, v, q_segment_ids, kv_segment_ids, causal)
  return _xla_attention(q, k, v, q_segment_ids, kv_segment_ids, q_slots, causal)


def attention_mask(q_len, kv_len, q_segment_ids=None, kv_segment_ids=None, q_slots=None, causal=True):
  """Boolean (B or 1, T, S) mask: True where a query may attend to a key."""
  if q_slots is None:
    q_slots = (jnp.arange(q_len) + (kv_len - q_len))[None, :]
  if causal:
    mask = jnp.arange(kv_len)[None, None, :] <= q_slots[:, :, None]
  else:
    mask = jnp.ones((1, q_len, kv_len), bool)
  if q_segment_ids is not None:
    mask = mask & (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])
  return mask


def _xla_attention(q, k, v, q_segment_ids, kv_segment_ids, q_slots, causal):
  batch, q_len, num_heads, head_dim = q.shape
  kv_len, num_kv_heads = k.shape[1], k.shape[2]
  groups = num_heads // num_kv_heads
  # Group the query heads by the K/V head they share, instead of repeating K/V `groups` times in memory.
  q = q.reshape(batch, q_len, num_kv_heads, groups, head_dim)
  logits = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32)
  logits = logits * (head_dim ** -0.5)
  if causal or q_segment_ids is not None:
    mask = attention_mask(q_len, kv_len, q_segment_ids, kv_segment_ids, q_slots, causal)
    # A finite minimum rather than -inf, so that even a row with nothing visible stays finite.
    logits = jnp.where(mask[:, None, None, :, :], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskh->btkgh", probs, v, preferred_element_type=jnp.float32)
  return out.reshape(batch, q_len, num_heads, head_dim).astype(q.dtype)


def _cudnn_attention(q, k, v, q_segment_ids, kv_segment_ids, causal):
  mask = None
  if q_segment_ids is not None:
    # cuDNN takes no segment ids; a boolean mask broadcast over heads carries the packing and padding.
    mask = q_segment_ids[:, None, :, None] == kv_segment_ids[:, None, None, :]
  out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation="cudnn")
  return out.astype(q.dtype)
