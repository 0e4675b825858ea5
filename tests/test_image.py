"""Still images: the anyres_nopad grid, tiles and token layout, and "pad", against a transcription of the
reference's own functions (llava/mm_utils.py, llava_arch.prepare_inputs_labels_for_multimodal's spatial_nopad
branch: tests/torch_reference/llava_anyres.py), written from the official code independently of
hico_jax.data.image."""

import io

import numpy as np
import pytest
from PIL import Image

from hico_jax import VIDEO_TOKEN_ID
from hico_jax.data import image as image_io
from tests.torch_reference.llava_anyres import (ref_expand2square, ref_get_anyres_image_grid_shape,
                                                ref_possible_resolutions,
                                                ref_process_anyres_image_nopad, ref_processor_pixels,
                                                ref_select_best_resolution, ref_spatial_nopad_layout)


# ---------------------------------------------------------------------------------------------------------------

def _photo(width, height, seed=0):
  """Smooth gradients plus noise: resampling differences show, and no two tiles are alike."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:height, 0:width]
  base = np.stack([x * 255 / max(width, 1), y * 255 / max(height, 1), (x + y) % 256], -1)
  pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
  return Image.fromarray(pixels)


SIZES = [(1, 1), (3, 5), (17, 9), (224, 224), (448, 448), (225, 224), (640, 480), (480, 640), (100, 900),
         (1500, 200), (224, 1344), (1344, 224), (2000, 2000), (4032, 3024), (3000, 37), (50, 2600), (896, 448)]
PINPOINTS = ["(1x1),...,(6x6)", "(1x1),...,(3x3)", "(2x1),...,(4x3)", [[448, 448], [896, 448], [448, 896],
                                                                        [896, 896]]]


@pytest.mark.parametrize("pinpoints", PINPOINTS, ids=["6x6", "3x3", "2x1-4x3", "list"])
@pytest.mark.parametrize("tile", [224, 448])
def test_grid_choice_equals_reference_select_best_resolution_over_many_sizes(pinpoints, tile):
  if isinstance(pinpoints, list) and tile == 224:
    pinpoints = [[w // 2, h // 2] for w, h in pinpoints]
  rng = np.random.default_rng(tile)
  sizes = SIZES + [tuple(int(v) for v in rng.integers(1, 5000, 2)) for _ in range(300)]
  possible = ref_possible_resolutions(pinpoints, tile)
  for size in sizes:
    assert image_io.best_resolution(size, image_io.grid_pinpoints(pinpoints, tile)) == \
        tuple(ref_select_best_resolution(size, possible)), size


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_anyres_tiles_equal_reference_pixels_base_first_then_row_major(size):
  tile = 112 if max(size) > 1000 else 224   # any tile size works the same; smaller keeps the huge ones quick
  image = _photo(*size, seed=size[0])
  pinpoints = "(1x1),...,(6x6)"
  # (The reference asserts patch_size in (224, 336, 384, 448, 512); its arithmetic is the same for 112.)
  ref_tiles_pixels = ref_process_anyres_image_nopad(image, tile, pinpoints)
  tiles, grid = image_io.anyres_tiles(image, tile, pinpoints)
  np.testing.assert_array_equal(tiles, ref_tiles_pixels)
  assert grid == ref_get_anyres_image_grid_shape(image.size, pinpoints, tile)
  assert len(tiles) == 1 + grid[0] * grid[1]


@pytest.mark.parametrize("pinpoints", PINPOINTS[:3])
def test_token_layout_equals_reference_spatial_nopad_view_and_permute(pinpoints):
  tile = 224
  rng = np.random.default_rng(3)
  for size in SIZES + [tuple(int(v) for v in rng.integers(1, 3000, 2)) for _ in range(40)]:
    cols, rows = ref_get_anyres_image_grid_shape(size, pinpoints, tile)
    features = np.arange((1 + cols * rows) * 64 * 2).reshape(1 + cols * rows, 64, 2)   # every token unique
    expected = ref_spatial_nopad_layout(features, size, pinpoints, tile)
    grid = tuple(s // tile for s in image_io.best_resolution(size, image_io.grid_pinpoints(pinpoints, tile)))
    ours = features.reshape(-1, 2)[image_io.anyres_token_order(grid)]
    np.testing.assert_array_equal(ours, expected)


def test_one_by_one_grid_is_base_plus_one_tile_128_tokens():
  tiles, grid = image_io.anyres_tiles(_photo(200, 210), 224)
  assert grid == (1, 1) and tiles.shape == (2, 224, 224, 3)
  np.testing.assert_array_equal(image_io.anyres_token_order(grid), np.arange(128))


@pytest.mark.parametrize("size", [(300, 120), (120, 300), (224, 224), (5, 3)])
def test_several_images_are_padded_to_square_with_the_mean_colour_one_tile_each(size):
  images = [_photo(*size, seed=1), _photo(*size[::-1], seed=2)]
  out = image_io.sample_tiles(images, 224)
  mean = tuple(int(x * 255) for x in (0.485, 0.456, 0.406))     # UMTImageProcessor's image_mean
  for image, (tiles, grid) in zip(images, out):
    assert grid is None and tiles.shape == (1, 224, 224, 3)
    np.testing.assert_array_equal(tiles[0], ref_processor_pixels(ref_expand2square(image, mean), 224))


def test_expand_image_prompts_places_each_images_tokens_at_its_placeholder_and_left_pads_rows():
  one = _photo(448, 224)                                   # a 2x1 grid at 224: 3 tiles, 192 tokens
  two = [_photo(40, 60, seed=4), _photo(90, 30, seed=5)]   # padded: 64 tokens each
  ids = np.array([[5, VIDEO_TOKEN_ID, 6, 7, 8], [VIDEO_TOKEN_ID, 9, VIDEO_TOKEN_ID, 10, 11]])
  mask = np.ones_like(ids)
  out_ids, out_mask, index, tiles = image_io.expand_image_prompts(ids, mask, [one, two], 224,
                                                                  placeholder=VIDEO_TOKEN_ID)
  assert tiles.shape == (2, 3, 224, 224, 3)
  assert out_ids.shape == (2, 4 + 192) and out_mask[1].sum() == 3 + 128 and not out_mask[1, :196 - 131].any()
  row0 = index[0][out_ids[0] == VIDEO_TOKEN_ID]
  np.testing.assert_array_equal(row0, image_io.anyres_token_order((2, 1)))
  row1 = index[1][out_ids[1] == VIDEO_TOKEN_ID]
  np.testing.assert_array_equal(row1, np.arange(128))        # image 2's tile comes after image 1's
  np.testing.assert_array_equal(out_ids[1][out_mask[1] > 0][[64, 65]], [9, VIDEO_TOKEN_ID])
  with pytest.raises(ValueError, match="2 image placeholders .* for 1 image"):
    image_io.expand_image_prompts(ids[1:], mask[1:], [one], 224, placeholder=VIDEO_TOKEN_ID)


@pytest.mark.parametrize("data, reason", [(b"", "zero bytes"), (b"not an image at all", "cannot decode"),
                                          ("missing", "No such file")])
def test_bad_images_raise_image_decode_error_naming_them(tmp_path, data, reason):
  if data == "missing":
    data = str(tmp_path / "nowhere.jpg")
  with pytest.raises(image_io.ImageDecodeError, match=reason):
    image_io.decode_image(data)


def test_truncated_jpeg_is_an_image_decode_error():
  buffer = io.BytesIO()
  _photo(300, 200).save(buffer, format="JPEG")
  with pytest.raises(image_io.ImageDecodeError):
    image_io.decode_image(buffer.getvalue()[:len(buffer.getvalue()) // 2])
