"""Model FLOPs: the one place where hico_jax counts them (MFU everywhere is computed from here; the CLI is
tools/flops.py).

Model FLOPs count what the model needs, not what the hardware runs: rematerialised recompute is excluded,
a matmul of (m, k) by (k, n) is 2·m·k·n, and causal attention counts only the unmasked half of the score
and value products. Training (forward + backward) is 3 × forward. In training the output head is needed only
at supervised positions (the fused loss computes it nowhere else), so train counts take their number.
"""

from __future__ import annotations

import dataclasses

H100_BF16_PEAK = 989e12  # nominal dense bf16 FLOP/s; MFU is quoted against this


def qwen2_matmul_params_per_token(c) -> int:
  """Weights each token multiplies through: projections, MLP and the output head (not the embedding
  lookup, which is a gather)."""
  attn = c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
  mlp = 3 * c.hidden_size * c.intermediate_size
  return c.num_layers * (attn + mlp) + c.hidden_size * c.vocab_size


def qwen2_forward_flops(c, seq_len: int, batch: int = 1, causal: bool = True, head_tokens: int | None = None) -> float:
  """Forward FLOPs for `batch` sequences of `seq_len` tokens, the output head at `head_tokens` positions
  of each (default: all)."""
  head = c.hidden_size * c.vocab_size
  head_tokens = seq_len if head_tokens is None else head_tokens
  dense = 2 * (qwen2_matmul_params_per_token(c) - head) * seq_len + 2 * head * head_tokens
  pairs = seq_len * (seq_len + 1) / 2 if causal else seq_len * seq_len
  attention = c.num_layers * 2 * 2 * pairs * c.num_heads * c.head_dim   # scores and weighted values
  return batch * (dense + attention)


def qwen2_dropout_forward_flops(c, dropout, text_tokens: int, visual_tokens: int) -> float:
  """Forward FLOPs of one prompt with progressive visual dropout, compacted: each stage of layers runs at the
  length left after the drops before it (the selection's own small products are not counted). The output
  head is counted once, at the final length."""
  bounds = dropout.stage_bounds(c.num_layers)
  head = 2 * c.hidden_size * c.vocab_size
  total = 0.0
  for stage, (start, stop) in enumerate(bounds):
    length = text_tokens + int(visual_tokens * dropout.ratios[stage])
    per_layer = (qwen2_forward_flops(c, length) - head * length) / c.num_layers
    total += (stop - start) * per_layer
  return total + head * (text_tokens + int(visual_tokens * dropout.ratios[-1]))


def qwen2_train_flops(c, seq_len: int, batch: int = 1) -> float:
  return 3 * qwen2_forward_flops(c, seq_len, batch)


def umt_clip_forward_flops(vit, hidden_size: int, tokens_per_clip: int = 64) -> float:
  """Forward FLOPs to encode one clip: patch embedding, the ViT blocks (full, non-causal attention) and
  the projector on the merged tokens. The merge's own similarity products are counted too (small)."""
  tokens = vit.clip_frames * vit.grid * vit.grid
  patch = 2 * tokens * 3 * vit.patch_size ** 2 * vit.width
  block_matmuls = 2 * tokens * (4 * vit.width ** 2 + 2 * vit.width * vit.mlp_dim)
  block_attention = 2 * 2 * tokens * tokens * vit.width
  merge, remaining = 0, tokens
  head_dim = vit.width // vit.num_heads
  while remaining > tokens_per_clip:     # each step: |A|·|B| scores over head_dim, plus the one-hot adds
    r = min(remaining // 2, remaining - tokens_per_clip)
    merge += 2 * (remaining // 2) ** 2 * head_dim + 2 * r * (remaining // 2) * vit.width
    remaining -= r
  projector = 2 * tokens_per_clip * (vit.width * hidden_size + hidden_size ** 2)
  return patch + vit.depth * (block_matmuls + block_attention) + merge + projector


def mfu(flops: float, seconds: float, peak: float = H100_BF16_PEAK) -> float:
  return flops / seconds / peak


def umt_tile_forward_flops(vit, hidden_size: int, tokens_per_tile: int = 64) -> float:
  """Forward FLOPs to encode one image tile: a one-frame clip (the image position table), merged alone."""
  return umt_clip_forward_flops(dataclasses.replace(vit, clip_frames=1), hidden_size, tokens_per_tile)


def hico_train_flops(model_config, tokens: int, frames: int, supervised: int | None = None, tiles: int = 0) -> float:
  """Training FLOPs for one packed row of `tokens` LLM tokens, `supervised` of them with a target (default:
  all), `frames` frames and `tiles` image tiles (3 x forward)."""
  clips = frames // model_config.clip_frames
  vision = clips * umt_clip_forward_flops(model_config.vit, model_config.llm.hidden_size,
                                          model_config.tokens_per_clip)
  vision += tiles * umt_tile_forward_flops(model_config.vit, model_config.llm.hidden_size, model_config.tokens_per_tile)
  return 3 * (vision + qwen2_forward_flops(model_config.llm, tokens, head_tokens=supervised))


# The paper's Table 1 (VideoChat-Flash 7B, "estimated by the context length of the input LLM"), TFLOPs.
PAPER_TABLE1_TFLOPS = {64: 29.6, 256: 113.3, 1000: 519.7, 10000: 15786.0}


def paper_table1_flops(llm_config, frames: int, tokens_per_frame: int = 16) -> float:
  """What the paper's Table 1 counts, as far as its numbers let one tell: twice our forward model FLOPs of
  the LLM (causal attention) over the 16·frames visual tokens. The factor 2 is the paper's convention (its
  numbers are 1.8-2.1x our forward count at every row); the vision tower is not in them."""
  return 2 * qwen2_forward_flops(llm_config, tokens_per_frame * frames)
