"""Synthetic still images whose answers are in the pixels: the image side of the synthetic data (the reference's
stages also align and tune on image sets; videochat_flash.md §6).

  image_colour      one shape on a dark background       "What colour is the shape?" -> "Red."
  shape_count       N shapes of one colour, N in 1..5     "How many shapes are in the picture?" -> "3."
  image_caption     one shape                             "Describe the picture in a few words." -> "A red circle."
  image_comparison  two pictures, each with 1..5 shapes   "<image>\\n<image>\\nWhich picture has more shapes, the
                    (a different count in each)            first or the second?" -> "The second."

Pictures are drawn lossless (PNG) at random sizes between half and twice the tile size, in any aspect, so a
single picture takes the anyres tiling with grids from 1x1 to 2x2 and more, and the comparison takes the padded
"pad" path of several images. Shapes never touch and stay clear of tile borders only by chance: a model must
find them in the base tile or across tiles. Every picture has its own generator (`sample_rng`), so the output
does not depend on how many pictures or which tasks are asked for.

`make_image_dataset` writes out_dir/images/<task>_<index>.png, out_dir/annotations/<task>.jsonl (LLaVA records
{"id", "image", "conversations", "task"}; "image" a path relative to images/, or a list of two) and
out_dir/data.yaml (media_type image), the layout `hico_jax.data.tfds_longvid.build` reads, and
out_dir/manifest.json (the parameters, written last): a later call with the same ones writes nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from hico_jax.data.synthetic import COLOURS, PALETTE, SHAPES, SyntheticDataset, _cap, _dark_background, _draw

IMAGE_TASKS = ("image_colour", "shape_count", "image_caption", "image_comparison")
MAX_SHAPES = 5
_TASK_SEED_OFFSET = 100          # apart from the video tasks' generators


def sample_rng(seed: int, task: str, index: int) -> np.random.Generator:
  return np.random.default_rng([seed, _TASK_SEED_OFFSET + IMAGE_TASKS.index(task), index])


def _canvas(rng: np.random.Generator, size: int) -> np.ndarray:
  width, height = (int(v) for v in rng.integers(size // 2, 2 * size + 1, size=2))
  return np.full((height, width, 3), _dark_background(rng), np.uint8)


def _place(rng: np.random.Generator, canvas: np.ndarray, count: int, shape_of, colour_of, grid: int = 3) -> None:
  """`count` shapes in distinct cells of a grid x grid layout over the picture, jittered inside their cell, so
  none touch. A lone shape gets the whole picture as its cell (grid 1): big enough to tell its shape."""
  height, width = canvas.shape[:2]
  cell_w, cell_h = width / grid, height / grid
  radius = max(3, int(min(cell_w, cell_h) * 0.3))
  for k, cell in enumerate(rng.choice(grid * grid, size=count, replace=False)):
    row, col = divmod(int(cell), grid)
    slack_x, slack_y = max(0, cell_w / 2 - radius - 1), max(0, cell_h / 2 - radius - 1)
    cx = (col + 0.5) * cell_w + rng.uniform(-slack_x, slack_x)
    cy = (row + 0.5) * cell_h + rng.uniform(-slack_y, slack_y)
    _draw(canvas, shape_of(k), PALETTE[colour_of(k)], int(cx), int(cy), radius)


def make_image_colour(rng, *, size=64):
  canvas, colour = _canvas(rng, size), COLOURS[rng.integers(len(COLOURS))]
  _place(rng, canvas, 1, lambda _: SHAPES[rng.integers(len(SHAPES))], lambda _: colour, grid=1)
  return [canvas], [{"from": "human", "value": "<image>\nWhat colour is the shape?"},
                    {"from": "gpt", "value": f"{_cap(colour)}."}]


def make_shape_count(rng, *, size=64):
  canvas, colour, count = _canvas(rng, size), COLOURS[rng.integers(len(COLOURS))], int(rng.integers(1, MAX_SHAPES + 1))
  _place(rng, canvas, count, lambda _: SHAPES[rng.integers(len(SHAPES))], lambda _: colour)
  return [canvas], [{"from": "human", "value": "<image>\nHow many shapes are in the picture?"},
                    {"from": "gpt", "value": f"{count}."}]


def make_image_caption(rng, *, size=64):
  canvas = _canvas(rng, size)
  colour, shape = COLOURS[rng.integers(len(COLOURS))], SHAPES[rng.integers(len(SHAPES))]
  _place(rng, canvas, 1, lambda _: shape, lambda _: colour, grid=1)
  return [canvas], [{"from": "human", "value": "<image>\nDescribe the picture in a few words."},
                    {"from": "gpt", "value": f"A {colour} {shape}."}]


def make_image_comparison(rng, *, size=64):
  counts = rng.choice(np.arange(1, MAX_SHAPES + 1), size=2, replace=False)
  pictures = []
  for count in counts:
    canvas, colour = _canvas(rng, size), COLOURS[rng.integers(len(COLOURS))]
    _place(rng, canvas, int(count), lambda _: SHAPES[rng.integers(len(SHAPES))], lambda _: colour)
    pictures.append(canvas)
  answer = "The first." if counts[0] > counts[1] else "The second."
  return pictures, [{"from": "human", "value": "<image>\n<image>\nWhich picture has more shapes, the first or the "
                                                "second?"}, {"from": "gpt", "value": answer}]


MAKERS = {"image_colour": make_image_colour, "shape_count": make_shape_count, "image_caption": make_image_caption,
          "image_comparison": make_image_comparison}


def make_image_dataset(out_dir, *, num_images: int = 100, seed: int = 0, size: int = 64,
                       tasks=IMAGE_TASKS) -> SyntheticDataset:
  """`num_images` records spread over `tasks` (the remainder to the first ones), written as described above."""
  unknown = sorted(set(tasks) - set(IMAGE_TASKS))
  if unknown or not tasks:
    raise ValueError(f"image tasks must be a non-empty subset of {IMAGE_TASKS}, got {list(tasks)}")
  if num_images < 1 or size < 16:
    raise ValueError(f"need num_images >= 1 and size >= 16, got {num_images} and {size}")
  out_dir = Path(out_dir)
  params = {"num_images": num_images, "seed": seed, "size": size, "tasks": list(tasks)}
  manifest_path, yaml_path = out_dir / "manifest.json", out_dir / "data.yaml"
  if manifest_path.is_file() and yaml_path.is_file():      # written last: a crashed build has none
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("params") == params:
      return SyntheticDataset(yaml_path=yaml_path, counts=manifest["counts"], reused=True)
    manifest_path.unlink()
  (out_dir / "images").mkdir(parents=True, exist_ok=True)
  (out_dir / "annotations").mkdir(parents=True, exist_ok=True)
  counts = {task: num_images // len(tasks) + (k < num_images % len(tasks)) for k, task in enumerate(tasks)}
  datasets = []
  for task, count in counts.items():
    lines = []
    for index in range(count):
      pictures, conversations = MAKERS[task](sample_rng(seed, task, index), size=size)
      names = [f"{task}_{index:05d}" + (f"_{k}" if len(pictures) > 1 else "") + ".png" for k in range(len(pictures))]
      for name, picture in zip(names, pictures):
        Image.fromarray(picture).save(out_dir / "images" / name)
      lines.append(json.dumps({"id": f"{task}_{index:05d}", "image": names if len(names) > 1 else names[0],
                               "conversations": conversations, "task": task}))
    (out_dir / "annotations" / f"{task}.jsonl").write_text("".join(line + "\n" for line in lines))
    datasets.append({"name": task, "json_path": f"annotations/{task}.jsonl", "data_root": "images",
                     "sampling_strategy": "all", "media_type": "image"})
  yaml_path.write_text(yaml.safe_dump({"datasets": datasets}, sort_keys=False))
  manifest_path.write_text(json.dumps({"params": params, "counts": counts}) + "\n")
  return SyntheticDataset(yaml_path=yaml_path, counts=counts)
