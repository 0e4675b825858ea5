"""Will a generation request fit on the device? An estimate made before anything compiles.

A request too large for the device should say so, with the numbers a user can act on, rather than end in an
XLA allocation trace minutes into compiling. The estimate counts what generation holds at its peak, the
prefill of the last layer:

* the KV cache, every stage's layers x (prompt + new tokens) slots (after visual dropout the later stages
  hold only the surviving tokens);
* the prefill's activations, linear in the prompt since the prefill forms no (L x L) matrix: the hidden state
  and its residual copy, RMSNorm's float32 input, q / k / v and the attention output, the output projection,
  one MLP chunk (models/qwen2.py PREFILL_MLP_CHUNK), and the attention kernel's scores (a block for the
  chunked kernel, none for the fused ones, L x L for XLA's dense kernel);
* the visual tokens being spliced in (their embeddings and the prompt's).

Weights are already on the device when the check runs (bytes_in_use); a margin covers XLA's own buffers and
fragmentation. The figures in docs/benchmarks.md (generate at 1,000-20,000 frames) are what it is measured
against.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from hico_jax.models import qwen2
from hico_jax.models.visual_dropout import VisualDropoutConfig, stage_counts
from hico_jax.ops import chunked_attention

GIB = 2**30
# XLA's scratch, the compiled programs and allocator fragmentation, over the counted buffers.
MARGIN = 1.15


def _itemsize(dtype_name: str) -> int:
  return np.dtype(qwen2.DTYPES[dtype_name]).itemsize


def generation_bytes(config: qwen2.Qwen2Config, dropout: VisualDropoutConfig | None, batch: int, prompt_len: int,
                     visual_counts: Sequence[int], max_new_tokens: int) -> int:
  """Device bytes generation needs beyond the weights for `batch` rows of `prompt_len` tokens, of which
  visual_counts[row] are visual."""
  item = _itemsize(config.dtype)
  kv_per_token_layer = 2 * config.num_kv_heads * config.head_dim * item
  bounds = [(0, config.num_layers)] if dropout is None else dropout.stage_bounds(config.num_layers)
  cache = 0
  for stage, (start, stop) in enumerate(bounds):
    dropped = 0
    if stage and dropout is not None:
      dropped = min(sum(int(np.subtract(*stage_counts(n, dropout.ratios, s))) for s in range(stage))
                    for n in visual_counts)
    cache += (stop - start) * batch * (prompt_len - dropped + max_new_tokens) * kv_per_token_layer
  d, heads, kv, hd = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
  per_token = (3 * d * item          # hidden, residual, the embeddings the prefill starts from
               + 4 * d               # RMSNorm's float32 input
               + (2 * heads + 2 * kv) * hd * item   # q, attention output, k, v
               + d * item)           # the attention's output projection
  mlp_chunk = min(prompt_len, qwen2.PREFILL_MLP_CHUNK)
  activations = batch * (prompt_len * per_token + 3 * mlp_chunk * config.intermediate_size * item)
  # The attention's own scores: none kept by the fused kernels (cuDNN, splash), one (heads x chunk x chunk)
  # block and its weights for the chunked one, and the whole (heads x L x L) for XLA's dense kernel, which
  # is why long prompts must not use it.
  if config.attention_impl == "chunked":
    block = min(prompt_len, chunked_attention.DEFAULT_CHUNK)
    activations += batch * 2 * heads * block * block * 4
  elif config.attention_impl == "xla":
    activations += batch * 2 * heads * prompt_len * prompt_len * 4
  return int(MARGIN * (cache + activations))


def device_memory() -> tuple[int, int] | None:
  """(bytes free, bytes the device has) of the default device, or None where the backend does not say (CPU)."""
  stats = jax.devices()[0].memory_stats() or {}
  if "bytes_limit" not in stats:
    return None
  return stats["bytes_limit"] - stats.get("bytes_in_use", 0), stats["bytes_limit"]


def check_fits(config: qwen2.Qwen2Config, dropout: VisualDropoutConfig | None, *, batch: int, text_len: int,
               frames: int, tokens_per_frame: float, clip_frames: int, max_new_tokens: int,
               available: int | None = None) -> None:
  """ValueError, before anything compiles, when `batch` prompts of `text_len` text tokens and a video of
  `frames` frames each (16 visual tokens a frame) cannot generate within the device's free memory; it names
  the estimate and the most frames that would fit. `available` (bytes) overrides the device's free memory."""
  if available is None:
    memory = device_memory()
    if memory is None:
      return
    available = memory[0]

  def needed(num_frames):
    visual = int(num_frames * tokens_per_frame)
    return generation_bytes(config, dropout, batch, text_len + visual, [visual] * batch, max_new_tokens)

  estimate = needed(frames)
  if estimate <= available:
    return
  # The largest whole number of clips that fits (the estimate grows with the frames: bisect).
  low, high = 0, frames // clip_frames
  while low < high:
    middle = (low + high + 1) // 2
    low, high = (middle, high) if needed(middle * clip_frames) <= available else (low, middle - 1)
  fit = low * clip_frames
  where = jax.devices()[0].device_kind
  raise ValueError(
      f"{frames} frames ({int(frames * tokens_per_frame):,} visual tokens, batch {batch}) need about "
      f"{estimate / GIB:.1f} GiB for generation beyond the weights, and {where} has {available / GIB:.1f} GiB "
      f"free: at most about {fit} frames fit; sample fewer frames, turn visual dropout on, or generate fewer "
      f"rows at once")
