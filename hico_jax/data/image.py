"""Still images as VideoChat-Flash takes them (videochat_flash.md §2 "Image layout", §5 "Images").

A sample with one image uses `anyres_nopad` (`llava/mm_utils.py`, `process_anyres_image_nopad`):

* the grid: among the pinpoint resolutions (by default every (i·S, j·S) for i, j in 1..6, listed width-major as
  the reference expands "(1x1),...,(6x6)"), the one that keeps the most of the image's pixels after an
  aspect-preserving downscale, ties to the one that wastes least, then to the first listed;
* the tiles: the base image (the whole image resized straight to S x S) first, then the image resized straight
  to the grid resolution and cut into S x S tiles row by row. Each tile is one T = 1 "frame" of the vision
  tower, merged alone to 64 tokens.
* the token layout (`prepare_inputs_labels_for_multimodal`, `spatial_nopad`): the base tile's 64 tokens, then
  every tile's 64 tokens viewed as an 8 x 8 block and the blocks laid out as one raster over the whole grid
  (row of tiles, row inside the tile, column of tiles, column inside the tile). `anyres_token_order` gives it.

A sample with several images uses "pad" for each (the reference's `process_image(f, "pad")`): the image pasted
centred on a square of the processor's mean colour (123, 116, 103), resized to S x S, one tile, 64 tokens.

Resizes are PIL's, with the reference's filters: its `image.resize(...)` calls name none, so they use PIL's
default (bicubic for RGB), and the processor's resize of a tile that is already S x S changes nothing. Pixels
leave here as uint8 (S, S, 3) tiles; `video.normalize` (or the train step, on the device) normalises them.
"""

from __future__ import annotations

import io
import math
import os
import re
from typing import Sequence

import numpy as np
from PIL import Image

from hico_jax.data import IMAGENET_MEAN

# The released models' `image_grid_pinpoints`.
DEFAULT_PINPOINTS = "(1x1),...,(6x6)"
# expand2square's background: the processor's mean, int(x * 255) per channel.
PAD_COLOUR = tuple(int(x * 255) for x in IMAGENET_MEAN)
TOKENS_PER_TILE = 64


class ImageDecodeError(ValueError):
  """An image that cannot be read; the message names it."""


def decode_image(source: bytes | str | os.PathLike, name: str | None = None) -> Image.Image:
  """The image's pixels as an RGB PIL image (the reference's `Image.open(...).convert("RGB")`), fully read,
  so a truncated file fails here and not later. ImageDecodeError names the image."""
  name = name or (os.fspath(source) if isinstance(source, (str, os.PathLike)) else "<image bytes>")
  try:
    if isinstance(source, (bytes, bytearray, memoryview)):
      if not len(source):
        raise ValueError("zero bytes")
      image = Image.open(io.BytesIO(bytes(source)))
    else:
      image = Image.open(source)
    image.load()
    image = image.convert("RGB")
  except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
    raise ImageDecodeError(f"cannot decode image {name}: {type(e).__name__}: {e}") from None
  if image.width < 1 or image.height < 1:
    raise ImageDecodeError(f"image {name} has no pixels ({image.width}x{image.height})")
  return image


def grid_pinpoints(spec: str | Sequence[Sequence[int]], tile_size: int) -> list[tuple[int, int]]:
  """Candidate (width, height) resolutions. A string "(AxB),...,(CxD)" means every (i·S, j·S) for i in A..C
  and j in B..D, i outer (the reference reads only the first and last pair); a list is taken as it is."""
  if isinstance(spec, str):
    pairs = re.findall(r"\((\d+)x(\d+)\)", spec)
    if not pairs:
      raise ValueError(f"image grid pinpoints {spec!r} name no '(AxB)' tile counts, e.g. {DEFAULT_PINPOINTS!r}")
    (i0, j0), (i1, j1) = (tuple(map(int, p)) for p in (pairs[0], pairs[-1]))
    if not (1 <= i0 <= i1 and 1 <= j0 <= j1):
      raise ValueError(f"image grid pinpoints {spec!r} must run from small to large tile counts")
    return [(i * tile_size, j * tile_size) for i in range(i0, i1 + 1) for j in range(j0, j1 + 1)]
  resolutions = [(int(w), int(h)) for w, h in spec]
  if not resolutions or any(w <= 0 or h <= 0 or w % tile_size or h % tile_size for w, h in resolutions):
    raise ValueError(f"image grid pinpoints {resolutions} must be non-empty multiples of the tile size {tile_size}")
  return resolutions


