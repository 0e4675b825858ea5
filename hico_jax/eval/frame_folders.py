"""Videos shipped as folders of frame images (MVBench's episodic_reasoning: TVQA's frames_fps3_hq/<clip>/), read
as the reference's read_frames_img (llava-train_videochat/llava/video_utils.py) reads them for chat()'s
video_read_type "img":

* the folder's .jpg/.jpeg/.png files, ordered by the number after their last "_" (no such number: -1, ties in
  name order where the reference keeps the directory's arbitrary order); any other file is an error there and a
  one-line error here;
* 3 frames a second when "tvqa" is in the path, else 1;
* with a start/end span: about one frame a second of the span in whole clips (floor 64, cap 512), spread
  evenly from frame round(start * fps) (at least 1) to round(end * fps) (at most the last); without one:
  dynamic_fps1 over the images as if one a second (the reference calls get_frame_indices without its fps);
* the time message's duration: the span's seconds, clamped to the folder's length.
"""

from __future__ import annotations

import os
import re
from typing import Callable

import cv2
import numpy as np

from hico_jax.data import normalize
from hico_jax.data import video as video_io

_NUMBERED = re.compile(r"_(\d+)\.(jpg|jpeg|png)$")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def frame_files(folder: str) -> list[str]:
  names = os.listdir(folder)
  for name in names:
    if not name.endswith(IMAGE_EXTENSIONS):
      raise ValueError(f"frame folder {folder} holds {name!r}, not a .jpg/.jpeg/.png frame: remove it")

  def number(name):
    match = _NUMBERED.search(name)
    return int(match.group(1)) if match else -1
  return sorted(names, key=lambda name: (number(name), name))


def frames_per_second(folder: str) -> float:
  return 3.0 if "tvqa" in folder.lower() else 1.0


def frame_indices(count: int, fps: float, start: float | None, end: float | None, *, min_frames: int,
                  max_frames: int, clip_frames: int) -> tuple[np.ndarray, float]:
  """(indices into the ordered images, duration in seconds) for a folder of `count` images."""
  if count < 1:
    raise ValueError("empty frame folder")
  if start is None:
    return video_io.frame_indices(count, 1.0, mode="dynamic_fps1", min_frames=min_frames, max_frames=max_frames,
                                  clip_frames=clip_frames), count / fps
  span = (min(count / fps, float(end)) - max(0.0, float(start))) * fps     # in frames, a float as there
  if span <= 0:
    raise ValueError(f"span {start}-{end} s holds none of the folder's {count} frames at {fps:g} fps")
  duration = span / fps
  if min_frames > span:
    min_frames = (span // clip_frames) * clip_frames
  num = clip_frames * int(duration // clip_frames) or clip_frames
  num = int(max(min_frames, min(num, max_frames)))
  first = max(1, round(float(start) * fps))
  last = min(round(float(end) * fps), count - 1)
  step = float(last - first) / (num - 1)
  indices = np.array([first + int(np.round(step * i)) for i in range(num)], np.int64)
  if indices.min() < 0 or indices.max() >= count:
    raise ValueError(f"span {start}-{end} s lies outside the folder's {count} frames at {fps:g} fps")
  return indices, duration


def read_frames(folder: str, *, start: float | None, end: float | None, min_frames: int, max_frames: int,
                clip_frames: int, image_size: int) -> tuple[np.ndarray, float]:
  """((T, S, S, 3) float32 frames ready for the model, duration in seconds)."""
  names = frame_files(folder)
  paths = [os.path.join(folder, name) for name in names]
  return read_images(lambda i: np.fromfile(paths[i], np.uint8), len(names), frames_per_second(folder),
                     describe=paths.__getitem__, start=start, end=end, min_frames=min_frames,
                     max_frames=max_frames, clip_frames=clip_frames, image_size=image_size)


def read_images(load: Callable[[int], np.ndarray], count: int, fps: float, *, describe: Callable[[int], str],
                start: float | None, end: float | None, min_frames: int, max_frames: int, clip_frames: int,
                image_size: int) -> tuple[np.ndarray, float]:
  """read_frames over `count` encoded images in their order: load(i) gives image i's file bytes (uint8), so a
  folder on disk and one stored in a prepared dataset (hico_jax.eval.tfds_benchmarks) read alike."""
  indices, duration = frame_indices(count, fps, start, end, min_frames=min_frames, max_frames=max_frames,
                                    clip_frames=clip_frames)
  resized = {}
  for index in sorted(set(indices.tolist())):
    image = cv2.imdecode(load(index), cv2.IMREAD_COLOR)
    if image is None:
      raise ValueError(f"unreadable frame image {describe(index)}")
    rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    resized[index] = video_io.resize_frames(rgb[None], image_size)[0]
  return normalize(np.stack([resized[i] for i in indices.tolist()])), float(duration)
