"""Image records in the training pipeline: decoding and tiling in the workers, and where each visual token lands.

A sample's images become uint8 tiles (one image: anyres_nopad, base + up to 6x6; several: one padded tile each,
hico_jax.data.image) and, per token, `image_order`: for the k-th placeholder of the sample's images, the index
of the token it receives among the sample's tiles' tokens (tile by tile, tokens_per_tile each: the reference's 64,
fewer for a tile of fewer patches, as the model's HiCoConfig.tokens_per_tile says); -1 for every other token.
Packing then concatenates the rows' tiles in sample order, as it does frames, and `visual_index` (in
FinishBatch, before any zig-zag) turns both into the index each placeholder takes in the model's row of visual
tokens: the row's video tokens (frame_budget·16, clips in order) then its tiles' tokens
(`HiCo.visual_tokens_of_row`). A row has static shapes: frame_budget frames and tile_budget tiles, zeros where
unused, so image tiles and video clips of a batch go through the vision tower in the same step.
"""

from __future__ import annotations

import numpy as np

from hico_jax.data import image as image_io
from hico_jax.data.text import SampleTooLongError
from hico_jax.tokens import VIDEO_TOKEN_ID


def decode_images(blobs: list[bytes], header: dict, image_size: int, tile_budget: int, pinpoints: str, *,
                  tokens_per_tile: int) -> tuple[np.ndarray, list[int], list[np.ndarray]]:
  """(tiles (N, S, S, 3) uint8, visual token count per image, token order per image offset to the sample's
  tiles). ImageDecodeError for an image that does not decode; SampleTooLongError past tile_budget."""
  if tile_budget <= 0:
    raise ValueError("image record, but data.tile_budget=0: this stage takes no images (set data.tile_budget)")
  if not blobs:
    raise image_io.ImageDecodeError(f"image record {header.get('id')!r} holds no image bytes (a zero-size file?)")
  sources = header.get("source")
  sources = [sources] if isinstance(sources, str) else sources
  names = sources if isinstance(sources, list) and len(sources) == len(blobs) else [None] * len(blobs)
  pictures = [image_io.decode_image(blob, name=name) for blob, name in zip(blobs, names)]
  per_image = image_io.sample_tiles(pictures, image_size, pinpoints)
  num_tiles = sum(len(tiles) for tiles, _ in per_image)
  if num_tiles > tile_budget:
    raise SampleTooLongError(f"{num_tiles} image tiles exceed data.tile_budget={tile_budget}")
  counts, orders, first = [], [], 0
  for tiles, grid in per_image:
    counts.append(len(tiles) * tokens_per_tile)
    orders.append(first * tokens_per_tile + image_io.anyres_token_order(grid, tokens_per_tile))
    first += len(tiles)
  return np.concatenate([tiles for tiles, _ in per_image]), counts, orders


def image_order(input_ids: np.ndarray, orders: list[np.ndarray]) -> np.ndarray:
  """Per token: the tile token an image placeholder receives (the sample's images in order), -1 elsewhere."""
  out = np.full(len(input_ids), -1, np.int32)
  if not orders:                  # a video or text sample
    return out
  where = np.flatnonzero(input_ids == VIDEO_TOKEN_ID)
  flat = np.concatenate(orders) if orders else np.zeros(0, np.int32)
  if len(where) != len(flat):
    raise ValueError(f"{len(where)} image placeholders for {len(flat)} image tokens")
  out[where] = flat
  return out


def visual_index(input_ids: np.ndarray, image_orders: np.ndarray, segment_ids: np.ndarray,
                 frame_budget: int, tokens_per_frame: int) -> np.ndarray:
  """(B, L) packed rows -> for each placeholder its index in the row's visual tokens (video tokens, then tile
  tokens); 0 elsewhere. Rows must be in packed order (segments contiguous), not zig-zagged."""
  is_visual = input_ids == VIDEO_TOKEN_ID
  is_image = is_visual & (image_orders >= 0)        # packing pads image_order with 0s, input_ids with 0s
  video_rank = np.cumsum(is_visual & ~is_image, axis=1) - 1
  images_before = np.cumsum(is_image, axis=1) - is_image          # image tokens earlier in the row
  positions = np.arange(input_ids.shape[1])
  starts = np.concatenate([np.ones((len(segment_ids), 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  segment_start = np.maximum.accumulate(np.where(starts, positions, 0), axis=1)
  # A sample's image tokens follow the image tokens of the row's earlier samples.
  tile_offset = np.take_along_axis(images_before, segment_start, axis=1)
  video_tokens = frame_budget * tokens_per_frame
  index = np.where(is_image, video_tokens + tile_offset + image_orders, np.where(is_visual, video_rank, 0))
  return index.astype(np.int32)
