"""UMT's fixed position tables: a 1-D sinusoid over (t, h, w), and its bicubic resampling to larger grids.

The tables are constants (not parameters, not in checkpoints), computed once in numpy. The 448 table is the
224 table resampled 14 -> 28 per frame with PyTorch's bicubic (A = -0.75, align_corners=False, borders
clamped). `jax.image.resize` uses the Keys a = -0.5 kernel, so the resampling is written out here.
"""

from __future__ import annotations

import functools

import numpy as np

BASE_GRID = 14          # the pretrained tables are for 224 px with 16 px patches


def sinusoid_table(num_positions: int, dim: int) -> np.ndarray:
  """(num_positions, dim) float32: angle p / 10000^(2⌊j/2⌋/dim), sin on even j and cos on odd j
  (interleaved, not concatenated), computed in float64 like the reference."""
  position = np.arange(num_positions, dtype=np.float64)[:, None]
  exponent = 2 * (np.arange(dim) // 2) / dim
  angles = position / np.power(10000.0, exponent)[None, :]
  table = np.where(np.arange(dim) % 2 == 0, np.sin(angles), np.cos(angles))
  return table.astype(np.float32)


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
  """PyTorch's cubic convolution weights for taps at offsets -1, 0, 1, 2 from floor(src)."""
  def near(x):   # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1
  def far(x):    # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def _resize_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) matrix doing torch's 1-D bicubic resize (align_corners=False; taps clamped to the edge)."""
  scale = in_size / out_size
  src = (np.arange(out_size) + 0.5) * scale - 0.5      # not clamped at 0 for cubic, as in torch
  base = np.floor(src).astype(int)
  weights = _cubic_weights(src - base)
  matrix = np.zeros((out_size, in_size), np.float64)
  for tap in range(4):
    np.add.at(matrix, (np.arange(out_size), np.clip(base + tap - 1, 0, in_size - 1)), weights[:, tap])
  return matrix


def bicubic_resize(grid: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
  """(..., H, W, C) -> (..., out_h, out_w, C), separable bicubic in float64."""
  rows = _resize_matrix(grid.shape[-3], out_h)
  cols = _resize_matrix(grid.shape[-2], out_w)
  return np.einsum("oh,...hwc,pw->...opc", rows, grid.astype(np.float64), cols)


@functools.lru_cache(maxsize=None)
def umt_position_table(image_size: int, frames: int, dim: int, patch: int = 16) -> np.ndarray:
  """(frames·g·g, dim) float32 for a clip of `frames` frames at `image_size` (g = image_size / patch).

  Positions run over (t, h, w) in row-major order, frames continuing the 1-D index of the 14x14 table.
  frames == 1 is the image table, which equals frame 0 of the video table.
  """
  grid = image_size // patch
  table = sinusoid_table(frames * BASE_GRID * BASE_GRID, dim)
  if grid == BASE_GRID:
    return table
  per_frame = table.reshape(frames, BASE_GRID, BASE_GRID, dim)
  # torch interpolates the float32 table; float64 arithmetic here differs from it by < 1e-6.
  return bicubic_resize(per_frame, grid, grid).reshape(frames * grid * grid, dim).astype(np.float32)
