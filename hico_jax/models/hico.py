"""The composed VideoChat-Flash model: clips -> UMT-L -> merge to 64 tokens -> projector -> Qwen2.

Frames (B, V, T, S, S, 3) hold V videos of T frames per row (V = 1 for one video per sample; packed rows
carry one slot per sample). Each video's T/4 clips become 64 tokens each, 16·T per video, concatenated in
time order. In `input_ids` every visual token has a placeholder `VIDEO_TOKEN_ID` (the data pipeline and
the API expand a sample's single placeholder to 16·T); the k-th placeholder of a row receives the row's
k-th visual token. Clips are folded into one batch, sharded over (data, fsdp, seq), and encoded a chunk
at a time (`nn.scan`), so memory stays bounded whatever the frame count.

Images (videochat_flash.md §2, "Image layout") come as tiles (B, N, S, S, 3): each tile is one T = 1 frame of the
same tower (its image position table), merged alone to 64 tokens (`tokens_per_tile`: fewer where a tile has
fewer patches) and projected. Their layout (an anyres image's
base tile first, then its tiles' 8x8 blocks as one raster) is data, not model: `visual_index` tells each
placeholder which of the row's visual tokens (video tokens, then tile tokens) it receives.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from einops import rearrange
import flax.linen as nn
import jax.numpy as jnp

from hico_jax.config_dicts import check_fields
from hico_jax.models import tome
from hico_jax.models.layers import DTYPES, Projection, constrain, exact_gelu
from hico_jax.models.qwen2 import Qwen2Config, Qwen2ForCausalLM
from hico_jax.models.visual_dropout import VisualDropoutConfig
from hico_jax.models.vit import UMTViT, ViTConfig
from hico_jax.ops import loss as loss_ops
from hico_jax.tokens import VIDEO_TOKEN_ID

@dataclasses.dataclass(frozen=True)
class HiCoConfig:
  vit: ViTConfig
  llm: Qwen2Config
  tokens_per_clip: int = 64        # 16 per frame
  encode_chunk: int = 16           # clips per vision-tower step; bounds activation memory, but in training
                                   # each step also carries the tower's gradients (presets choose by kernel)
  loss_chunk: int = 4096           # positions per output-head step of the fused loss; chunks with no
                                   # supervised position are skipped, so short rows want short chunks
  visual_dropout: VisualDropoutConfig | None = None   # progressive dropout inside the LLM; None: off

  @classmethod
  def from_dict(cls, fields: dict[str, Any]) -> "HiCoConfig":
    fields = dict(fields)
    check_fields(cls, fields, "HiCo")
    dropout = fields.pop("visual_dropout", None)
    if dropout is not None and not isinstance(dropout, VisualDropoutConfig):
      dropout = VisualDropoutConfig.from_dict(dict(dropout))
    return cls(vit=ViTConfig.from_dict(dict(fields.pop("vit"))), llm=Qwen2Config.from_dict(dict(fields.pop("llm"))),
               visual_dropout=dropout, **fields)

  @property
  def clip_frames(self) -> int:
    return self.vit.clip_frames

  def visual_tokens(self, frames: int) -> int:
    """Visual tokens of a video of `frames` frames (16 per frame)."""
    return frames // self.clip_frames * self.tokens_per_clip

  @property
  def tokens_per_tile(self) -> int:
    """Visual tokens of one image tile: the clip's count (the reference merges a tile, alone, to the same 64 a
    clip keeps), or every patch of the tile when it has fewer (a 64 px tile of 16 px patches has 16; there is
    nothing to merge). Derived rather than a config field: the released configs have no such setting (one merge
    size serves both), a field would let a config ask a tile for more tokens than it has patches, and the data
    pipeline reads this same property (`pipeline_counts`), so the two cannot disagree. min() of two squares is a
    square, as the anyres layout needs (a tile's tokens viewed as side x side) for every square tokens_per_clip.
    """
    return min(self.tokens_per_clip, self.vit.grid ** 2)

  def pipeline_counts(self) -> dict[str, int]:
    """What the training data must be written for: `DataConfig.from_dict(fields, **model.pipeline_counts())`.
    Placeholders a frame are tokens_per_clip / clip_frames (a row's frames are whole clips);
    hico_jax.validate checks that the division is exact."""
    return {"clip_frames": self.clip_frames, "visual_tokens_per_frame": self.tokens_per_clip // self.clip_frames,
            "tokens_per_tile": self.tokens_per_tile}


class Projector(nn.Module):
  """Linear(vision width -> H), exact GELU, Linear(H -> H)."""
  hidden_size: int
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    x = Projection("nld,dh->nlh", (width, self.hidden_size), ("mlp", "embed"), ("embed",), self.dtype,
                   self.param_dtype, name="fc1")(x)
    x = exact_gelu(x)
    return Projection("nlh,hk->nlk", (self.hidden_size, self.hidden_size), ("mlp", "embed"), ("embed",),
                      self.dtype, self.param_dtype, name="fc2")(x)


class ClipEncoder(nn.Module):
  """A chunk of clips (n, 4, S, S, 3) -> (n, 64, H): vision tower, merge, projector. Scanned over chunks.
  Image tiles come as one-frame clips (n, 1, S, S, 3) and leave as (n, tokens_per_tile, H)."""
  config: HiCoConfig

  @nn.compact
  def __call__(self, carry, clips):
    cfg = self.config
    clips = constrain(clips, ("act_clips", None, None, None, None))
    features = UMTViT(cfg.vit, name="vision_tower")(clips)                 # (n, T·g·g, width)
    target = cfg.tokens_per_clip if clips.shape[1] == cfg.clip_frames else cfg.tokens_per_tile
    merged = tome.merge_tokens(features, target, cfg.vit.num_heads)        # (n, 64, width); no-op at g·g = target
    tokens = Projector(cfg.llm.hidden_size, DTYPES[cfg.llm.dtype], DTYPES[cfg.llm.param_dtype],
                       name="projector")(merged)
    return carry, constrain(tokens, ("act_clips", None, "act_emb"))


class HiCo(nn.Module):
  config: HiCoConfig

  def setup(self):
    self.visual = nn.scan(ClipEncoder, variable_broadcast="params", split_rngs={"params": False},
                          in_axes=0, out_axes=0)(self.config)
    self.llm = Qwen2ForCausalLM(self.config.llm, dropout=self.config.visual_dropout)

  def encode_video(self, video):
    """(B, V, T, S, S, 3) normalised frames -> (B, V·16·T, H) visual tokens, clips in time order."""
    cfg = self.config
    batch, videos, frames = video.shape[:3]
    check_video_shape(cfg, video.shape)
    clips = rearrange(video, "b v (k f) ... -> (b v k) f ...", f=cfg.clip_frames)
    num_clips = clips.shape[0]
    chunk = min(cfg.encode_chunk, num_clips)
    num_chunks = math.ceil(num_clips / chunk)
    pad = num_chunks * chunk - num_clips          # zero clips fill the last chunk; their tokens are dropped
    if pad:
      clips = jnp.concatenate([clips, jnp.zeros((pad,) + clips.shape[1:], clips.dtype)])
    _, tokens = self.visual(None, rearrange(clips, "(m c) ... -> m c ...", c=chunk))
    tokens = rearrange(tokens, "m c t d -> (m c) t d")[:num_clips]
    return rearrange(tokens, "(b k) t d -> b (k t) d", b=batch)

  def encode_clips(self, clips):
    """(n, 4, S, S, 3) normalised clips -> (n, 64, H): one step of encode_video's loop, for callers that
    feed a long video a chunk at a time from the host (hico_jax.infer.visual)."""
    _, tokens = self.visual(None, clips[None])
    return tokens[0]

  def encode_images(self, tiles):
    """(B, N, S, S, 3) normalised image tiles -> (B, N·tokens_per_tile, H): each tile a T = 1 frame of the tower
    (its image position table), merged alone to 64 tokens (the reference's compress=False; every patch where a
    tile has fewer), tile after tile."""
    cfg = self.config
    batch, num_tiles = tiles.shape[:2]
    check_tile_shape(cfg, tiles.shape)
    tiles = rearrange(tiles, "b n ... -> (b n) 1 ...")
    chunk = min(cfg.encode_chunk * cfg.clip_frames, tiles.shape[0])   # a tile is a quarter of a clip's tokens
    num_chunks = math.ceil(tiles.shape[0] / chunk)
    pad = num_chunks * chunk - tiles.shape[0]
    if pad:
      tiles = jnp.concatenate([tiles, jnp.zeros((pad,) + tiles.shape[1:], tiles.dtype)])
    _, tokens = self.visual(None, rearrange(tiles, "(m c) ... -> m c ...", c=chunk))
    tokens = rearrange(tokens, "m c t d -> (m c) t d")[:batch * num_tiles]
    return rearrange(tokens, "(b n) t d -> b (n t) d", b=batch)

  def visual_tokens_of_row(self, video=None, images=None):
    """(B, N, H): a row's video tokens (clips in time order), then its image tiles' tokens (tile by tile)."""
    parts = []
    if video is not None:
      parts.append(self.encode_video(video))
    if images is not None:
      parts.append(self.encode_images(images))
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)

  def embed(self, input_ids, video=None, slots=None, images=None, visual_index=None):
    """Text embeddings with the visual tokens spliced in at the VIDEO_TOKEN_ID placeholders. `slots` (B, L):
    each token's index in the original row when the sequence was reordered (zig-zag): the k-th placeholder
    in the original order receives the k-th visual token.

    With `images` (B, N, S, S, 3) tiles, `visual_index` (B, L) says which of the row's visual tokens (its video
    tokens, then its tiles' tokens: `visual_tokens_of_row`) each placeholder receives; it moves with the tokens,
    so zig-zagged rows need no `slots`. That is how an image's tiles reach the reference's layout."""
    if video is None and images is None:
      return self.splice_visual_tokens(input_ids, None, slots)
    if images is not None and visual_index is None:
      raise ValueError("image tiles need visual_index: which visual token each placeholder receives")
    return self.splice_visual_tokens(input_ids, self.visual_tokens_of_row(video, images), slots, visual_index)

  def splice_visual_tokens(self, input_ids, visual=None, slots=None, visual_index=None):
    """`embed` for visual tokens (B, N, H) encoded beforehand (None: text only)."""
    is_visual = input_ids == VIDEO_TOKEN_ID
    text = self.llm.embed(jnp.where(is_visual, 0, input_ids))
    if visual is None:
      if visual_index is not None:
        raise ValueError("visual_index without visual tokens")
      return text
    visual = visual.astype(text.dtype)
    if visual_index is not None:
      index = jnp.clip(visual_index, 0, visual.shape[1] - 1)
      spliced = jnp.take_along_axis(visual, index[..., None], axis=1)
      return constrain(jnp.where(is_visual[..., None], spliced, text), ("act_batch", "act_len", "act_emb"))
    if slots is None:
      rank = jnp.cumsum(is_visual, axis=1) - 1
    else:
      rows = jnp.arange(is_visual.shape[0])[:, None]
      in_order = jnp.zeros_like(is_visual).at[rows, slots].set(is_visual)
      rank = jnp.take_along_axis(jnp.cumsum(in_order, axis=1) - 1, slots, axis=1)
    rank = jnp.clip(rank, 0, visual.shape[1] - 1)
    spliced = jnp.take_along_axis(visual, rank[..., None], axis=1)
    return constrain(jnp.where(is_visual[..., None], spliced, text), ("act_batch", "act_len", "act_emb"))

  def __call__(self, input_ids, video=None, *, segment_ids=None, positions=None, return_logits=True,
               targets=None, slots=None, compact_lengths=None, images=None, visual_index=None, visual_tokens=None):
    """(logits (B, L, V), aux) as Qwen2ForCausalLM returns them, for a prompt with its videos.

    With visual dropout configured, the visual tokens are dropped inside the LLM (masked rows, or compacted
    to the static `compact_lengths`); `targets` switch the text-guided query rule to training's.
    visual_tokens: (B, N, H) from `visual_tokens_of_row`, encoded beforehand instead of `video` / `images`
    (rows that share a video, such as one question's candidate answers, encode it once)."""
    visual_mask = input_ids == VIDEO_TOKEN_ID if self.config.visual_dropout is not None else None
    if visual_tokens is not None:
      if video is not None or images is not None:
        raise ValueError("give visual_tokens or the video / images they come from, not both")
      embeddings = self.splice_visual_tokens(input_ids, visual_tokens, slots, visual_index)
    else:
      embeddings = self.embed(input_ids, video, slots, images, visual_index)
    return self.llm(embeddings=embeddings, segment_ids=segment_ids, positions=positions,
                    return_logits=return_logits, visual_mask=visual_mask, targets=targets, slots=slots,
                    compact_lengths=compact_lengths)

  def loss(self, input_ids, labels, video=None, *, segment_ids=None, positions=None):
    """Mean next-token cross-entropy over supervised tokens (labels != -100, aligned with input_ids).

    Sums are over the global batch, so the division is by the token count of the whole mesh."""
    if self.config.visual_dropout is not None:
      raise ValueError("with visual dropout, train on pre-shifted targets (loss_sums), which move with the tokens")
    _, aux = self(input_ids, video, segment_ids=segment_ids, positions=positions, return_logits=False)
    total, count = loss_ops.next_token_loss(aux["hidden"], self.llm.head_kernel(), labels, segment_ids)
    return total / jnp.maximum(count, 1.0), {"loss_sum": total, "num_tokens": count}

  def loss_sums(self, input_ids, targets, video=None, *, segment_ids=None, positions=None, slots=None,
                compact_lengths=None, images=None, visual_index=None):
    """(Σ CE, number of supervised tokens) for pre-shifted targets: targets[t] is the id that position t
    predicts, negative where nothing is supervised (the data pipeline shifts per sample before packing).
    The trainer sums both over micro-batches and the mesh before dividing. Visual dropout moves the
    targets with the tokens they follow."""
    _, aux = self(input_ids, video, segment_ids=segment_ids, positions=positions, return_logits=False,
                  targets=targets, slots=slots, compact_lengths=compact_lengths, images=images,
                  visual_index=visual_index)
    targets = aux.get("targets", targets)
    weights = targets >= 0
    # `slots` come with rows split over the seq axis: there the positions stay on their devices.
    return loss_ops.linear_cross_entropy(aux["hidden"], self.llm.head_kernel(), jnp.where(weights, targets, 0),
                                         weights, self.config.loss_chunk, supervised_first=slots is None)


def check_video_shape(config: HiCoConfig, shape) -> None:
  """Clear errors for videos the model cannot take, before anything compiles."""
  if len(shape) != 6:
    raise ValueError(f"video must be (batch, videos, frames, size, size, 3), got shape {tuple(shape)}")
  frames, height, width, channels = shape[2:]
  if frames == 0 or frames % config.clip_frames:
    raise ValueError(f"clip frames must be a multiple of {config.clip_frames}, got T={frames}")
  size = config.vit.image_size
  if (height, width, channels) != (size, size, 3):
    raise ValueError(f"frames must be {size}x{size}x3 for this vision tower, got {height}x{width}x{channels}")


def check_tile_shape(config: HiCoConfig, shape) -> None:
  """Clear errors for image tiles the model cannot take, before anything compiles."""
  size = config.vit.image_size
  if len(shape) != 5 or tuple(shape[2:]) != (size, size, 3):
    raise ValueError(f"image tiles must be (batch, tiles, {size}, {size}, 3) for this vision tower, got shape "
                     f"{tuple(shape)}")
  if shape[1] == 0:
    raise ValueError("image tiles must hold at least one tile a row (pass images=None for none)")


def init_inputs(config: HiCoConfig):
  """(input_ids, video) of the smallest prompt that touches every parameter: one clip and its
  placeholders. `model.init(rng, *init_inputs(config))` creates the vision tower and projector too."""
  tokens = config.tokens_per_clip
  input_ids = jnp.concatenate([jnp.zeros((1, 1), jnp.int32), jnp.full((1, tokens), VIDEO_TOKEN_ID, jnp.int32),
                               jnp.zeros((1, 1), jnp.int32)], axis=1)
  size = config.vit.image_size
  return input_ids, jnp.zeros((1, 1, config.clip_frames, size, size, 3), jnp.float32)
