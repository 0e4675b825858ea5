"""Memory-linear attention in plain JAX: flash attention's online softmax, one query chunk at a time.

The prefill of a long prompt must never hold an (L x L) score matrix: at 10,000 frames (160,000 visual
tokens) a float32 one is 2.6 TiB for a 7B model's 28 heads. cuDNN's fused kernel avoids it on GPUs; this is
the same algorithm for every backend XLA compiles (the CPU, and TPUs without splash): queries go in chunks
of `chunk` through `lax.map`; each chunk walks the key chunks it can see (the causal diagonal bounds the
walk, so half the work of a causal prompt is skipped) keeping a running max, normaliser and fp32 output.
Peak memory is one (heads x chunk x chunk) block per query chunk, whatever L is.

Forward only: the key walk is a while loop (its length depends on the query chunk), which reverse-mode
autodiff cannot run. Generation is its user; training uses cuDNN, splash, the ring or XLA's dense kernel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

DEFAULT_CHUNK = 1024


def chunked_attention(q, k, v, q_segment_ids=None, kv_segment_ids=None, *, causal: bool = True,
                      chunk: int | None = None):
  """Grouped-query attention of q (B, T, N, H) over k, v (B, S, K, H); the queries are the last T keys (as
  the entry point's q_slots=None). Segment ids (B, T) / (B, S): a query sees keys of its own segment.
  Returns (B, T, N, H) in q's dtype; equal to the dense kernel up to fp32 summation order. `chunk`: tokens
  per query and key block (DEFAULT_CHUNK, read at call time)."""
  batch, q_len, num_heads, head_dim = q.shape
  kv_len, num_kv_heads = k.shape[1], k.shape[2]
  groups = num_heads // num_kv_heads
  chunk = max(1, min(chunk or DEFAULT_CHUNK, max(q_len, kv_len)))
  q_chunks, kv_chunks = -(-q_len // chunk), -(-kv_len // chunk)
  offset = kv_len - q_len                                   # key index of query 0
  segmented = q_segment_ids is not None

  def pad_to(x, length, value=0):
    extra = length - x.shape[1]
    return jnp.pad(x, [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2), constant_values=value) if extra else x

  # (chunks, B, chunk, ...) for the query side; keys stay whole and are sliced per step.
  qg = pad_to(q, q_chunks * chunk).reshape(batch, q_chunks, chunk, num_kv_heads, groups, head_dim)
  qg = jnp.moveaxis(qg, 1, 0)
  k = pad_to(k, kv_chunks * chunk)
  v = pad_to(v, kv_chunks * chunk)
  if segmented:
    q_seg = jnp.moveaxis(pad_to(q_segment_ids, q_chunks * chunk, -1).reshape(batch, q_chunks, chunk), 1, 0)
    kv_seg = pad_to(kv_segment_ids, kv_chunks * chunk, -2)
  else:
    q_seg = jnp.zeros((q_chunks, batch, chunk), jnp.int32)
  scale = head_dim ** -0.5

  def one_query_chunk(args):
    index, q_block, q_block_seg = args                      # q_block (B, c, K, G, H)
    q_pos = offset + index * chunk + jnp.arange(chunk)      # key index each query sits at
    last_key = jnp.minimum(offset + (index + 1) * chunk - 1, kv_len - 1) if causal else kv_len - 1
    steps = last_key // chunk + 1

    def step(j, carry):
      row_max, total, acc = carry
      start = j * chunk
      k_block = jax.lax.dynamic_slice_in_dim(k, start, chunk, axis=1)
      v_block = jax.lax.dynamic_slice_in_dim(v, start, chunk, axis=1)
      logits = jnp.einsum("bqkgh,bskh->bkgqs", q_block, k_block, preferred_element_type=jnp.float32) * scale
      k_pos = start + jnp.arange(chunk)
      visible = (k_pos < kv_len)[None, :]
      if causal:
        visible = visible & (k_pos[None, :] <= q_pos[:, None])
      visible = jnp.broadcast_to(visible, (batch, chunk, chunk))
      if segmented:
        kv_block_seg = jax.lax.dynamic_slice_in_dim(kv_seg, start, chunk, axis=1)
        visible = visible & (q_block_seg[:, :, None] == kv_block_seg[:, None, :])
      logits = jnp.where(visible[:, None, None], logits, -jnp.inf)
      new_max = jnp.maximum(row_max, logits.max(-1))
      safe_max = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
      weights = jnp.exp(logits - safe_max[..., None])
      rescale = jnp.exp(jnp.where(jnp.isfinite(row_max), row_max, 0.0) - safe_max)
      rescale = jnp.where(jnp.isfinite(row_max), rescale, 0.0)
      total = total * rescale + weights.sum(-1)
      acc = acc * rescale[..., None] + jnp.einsum("bkgqs,bskh->bkgqh", weights.astype(v.dtype), v_block,
                                                  preferred_element_type=jnp.float32)
      return new_max, total, acc

    shape = (batch, num_kv_heads, groups, chunk)
    init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros(shape + (head_dim,), jnp.float32))
    _, total, acc = jax.lax.fori_loop(0, steps, step, init)
    out = acc / jnp.where(total > 0, total, 1.0)[..., None]   # a row that sees nothing (padding) stays 0
    return jnp.moveaxis(out, 3, 1).reshape(batch, chunk, num_heads, head_dim).astype(q.dtype)

  out = jax.lax.map(one_query_chunk, (jnp.arange(q_chunks), qg, q_seg))   # (chunks, B, c, N, H)
  return jnp.moveaxis(out, 0, 1).reshape(batch, q_chunks * chunk, num_heads, head_dim)[:, :q_len]
