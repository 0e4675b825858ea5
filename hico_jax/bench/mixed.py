"""`mixed` cases: the train step of train_step.py on one packed row of V videos of F frames each, against that
row plus I images of K tiles each (one anyres image: base + grid; 64 tokens a tile), every sample with
text_tokens of text."""

from __future__ import annotations

import numpy as np

from hico_jax.bench import train_step
from hico_jax.models.hico import HiCoConfig
from hico_jax.tokens import IGNORE_INDEX, VIDEO_TOKEN_ID


def packed_row(config: HiCoConfig, rng: np.random.Generator, videos: int, frames: int, images: int, tiles: int,
               text_tokens: int) -> dict:
  """One packed row: `videos` samples of `frames` frames, then `images` samples of `tiles` tiles, each sample
  8 text tokens, its visual tokens, then the rest of its text; the whole text supervised. Image tokens take
  their tiles in order (the anyres layout is a permutation: the same work)."""
  size, per_tile = config.vit.image_size, config.tokens_per_tile
  pieces, segments, video_rank, tile_tokens = [], [], 0, 0
  video_tokens = config.visual_tokens(frames) * videos
  for s in range(videos + images):
    is_video = s < videos
    visual = config.visual_tokens(frames) if is_video else tiles * per_tile
    ids = rng.integers(0, config.llm.vocab_size, 8 + visual + text_tokens - 8).astype(np.int32)
    ids[8:8 + visual] = VIDEO_TOKEN_ID
    index = np.zeros(len(ids), np.int32)
    if is_video:
      index[8:8 + visual] = video_rank + np.arange(visual)
      video_rank += visual
    else:
      index[8:8 + visual] = video_tokens + tile_tokens + np.arange(visual)
      tile_tokens += visual
    pieces.append((ids, index))
    segments.append(np.full(len(ids), s + 1, np.int32))
  ids = np.concatenate([p[0] for p in pieces])[None]
  seg = np.concatenate(segments)[None]
  targets = np.where(ids < 0, IGNORE_INDEX, np.roll(ids, -1)).astype(np.int32)
  targets[0, np.flatnonzero(np.diff(seg[0]) != 0)] = IGNORE_INDEX            # no target across samples
  batch = {"input_ids": ids, "targets": targets, "segment_ids": seg,
           "positions": np.concatenate([np.arange(len(p[0]), dtype=np.int32) for p in pieces])[None],
           "frames": rng.integers(0, 255, (1, max(videos * frames, 4), size, size, 3), np.uint8)}
  if images:
    batch["tiles"] = rng.integers(0, 255, (1, images * tiles, size, size, 3), np.uint8)
    batch["visual_index"] = np.concatenate([p[1] for p in pieces])[None]
  return batch


def run_jax(case: dict) -> dict:
  """A full HiCo train step on one packed row of videos, with or without image samples."""
  config = train_step.model_config(case)
  batch = packed_row(config, np.random.default_rng(0), case["videos"], case["frames"], case["images"],
                     case["tiles"], case["text_tokens"])
  frames = batch["frames"].shape[1]
  result = train_step.time_train_step(case, config, batch, frames + case["images"] * case["tiles"] // 4)
  return {**result, "tokens": int(batch["input_ids"].shape[1]), "frames_in_row": frames,
          "image_size": config.vit.image_size}
