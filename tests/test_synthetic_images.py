"""Synthetic image tasks: every answer read back from the written pictures by an independent pixel analysis
(connected components, colours, fill ratios), and the set goes through the builder and the pipeline."""

import json

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from hico_jax.data import pipeline, synthetic_images, tfds_longvid
from hico_jax.data import tokenizer as tk

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


def test_the_set_builds_into_shards_that_the_pipeline_tiles_without_skipping(dataset, tmp_path):
  report = tfds_longvid.build(str(dataset), str(tmp_path / "shards"), log=lambda _: None)
  assert not report.skipped_ids
  tk.build_qwen2_tokenizer_json(tmp_path / "tokenizer")
  config = pipeline.DataConfig(shards=str(tmp_path / "shards"), tokenizer_dir=str(tmp_path / "tokenizer"),
                               image_size=64, token_budget=1024, frame_budget=4, tile_budget=12, num_epochs=1)
  batches = list(pipeline.make_dataset(config, batch_size=1))
  assert sum(int(b["num_skipped"]) for b in batches) == 0
  assert sum(len(set(b["segment_ids"][0]) - {0}) for b in batches) == 40
  assert max(int(np.any(b["tiles"][0].reshape(12, -1), axis=1).sum()) for b in batches) > 5   # rows of several
