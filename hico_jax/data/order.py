"""Zig-zag (dual-chunk) token order: causal load balance for sequence parallelism, applied once to the data.

Plain numpy, so the train step can name each token's original index without importing the input pipeline.
"""

from __future__ import annotations

import numpy as np


def zigzag_problem(length: int, num_shards: int, what: str = "data.token_budget") -> str | None:
  """Why rows of `length` tokens cannot be zig-zagged over `num_shards` sequence shards (None: they can). The
  one statement of the rule, for the config check before compiling and the pipeline alike."""
  if num_shards > 1 and length % (2 * num_shards):
    return f"{what}={length} is not divisible by 2*mesh seq={2 * num_shards} (zig-zag chunks)"
  return None


def zigzag(x, num_shards: int, axis: int = 1):
  """Reorders the sequence axis for causal load balance over `num_shards` sequence shards: the axis is cut
  into 2·n chunks and shard i holds chunks i and 2n−1−i, so every shard has as much early (cheap) as late
  (expensive) causal work."""
  if num_shards == 1:
    return x
  chunks = np.split(x, 2 * num_shards, axis=axis)
  order = [c for i in range(num_shards) for c in (i, 2 * num_shards - 1 - i)]
  return np.concatenate([chunks[c] for c in order], axis=axis)


def unzigzag(x, num_shards: int, axis: int = 1):
  """The inverse of zigzag."""
  if num_shards == 1:
    return x
  chunks = np.split(x, 2 * num_shards, axis=axis)
  order = [c for i in range(num_shards) for c in (i, 2 * num_shards - 1 - i)]
  restored = [None] * len(chunks)
  for position, c in enumerate(order):
    restored[c] = chunks[position]
  return np.concatenate(restored, axis=axis)


def zigzag_slots(length: int, num_shards: int) -> np.ndarray:
  """(length,) int32: the original index of each token of a row zig-zagged over `num_shards`."""
  return zigzag(np.arange(length, dtype=np.int32)[None], num_shards)[0]
