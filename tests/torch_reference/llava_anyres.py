"""The reference's image functions, transcribed from the official code (llava-train_videochat/llava/mm_utils.py
and llava_arch.prepare_inputs_labels_for_multimodal's spatial_nopad branch, at 2f8e2f5) into numpy and PIL,
independent of hico_jax.data.image: the tests' reference for the grid, the tiles and the token layout."""

import ast
import re

import numpy as np
from PIL import Image



def ref_select_best_resolution(original_size, possible_resolutions, max_resolutions=None, patch_size=None):
  original_width, original_height = original_size
  best_fit = None
  max_effective_resolution = 0
  min_wasted_resolution = float("inf")
  for width, height in possible_resolutions:
    if max_resolutions is not None and (width * height != patch_size * patch_size):
      if (width * height + patch_size * patch_size) > max_resolutions:
        continue
    scale = min(width / original_width, height / original_height)
    downscaled_width, downscaled_height = int(original_width * scale), int(original_height * scale)
    effective_resolution = min(downscaled_width * downscaled_height, original_width * original_height)
    wasted_resolution = (width * height) - effective_resolution
    if effective_resolution > max_effective_resolution or (
        effective_resolution == max_effective_resolution and wasted_resolution < min_wasted_resolution):
      max_effective_resolution = effective_resolution
      min_wasted_resolution = wasted_resolution
      best_fit = (width, height)
  return best_fit


def ref_possible_resolutions(grid_pinpoints, patch_size):
  if isinstance(grid_pinpoints, str) and "x" in grid_pinpoints:
    matches = re.findall(r"\((\d+)x(\d+)\)", grid_pinpoints)
    range_start = tuple(map(int, matches[0]))
    range_end = tuple(map(int, matches[-1]))
    grid_pinpoints = [(i, j) for i in range(range_start[0], range_end[0] + 1)
                      for j in range(range_start[1], range_end[1] + 1)]
    grid_pinpoints = [[dim * patch_size for dim in pair] for pair in grid_pinpoints]
  if type(grid_pinpoints) is list:
    return grid_pinpoints
  return ast.literal_eval(grid_pinpoints)


def ref_divide_to_patches(image, patch_size):
  patches = []
  width, height = image.size
  for i in range(0, height, patch_size):
    for j in range(0, width, patch_size):
      patches.append(image.crop((j, i, j + patch_size, i + patch_size)))
  return patches


def ref_processor_pixels(image, size):
  """UMTImageProcessor's resize (PIL bicubic, straight to size x size), before rescale/normalise."""
  return np.asarray(image.resize((size, size), Image.BICUBIC), np.uint8)


def ref_process_anyres_image_nopad(image, patch_size, grid_pinpoints):
  possible_resolutions = ref_possible_resolutions(grid_pinpoints, patch_size)
  best_resolution = ref_select_best_resolution(image.size, possible_resolutions, max_resolutions=None,
                                               patch_size=patch_size)
  patches = ref_divide_to_patches(image.resize(best_resolution), patch_size)
  image_original_resize = image.resize((patch_size, patch_size))
  image_patches = [image_original_resize] + patches
  return np.stack([ref_processor_pixels(p, patch_size) for p in image_patches])


def ref_get_anyres_image_grid_shape(image_size, grid_pinpoints, patch_size):
  width, height = ref_select_best_resolution(image_size, ref_possible_resolutions(grid_pinpoints, patch_size))
  return width // patch_size, height // patch_size


def ref_expand2square(pil_img, background_color):
  width, height = pil_img.size
  if width == height:
    return pil_img
  elif width > height:
    result = Image.new(pil_img.mode, (width, width), background_color)
    result.paste(pil_img, (0, (width - height) // 2))
    return result
  else:
    result = Image.new(pil_img.mode, (height, height), background_color)
    result.paste(pil_img, ((height - width) // 2, 0))
    return result


def ref_spatial_nopad_layout(image_feature, image_size, grid_pinpoints, patch_size, per_side=8):
  """The `image_feature.shape[0] > 1` branch (anyres, spatial_nopad, nothing unpadded, base kept), in numpy."""
  base_image_feature = image_feature[0]
  image_feature = image_feature[1:]
  num_patch_width, num_patch_height = ref_get_anyres_image_grid_shape(image_size, grid_pinpoints, patch_size)
  image_feature = image_feature.reshape(num_patch_height, num_patch_width, per_side, per_side, -1)
  image_feature = image_feature.transpose(0, 2, 1, 3, 4).reshape(-1, image_feature.shape[-1])
  return np.concatenate([base_image_feature, image_feature], axis=0)
