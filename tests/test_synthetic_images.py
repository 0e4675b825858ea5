"""Synthetic image tasks: every answer read back from the written pictures by an independent pixel analysis
(connected components, colours, fill ratios), and the set goes through the builder and the pipeline."""

import json

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from hico_jax import VIDEO_TOKEN_ID, presets
from hico_jax.data import pipeline, synthetic_images, tfds_longvid
from hico_jax.data import tokenizer as tk
from hico_jax.models import hico
from tests.torch_reference.llava_anyres import ref_get_anyres_image_grid_shape

PALETTE = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (40, 80, 230), "yellow": (230, 210, 40),
           "purple": (150, 50, 200)}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  return synthetic_images.make_image_dataset(tmp_path_factory.mktemp("synthetic_images"), num_images=40, seed=0,
                                             size=64)


def _shapes(path):
  """[(colour name, fill ratio of the bounding box)] for each connected non-background blob."""
  pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
  background = pixels[0, 0]
  labels, count = ndimage.label(np.any(pixels != background, axis=-1))
  out = []
  for k in range(1, count + 1):
    blob = labels == k
    colour = pixels[blob].mean(axis=0)
    name = min(PALETTE, key=lambda c: np.abs(np.asarray(PALETTE[c]) - colour).sum())
    ys, xs = np.nonzero(blob)
    out.append((name, blob.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))))
  return out


def _shape_name(fill):
  return "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"


def test_every_answer_is_what_the_pixels_show(dataset):
  images = dataset.out_dir / "images"
  seen = set()
  for path in sorted((dataset.out_dir / "annotations").glob("*.jsonl")):
    for line in path.read_text().splitlines():
      record = json.loads(line)
      task, answer = record["task"], record["conversations"][1]["value"]
      seen.add(task)
      files = record["image"] if isinstance(record["image"], list) else [record["image"]]
      found = [_shapes(images / f) for f in files]
      if task == "image_colour":
        assert len(found[0]) == 1 and answer == found[0][0][0].capitalize() + "."
      elif task == "shape_count":
        assert answer == f"{len(found[0])}." and len({c for c, _ in found[0]}) == 1
      elif task == "image_caption":
        (colour, fill), = found[0]
        assert answer == f"A {colour} {_shape_name(fill)}."
      else:
        first, second = len(found[0]), len(found[1])
        assert first != second and answer == ("The first." if first > second else "The second.")
        assert record["conversations"][0]["value"].count("<image>") == 2
  assert seen == set(synthetic_images.IMAGE_TASKS)


def test_a_picture_does_not_depend_on_how_many_are_made(dataset, tmp_path):
  small = synthetic_images.make_image_dataset(tmp_path, num_images=4, seed=0, size=64)
  for name in ("image_colour_00000.png", "image_comparison_00000_1.png"):
    assert (small.out_dir / "images" / name).read_bytes() == (dataset.out_dir / "images" / name).read_bytes()
  assert not small.reused
  again = synthetic_images.make_image_dataset(tmp_path, num_images=4, seed=0, size=64)
  assert again.reused and again.counts == small.counts           # the same parameters: nothing written
  assert not synthetic_images.make_image_dataset(tmp_path, num_images=8, seed=0, size=64).reused


def test_the_set_builds_into_shards_that_the_pipeline_tiles_at_16_tokens_a_tile_for_the_64_px_model(dataset, tmp_path):
  """The embedded default's tower (64 px tiles, 16 px patches: 4x4 patches) gives a tile 16 tokens; the pipeline,
  given the model's counts, writes 16 placeholders for each tile of each picture. Tiles a picture takes: the base
  plus the reference's grid (numpy transcription of llava's get_anyres_image_grid_shape) for one picture, one
  padded tile each for two; counted here from the PNGs, and against the rows' non-empty tiles."""
  config_64 = hico.HiCoConfig.from_dict(dict(presets.hico("tiny"), vit=dict(presets.hico("tiny").vit, image_size=64)))
  counts = config_64.pipeline_counts()
  assert counts["tokens_per_tile"] == 16
  report = tfds_longvid.build(str(dataset), str(tmp_path / "shards"), log=lambda _: None)
  assert not report.skipped_ids
  tk.build_qwen2_tokenizer_json(tmp_path / "tokenizer")
  config = pipeline.DataConfig(shards=str(tmp_path / "shards"), tokenizer_dir=str(tmp_path / "tokenizer"),
                               image_size=64, token_budget=1024, frame_budget=4, tile_budget=12, num_epochs=1,
                               max_samples_per_row=1, **counts)
  tiles_seen = []
  batches = list(pipeline.make_dataset(config, batch_size=1))
  for b in batches:                   # one sample a row
    tiles = int(np.any(b["tiles"][0].reshape(12, -1), axis=1).sum())     # a picture's background is never 0
    placeholders = int((b["input_ids"][0] == VIDEO_TOKEN_ID).sum())
    assert placeholders == 16 * tiles
    # frame_budget 4 at 16 a frame: the row's video tokens are 0..63, its tile tokens 64 onwards
    assert sorted(b["visual_index"][0][b["input_ids"][0] == VIDEO_TOKEN_ID]) == list(range(64, 64 + 16 * tiles))
    tiles_seen.append(tiles)
  assert sum(int(b["num_skipped"]) for b in batches) == 0 and len(batches) == 40
  want = []
  for path in sorted((dataset.out_dir / "annotations").glob("*.jsonl")):
    for line in path.read_text().splitlines():
      files = json.loads(line)["image"]
      if isinstance(files, list):
        want.append(len(files))
      else:
        cols, rows = ref_get_anyres_image_grid_shape(Image.open(dataset.out_dir / "images" / files).size,
                                                     "(1x1),...,(6x6)", 64)
        want.append(1 + cols * rows)
  assert sorted(tiles_seen) == sorted(want) and max(want) > 2
