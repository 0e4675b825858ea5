"""The clip-level merge of HiCo (videochat_flash.md §2): parameter-free bipartite token merging.

Each step splits the current tokens into A (even positions) and B (odd positions), matches every A token to
its most similar B token under a cosine metric (the features averaged over the ViT's heads: 64-d for
UMT-L, hence "hd64"), and folds the r best-matched A tokens into their B
partners as size-weighted averages. The steps are fixed by the token counts: 784 -> 64 merges
392, 196, 98, 34 tokens; 3136 -> 64 merges 1568, 784, 392, 196, 98, 34.

Output order, which the LLM sees (RoPE follows it): the A tokens that were not merged, by descending match
score, then all B tokens in their original order.

Ties: the best B partner of an A token is the lowest-index B among equal scores (argmax), and A tokens with
equal scores are ranked by lower index first (stable sort). PyTorch's unstable CUDA argsort may order such
ties differently; away from ties the two agree exactly.

All shapes are static under jit. Merging adds with a one-hot matmul rather than a scatter-add, so the sums
are deterministic on GPUs (atomics would reorder them) and run on the matrix units.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

def merge_schedule(num_tokens: int, target: int) -> list[int]:
  """Tokens merged at each step: halve while more than half remain to go, then take the rest."""
  if target > num_tokens:
    raise ValueError(f"cannot merge {num_tokens} tokens up to {target}")
  steps = []
  while num_tokens != target:
    r = num_tokens - target if num_tokens - target <= num_tokens // 2 else num_tokens // 2
    steps.append(r)
    num_tokens -= r
  return steps


def similarity_metric(x, num_heads: int):
  """(N, P, C) -> (N, P, C / num_heads): the per-head slices of each token averaged over heads,
  L2-normalised, without gradient."""
  n, p, c = x.shape
  if c % num_heads:
    raise ValueError(f"token width {c} is not a multiple of num_heads={num_heads}")
  metric = jax.lax.stop_gradient(x).reshape(n, p, num_heads, c // num_heads).mean(axis=2)
  return metric / jnp.linalg.norm(metric, axis=-1, keepdims=True)


def merge_step(x, sizes, r: int, num_heads: int):
  """One bipartite merge of r tokens. x (N, P, C) float32, sizes (N, P) -> (N, P - r, C), (N, P - r)."""
  metric = similarity_metric(x, num_heads)
  scores = jnp.einsum("nac,nbc->nab", metric[:, ::2], metric[:, 1::2])
  best_score = jnp.max(scores, axis=-1)                          # (N, A)
  best_partner = jnp.argmax(scores, axis=-1)                     # (N, A): lowest index on ties
  ranked = jnp.argsort(-best_score, axis=-1, stable=True)        # A tokens by descending score
  merged, kept = ranked[:, :r], ranked[:, r:]

  x_a, x_b = x[:, ::2], x[:, 1::2]
  size_a, size_b = sizes[:, ::2], sizes[:, 1::2]
  take = lambda values, index: jnp.take_along_axis(values, index[..., None] if values.ndim == 3 else index, 1)
  src_x, src_size = take(x_a, merged), take(size_a, merged)
  destination = jax.nn.one_hot(take(best_partner, merged), x_b.shape[1], dtype=x.dtype)   # (N, r, B)
  total_size = size_b + jnp.einsum("nrb,nr->nb", destination, src_size)
  total = x_b * size_b[..., None] + jnp.einsum("nrb,nrc->nbc", destination, src_x * src_size[..., None])
  new_b = total / total_size[..., None]
  return (jnp.concatenate([take(x_a, kept), new_b], axis=1),
          jnp.concatenate([take(size_a, kept), total_size], axis=1))


def merge_tokens(x, target: int = 64, num_heads: int = 16, return_sizes: bool = False):
  """(N, P, C) -> (N, target, C), in x's dtype; arithmetic in float32. Sizes start at 1 per token and are
  carried through the steps (each output token's size is how many inputs it averages)."""
  out_dtype = x.dtype
  x = x.astype(jnp.float32)
  sizes = jnp.ones(x.shape[:2], jnp.float32)
  for r in merge_schedule(x.shape[1], target):
    x, sizes = merge_step(x, sizes, r, num_heads)
  return (x.astype(out_dtype), sizes) if return_sizes else x.astype(out_dtype)
