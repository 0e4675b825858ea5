"""Where an evaluation reads a benchmark from: its download as published (--data_root), or the same download
prepared as a TFDS dataset over ArrayRecord (--tfds_dir, hico_jax.eval.tfds_benchmarks), the kind of source
training reads. Both give the benchmark loader's questions in its order and decode each question's frames the
same way (dynamic_fps1 over the question's span; a frame folder as read_frames_img reads it), so a run scores
the same from either; only a record's `video` differs (the download's path, or the path relative to it).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np

from hico_jax.data import video as video_io
from hico_jax.eval import benchmarks, frame_folders
from hico_jax.eval.benchmarks.base import MIN_FRAMES

CLIP_FRAMES = 4
# Where tfds_benchmarks.build puts a benchmark under its data_dir: <data_dir>/<BUILDER_NAME>/<name>/<VERSION>.
BUILDER_NAME, VERSION = "eval_benchmark", "2.0.0"


@dataclasses.dataclass
class Decoded:
  question: benchmarks.Question
  pixels: np.ndarray | None       # (T, S, S, 3) float32
  duration: float = 0.0
  error: str = ""


def _decode_video(question, source, max_frames, image_size) -> Decoded:
  """`source`: the video file's path or bytes."""
  try:
    frames, info = video_io.decode_frames(source, mode="dynamic_fps1", min_frames=MIN_FRAMES,
                                          max_frames=max_frames, clip_frames=CLIP_FRAMES, start=question.start,
                                          end=question.end)
  except (video_io.VideoDecodeError, OSError, ValueError) as e:
    return Decoded(question, None, error=f"unreadable video: {e}")
  return Decoded(question, video_io.preprocess(frames, image_size), duration=float(info["duration"]))


class DownloadSource:
  """The benchmark's files as published, under `root`."""

  def __init__(self, name: str, root: str):
    self.name, self.root = name, root

  def load(self) -> tuple[list, list]:
    return benchmarks.get(self.name).load(self.root)

  def decode(self, question, max_frames: int, image_size: int) -> Decoded:
    if os.path.isdir(question.video):     # MVBench's episodic_reasoning (TVQA) ships folders of frame images
      try:
        pixels, duration = frame_folders.read_frames(question.video, start=question.start, end=question.end,
                                                     min_frames=MIN_FRAMES, max_frames=max_frames,
                                                     clip_frames=CLIP_FRAMES, image_size=image_size)
      except (OSError, ValueError) as e:
        return Decoded(question, None, error=f"unreadable frame folder: {e}")
      return Decoded(question, pixels, duration=duration)
    if not os.path.isfile(question.video):
      return Decoded(question, None, error=f"missing video {question.video}")
    return _decode_video(question, question.video, max_frames, image_size)


class PreparedSource:
  """The benchmark prepared under a TFDS data_dir (tools/prepare_tfds.py benchmark NAME ...). A damaged record
  is recorded as an unreadable video, as a corrupt file is."""

  def __init__(self, name: str, data_dir: str):
    self.name, self.data_dir = name, data_dir
    self.path = os.path.join(data_dir, BUILDER_NAME, name, VERSION)
    self._source = None

  def _opened(self):
    # Imported here: an evaluation from downloads needs neither TFDS nor array_record (the GPU hosts the
    # benchmarks run on have no array_record).
    from hico_jax.eval import tfds_benchmarks
    if self._source is None:
      if not os.path.isfile(os.path.join(self.path, "dataset_info.json")):
        raise FileNotFoundError(f"no prepared {self.name} at {self.path}: prepare it with "
                                f"`{tfds_benchmarks.prepare_command(self.name, self.data_dir)}`")
      self._source = tfds_benchmarks.BenchmarkSource(self.path)
      self._index = {q.qid: i for i, q in enumerate(self._source.questions)}
    return self._source

  def load(self) -> tuple[list, list]:
    source = self._opened()
    return list(source.questions), list(source.bad_rows)

  def decode(self, question, max_frames: int, image_size: int) -> Decoded:
    source = self._opened()
    i = self._index[question.qid]
    if source.video_error[i]:
      return Decoded(question, None, error=source.video_error[i])
    try:
      stored = source.video(i)
    except (OSError, ValueError) as e:       # a damaged record: counted as the question's video, never a crash
      return Decoded(question, None, error=f"unreadable stored video: {e}")
    if stored.kind == "frames":           # tfds_benchmarks.KIND_FRAMES
      try:
        pixels, duration = frame_folders.read_images(
            lambda k: np.frombuffer(stored.data[k], np.uint8), len(stored.data), stored.frame_rate,
            describe=lambda k: f"{k} of {question.video} in {self.path}", start=question.start, end=question.end,
            min_frames=MIN_FRAMES, max_frames=max_frames, clip_frames=CLIP_FRAMES, image_size=image_size)
      except (OSError, ValueError) as e:
        return Decoded(question, None, error=f"unreadable frame folder: {e}")
      return Decoded(question, pixels, duration=duration)
    return _decode_video(question, stored.data[0], max_frames, image_size)


Source = DownloadSource | PreparedSource


def as_source(name: str, source: str | Source) -> Source:
  """A plain path is the benchmark's download."""
  return DownloadSource(name, source) if isinstance(source, (str, os.PathLike)) else source


def _by_name(values: Sequence[str], names: Sequence[str], flag: str) -> tuple[dict[str, str], str | None]:
  named, default = {}, None
  for value in values:
    name, sep, path = value.partition("=")
    if sep and name in names:
      named[name] = path
    elif sep and name in benchmarks.names():
      continue            # a benchmark not asked for this run
    elif default is not None and default != value:
      raise ValueError(f"two {flag} folders, {default} and {value}: give one, or NAME=DIR per benchmark")
    else:
      default = value
  return named, default


def resolve(names: Sequence[str], data_roots: Sequence[str] = (), tfds_dirs: Sequence[str] = ()) -> dict[str, Source]:
  """Each benchmark's source from --data_root and --tfds_dir values (DIR, or NAME=DIR): a benchmark named in
  one flag reads from there; otherwise from the one flag that gives a folder for all. A benchmark reads one
  source: named in both, or left to two folders, is an error."""
  roots, root = _by_name(data_roots, names, "--data_root")
  prepared, prepared_default = _by_name(tfds_dirs, names, "--tfds_dir")
  sources = {}
  for name in names:
    if name in roots and name in prepared:
      raise ValueError(f"{name} is named by both --data_root and --tfds_dir: give one")
    if name in roots:
      sources[name] = DownloadSource(name, roots[name])
    elif name in prepared:
      sources[name] = PreparedSource(name, prepared[name])
    elif root is not None and prepared_default is not None:
      raise ValueError(f"{name} could read --data_root {root} or --tfds_dir {prepared_default}: name it in one "
                       f"({name}=DIR)")
    elif root is not None:
      sources[name] = DownloadSource(name, os.path.join(root, benchmarks.get(name).folder or name))
    elif prepared_default is not None:
      sources[name] = PreparedSource(name, prepared_default)
    else:
      raise ValueError(f"no --data_root or --tfds_dir for {name}: give {name}=DIR or one folder holding "
                       f"{benchmarks.get(name).folder or name}/ (--data_root) or the prepared datasets (--tfds_dir)")
  return sources