def best_resolution(size: tuple[int, int], resolutions: Sequence[tuple[int, int]]) -> tuple[int, int]:
  """select_best_resolution: the candidate keeping the most image pixels once the image is scaled (keeping its
  aspect) into it, capped at the image's own pixel count; ties go to the least padding, then the earlier one."""
  width, height = size
  best, best_kept, best_waste = None, 0, math.inf
  for w, h in resolutions:
    scale = min(w / width, h / height)
    kept = min(int(width * scale) * int(height * scale), width * height)
    waste = w * h - kept
    if kept > best_kept or (kept == best_kept and waste < best_waste):
      best, best_kept, best_waste = (w, h), kept, waste
  if best is None:
    raise ValueError(f"no grid resolution fits an image of {width}x{height} among {list(resolutions)}")
  return best


def _pixels(image: Image.Image, tile_size: int) -> np.ndarray:
  """The processor's straight resize to S x S (a no-op for a tile already that size), as uint8."""
  if image.size != (tile_size, tile_size):
    image = image.resize((tile_size, tile_size), Image.Resampling.BICUBIC)
  return np.asarray(image, np.uint8)


def anyres_tiles(image: Image.Image, tile_size: int, pinpoints=DEFAULT_PINPOINTS) -> tuple[np.ndarray, tuple[int, int]]:
  """(tiles (1 + cols·rows, S, S, 3) uint8, (cols, rows)): the base image, then the grid's tiles row by row."""
  width, height = best_resolution(image.size, grid_pinpoints(pinpoints, tile_size))
  resized = image.resize((width, height))
  tiles = [_pixels(image.resize((tile_size, tile_size)), tile_size)]
  for top in range(0, height, tile_size):
    for left in range(0, width, tile_size):
      tiles.append(_pixels(resized.crop((left, top, left + tile_size, top + tile_size)), tile_size))
  return np.stack(tiles), (width // tile_size, height // tile_size)


def pad_tile(image: Image.Image, tile_size: int) -> np.ndarray:
  """(1, S, S, 3) uint8: expand2square with the mean colour, then the straight resize."""
  width, height = image.size
  if width != height:
    side = max(width, height)
    square = Image.new(image.mode, (side, side), PAD_COLOUR)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    image = square
  return _pixels(image, tile_size)[None]


def sample_tiles(images: Sequence[Image.Image], tile_size: int, pinpoints=DEFAULT_PINPOINTS
                 ) -> list[tuple[np.ndarray, tuple[int, int] | None]]:
  """A sample's images as the reference's dataset makes them: one image anyres_nopad, several "pad".
  Each entry is (tiles, grid); grid None for a padded image (one tile, 64 tokens)."""
  if len(images) == 1:
    return [anyres_tiles(images[0], tile_size, pinpoints)]
  return [(pad_tile(image, tile_size), None) for image in images]


def anyres_token_order(grid: tuple[int, int] | None, tokens_per_tile: int = TOKENS_PER_TILE) -> np.ndarray:
  """The layout of an image's visual tokens: entry k is the index, in the image's tile tokens taken tile by tile
  (tile t's token i at t·tokens_per_tile + i), of the token the LLM sees k-th. grid (cols, rows) for an
  anyres image (base first, then the tiles' blocks as one raster); None for a padded image (identity)."""
  if grid is None:
    return np.arange(tokens_per_tile)
  side = math.isqrt(tokens_per_tile)
  if side * side != tokens_per_tile:
    raise ValueError(f"the anyres layout views a tile's tokens as a square; {tokens_per_tile} is not one")
  cols, rows = grid
  tile = 1 + np.arange(rows)[:, None, None, None] * cols + np.arange(cols)[None, None, :, None]   # (r, 1, c, 1)
  token = np.arange(side)[None, :, None, None] * side + np.arange(side)[None, None, None, :]       # (1, y, 1, x)
  raster = (tile * tokens_per_tile + token).reshape(-1)
  return np.concatenate([np.arange(tokens_per_tile), raster])


def as_pil(image) -> Image.Image:
  """A PIL image, a file path, encoded bytes or an (H, W, 3) uint8 array -> an RGB PIL image."""
  if isinstance(image, Image.Image):
    return image.convert("RGB")
  if isinstance(image, np.ndarray):
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3 or not image.shape[0] or not image.shape[1]:
      raise ValueError(f"an image array must be (H, W, 3) uint8 RGB, got {image.dtype} {image.shape}")
    return Image.fromarray(image)
  if isinstance(image, (bytes, bytearray, memoryview, str, os.PathLike)):
    return decode_image(image)
  raise ValueError(f"an image must be a PIL image, a path, bytes or an (H, W, 3) uint8 array, got {type(image)}")


def expand_image_prompts(input_ids, attention_mask, images_per_row, tile_size: int, pinpoints=DEFAULT_PINPOINTS,
                         placeholder: int = -200, tokens_per_tile: int = TOKENS_PER_TILE):
  """Prompts with one placeholder per image -> the model's inputs (ids, mask, visual_index, tiles uint8).

  Row b's j-th placeholder becomes its j-th image's tokens (one image: anyres_nopad; several: "pad" each).
  visual_index gives each placeholder the index of its token in the row's tiles' tokens (tile by tile), in the
  reference's layout. Rows of different lengths are left-padded (mask 0) to the longest, and tiles padded with
  zero tiles to the most tiles of any row; padding is never looked at."""
  ids_rows, mask_rows, index_rows, tile_rows = [], [], [], []
  for row, (ids, mask, images) in enumerate(zip(input_ids, attention_mask, images_per_row)):
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    where = np.flatnonzero(ids == placeholder)
    if len(where) != len(images):
      raise ValueError(f"input_ids row {row} holds {len(where)} image placeholders ({placeholder}) for "
                       f"{len(images)} image(s); put one placeholder where each image goes")
    if not images:
      raise ValueError(f"row {row} has no image; give each row at least one (or call without images=)")
    per_image = sample_tiles([as_pil(im) for im in images], tile_size, pinpoints)
    new_ids, new_mask, index, start, first_tile = [], [], [], 0, 0
    for at, (tiles, grid) in zip(where, per_image):
      count = len(tiles) * tokens_per_tile
      new_ids += [ids[start:at], np.full(count, placeholder)]
      new_mask += [mask[start:at], np.full(count, mask[at])]
      order = first_tile * tokens_per_tile + anyres_token_order(grid, tokens_per_tile)
      index += [np.zeros(at - start, np.int64), order]
      start, first_tile = at + 1, first_tile + len(tiles)
    new_ids.append(ids[start:])
    new_mask.append(mask[start:])
    index.append(np.zeros(len(ids) - start, np.int64))
    ids_rows.append(np.concatenate(new_ids))
    mask_rows.append(np.concatenate(new_mask))
    index_rows.append(np.concatenate(index))
    tile_rows.append(np.concatenate([t for t, _ in per_image]))
  length, most_tiles = max(map(len, ids_rows)), max(map(len, tile_rows))
  left = lambda x, fill: np.concatenate([np.full(length - len(x), fill, x.dtype), x])
  tiles = np.zeros((len(tile_rows), most_tiles, tile_size, tile_size, 3), np.uint8)
  for row, t in enumerate(tile_rows):
    tiles[row, :len(t)] = t
  return (np.stack([left(x, 0) for x in ids_rows]), np.stack([left(x, 0) for x in mask_rows]).astype(np.int32),
          np.stack([left(x, 0) for x in index_rows]).astype(np.int32), tiles)
