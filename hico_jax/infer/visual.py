"""A video's visual tokens for inference: uint8 frames (T, S, S, 3) -> (16·T, H), a chunk of clips at a time.

A 10,000-frame video is 1.5 GB of uint8 at 224 px and 6 GB at 448, four times that as float32; the vision
tower's activations for all its clips at once would not fit any device. So the frames stay on the host as
uint8, cross to the device one chunk of clips at a time, are normalised there, and go through the tower, the
merge and the projector (HiCo.encode_clips, the step of HiCo.encode_video's loop) under one compiled program
per chunk shape. Each chunk's tokens are written into one preallocated (clips, 64, H) buffer, so the
device holds the video's tokens once plus one chunk's activations. While chunk k runs, chunk k+1 is being
uploaded; waiting on chunk k-1 before that keeps the progress bar honest.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from hico_jax.data import normalize
from hico_jax.models import hico
from hico_jax.models.qwen2 import DTYPES
from hico_jax.ops import xla_options

# Vision tokens per chunk by default: 64 clips at 224 px (16 at 448), about 2.5 GiB of XLA attention scores
# in float32 per chunk and a few hundred MiB of other activations; small enough beside a 7B decoder, large
# enough that the per-chunk dispatch and the host link stay hidden behind the tower's matmuls.
DEFAULT_CHUNK_TOKENS = 64 * 4 * 196
# A video encoded faster than this shows no progress bar.
PROGRESS_DELAY_S = 3.0

# What data.video.normalize makes of each uint8 level in each channel: the device looks the values up, so its
# frames are the host's bit for bit (XLA turns x / 255 and / std into products by reciprocals, off by up to
# 7e-7, hundreds of ulps where x - mean nearly cancels).
_LEVELS = normalize(np.broadcast_to(np.arange(256, dtype=np.uint8)[:, None], (256, 3))).reshape(-1)


def normalize_on_device(frames_uint8: jax.Array) -> jax.Array:
  """(..., 3) uint8 -> float32, exactly `hico_jax.data.normalize` of the same frames, computed on the device."""
  index = frames_uint8.astype(jnp.int32) * 3 + jnp.arange(3, dtype=jnp.int32)
  return jnp.take(jnp.asarray(_LEVELS), index, mode="clip")


def default_chunk_clips(config: hico.HiCoConfig) -> int:
  return max(1, DEFAULT_CHUNK_TOKENS // (config.clip_frames * config.vit.tokens_per_frame))


def check_frames(config: hico.HiCoConfig, frames) -> None:
  """One-line errors for frames the encoder cannot take, before anything compiles."""
  size, clip = config.vit.image_size, config.clip_frames
  dtype, shape = getattr(frames, "dtype", None), tuple(getattr(frames, "shape", ()))
  if dtype not in (np.uint8, np.float32) or len(shape) != 4 or shape[1:] != (size, size, 3):
    raise ValueError(f"frames must be uint8 (frames, {size}, {size}, 3) for this vision tower "
                     f"(hico_jax.data.video.decode_frames(..., size={size})), got {dtype} {shape} (float32 "
                     f"frames are taken as hico_jax.data.video.preprocess normalises them)")
  if shape[0] == 0 or shape[0] % clip:
    raise ValueError(f"the frame count must be a positive multiple of {clip} (whole clips), got {shape[0]}; "
                     f"hico_jax.data.video.whole_clips pads a video with its last frame")


class VideoEncoder:
  """Encodes videos for one HiCo model's params: `encoder(frames_uint8)` -> (16·T, H) device array in the
  LLM's compute dtype, the tokens `HiCo.encode_video` gives for the same frames normalised on the host."""

  def __init__(self, config: hico.HiCoConfig, params, *, chunk_clips: int | None = None):
    chunk_clips = default_chunk_clips(config) if chunk_clips is None else chunk_clips
    if isinstance(chunk_clips, bool) or not isinstance(chunk_clips, (int, np.integer)) or chunk_clips < 1:
      raise ValueError(f"chunk_clips must be a positive number of clips, got {chunk_clips!r}")
    self.config, self.chunk_clips = config, int(chunk_clips)
    self.params = {"visual": params["visual"]}           # only what the tower and projector read
    self.dtype = DTYPES[config.llm.dtype]
    module = hico.HiCo(config)
    # uint8 frames are normalised here; float32 ones arrive normalised (data.video.preprocess).
    self.encode_chunk = jax.jit(
        lambda p, clips: module.apply({"params": p}, normalize_on_device(clips) if clips.dtype == jnp.uint8
                                      else clips, method=hico.HiCo.encode_clips).astype(self.dtype),
        compiler_options=xla_options.vision_compiler_options())
    # The buffer is donated: each chunk lands in it in place, with no second copy of a long video's tokens.
    self._place = jax.jit(lambda out, tokens, at: jax.lax.dynamic_update_slice_in_dim(out, tokens, at, axis=0),
                          donate_argnums=0)

  def chunk_for(self, num_clips: int) -> int:
    """Clips per compiled chunk: the configured size, or for a shorter video the next power of two above its
    clip count (a handful of compiled shapes across short videos, under half of a chunk padding)."""
    return min(self.chunk_clips, 1 << (num_clips - 1).bit_length())

  def __call__(self, frames_uint8, *, progress: bool = True) -> jax.Array:
    """(T, S, S, 3) uint8 (or float32, normalised) -> (16·T, H); a progress bar on stderr if it takes over PROGRESS_DELAY_S and more
    than one chunk (a single step, mostly compiling, has no progress to show)."""
    check_frames(self.config, frames_uint8)
    frames = np.asarray(frames_uint8)
    clip, size = self.config.clip_frames, self.config.vit.image_size
    clips = frames.reshape(-1, clip, size, size, 3)
    num_clips, chunk = len(clips), self.chunk_for(len(clips))
    out = jnp.zeros((num_clips, self.config.tokens_per_clip, self.config.llm.hidden_size), self.dtype)
    pending = None
    with tqdm(total=len(frames), unit="frame", desc="encoding video", delay=PROGRESS_DELAY_S, leave=False,
              disable=not progress or num_clips <= chunk) as bar:
      for start in range(0, num_clips, chunk):
        batch = clips[start:start + chunk]
        valid = len(batch)
        if valid < chunk:   # the last chunk, padded to the compiled shape; its padding is never kept
          batch = np.concatenate([batch, np.zeros((chunk - valid,) + batch.shape[1:], batch.dtype)])
        tokens = self.encode_chunk(self.params, jax.device_put(batch))
        out = self._place(out, tokens if valid == chunk else tokens[:valid], start)
        if pending is not None:
          pending[0].block_until_ready()
          bar.update(pending[1] * clip)
        pending = (tokens, valid)
      pending[0].block_until_ready()
      bar.update(pending[1] * clip)
    return out.reshape(num_clips * self.config.tokens_per_clip, -1)
