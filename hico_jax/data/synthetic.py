"""Synthetic LongVid-style videos whose answers are in the pixels, for the tests and the embedded default run.

The five LongVid task types (paper §3.3), each a tiny rendered world with a fixed, small vocabulary:

  captioning          a coloured shape crosses the frame, edge to edge
                      "Describe the video in one sentence." -> "A red circle moves from left to right."
  temporal_grounding  two shapes of different colours, each visible for its own stretch of time
                      "When does the blue square appear?" -> "From 3.0 to 5.0 seconds."
  event_relation      two full-screen flashes of different colours, one after the other
                      "What happens first, the red flash or the blue flash?" -> "The blue flash."
  scene_relation      the background changes colour once
                      "What colour is the background after the scene change?" -> "Green."
  event_counting      N white full-screen flashes, N uniform in 1..5
                      "How many times does the screen flash?" -> "3."

About a quarter of the records (multi_turn) ask a second question about the same video.

Time is cut into `slots` equal parts (16 by default) and every event starts and ends on a slot boundary, so the
number of frames T is a multiple of `slots`. Any sampler that takes the middle frame of each of n equal segments
with n a multiple of `slots` (the reference's `middle` sampling) sees every event and every gap between events;
so does any sampler whose frames are at most T/slots apart, starting in the first slot and ending in the last.
Grounding answers are frame-exact: an event shown on frames [f0, f1) is "From {f0/fps:.1f} to {f1/fps:.1f}
seconds."

`make_dataset` writes

  out_dir/videos/<task>_<index>.mp4         mp4v (OpenCV), size×size, integer fps
  out_dir/annotations/<task>.jsonl          LLaVA records {"id", "video", "conversations", "task"};
                                            "video" is relative to videos/
  out_dir/annotations/corrupt.jsonl         only with corrupt > 0: bad records for the pipeline's bad-input tests
  out_dir/data.yaml                         datasets: [{name, json_path, data_root: videos, sampling_strategy: all,
                                            media_type: video}], one entry per annotation file
  out_dir/manifest.json                     the parameters; a later call with the same ones does nothing

Paths inside data.yaml are relative to data.yaml's directory (as hico_jax.data.annotations resolves them), so a
dataset can be moved or copied as one folder. Every video has its own generator, `sample_rng(seed, task, index)`,
so the output does not depend on how many videos or which tasks are asked for.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import yaml

_GENERATOR = "hico_jax.data.synthetic"
GENERATOR_VERSION = 1  # bump when the rendering or the text changes: a manifest with another version rebuilds

PALETTE = {  # RGB; far apart so that a colour survives mp4v's 4:2:0 compression at 64×64
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 80, 230),
    "yellow": (230, 210, 40),
    "purple": (150, 50, 200),
}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left to right", "right to left", "top to bottom", "bottom to top")
WHITE = (245, 245, 245)
TASKS = ("captioning", "temporal_grounding", "event_relation", "scene_relation", "event_counting")
CORRUPT_KINDS = ("truncated_video", "missing_video", "malformed_json", "empty_conversation")


# ---------------------------------------------------------------------------------------------------------------
# Rendering helpers
# ---------------------------------------------------------------------------------------------------------------

def _timing(rng: np.random.Generator, fps_range, duration_range, slots: int) -> tuple[int, int]:
  """An integer fps and a frame count T, a multiple of `slots`, for a duration drawn from `duration_range`."""
  fps = int(rng.integers(fps_range[0], fps_range[1] + 1))
  duration = float(rng.uniform(duration_range[0], duration_range[1]))
  num_frames = slots * max(1, round(duration * fps / slots))
  return fps, num_frames


def _dark_background(rng: np.random.Generator) -> tuple[int, int, int]:
  return tuple(int(v) for v in rng.integers(10, 50, size=3))


def _draw(frame: np.ndarray, shape: str, colour, cx: int, cy: int, r: int) -> None:
  """Draws a filled shape of half-size r centred at (cx, cy), in place; no anti-aliasing (pure colours)."""
  colour = tuple(int(c) for c in colour)
  if shape == "circle":
    cv2.circle(frame, (int(cx), int(cy)), int(r), colour, thickness=-1, lineType=cv2.LINE_8)
  elif shape == "square":
    cv2.rectangle(frame, (int(cx - r), int(cy - r)), (int(cx + r), int(cy + r)), colour, thickness=-1)
  elif shape == "triangle":  # pointing up: fills half its bounding box, a circle ~0.79, a square 1.0
    pts = np.array([[cx, cy - r], [cx + r, cy + r], [cx - r, cy + r]], np.int32)
    cv2.fillPoly(frame, [pts], colour, lineType=cv2.LINE_8)
  else:
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _place_runs(rng: np.random.Generator, lengths, slots: int, min_gap: int = 1) -> list[int]:
  """Start slots for consecutive runs of the given lengths, in order, at least `min_gap` slots apart."""
  n = len(lengths)
  slack = slots - sum(lengths) - (n - 1) * min_gap
  if slack < 0:
    raise ValueError(f"{n} events of {list(lengths)} slots do not fit in {slots} slots")
  spare = rng.multinomial(slack, [1.0 / (n + 1)] * (n + 1))  # before, between and after the runs
  starts, pos = [], int(spare[0])
  for i, length in enumerate(lengths):
    starts.append(pos)
    pos += length + min_gap + int(spare[i + 1])
  return starts


def _by_slot(slot_frames: np.ndarray, num_frames: int) -> np.ndarray:
  """(slots, H, W, 3) frames, one per slot, expanded to (num_frames, H, W, 3)."""
  slots = slot_frames.shape[0]
  return slot_frames[np.arange(num_frames) * slots // num_frames]


def _qa(question: str, answer: str, first: bool) -> list[dict]:
  return [{"from": "human", "value": ("<image>\n" if first else "") + question}, {"from": "gpt", "value": answer}]


def _seconds(frame: int, fps: int) -> str:
  return f"{frame / fps:.1f}"


def _cap(word: str) -> str:
  return word[0].upper() + word[1:]


# ---------------------------------------------------------------------------------------------------------------
# The five tasks: each (rng, *, size, fps_range, duration_range, slots, multi_turn) -> (frames, fps, conversations)
# ---------------------------------------------------------------------------------------------------------------

def make_captioning(rng, *, size=64, fps_range=(4, 24), duration_range=(4.0, 40.0), slots=16, multi_turn=0.25):
  """One shape of one colour crosses the frame in a straight line, edge to edge, over the whole video."""
  fps, num_frames = _timing(rng, fps_range, duration_range, slots)
  colour, shape = str(rng.choice(COLOURS)), str(rng.choice(SHAPES))
  direction = str(rng.choice(DIRECTIONS))
  r = size // 8
  lo, hi = r + 1, size - r - 2
  travel = np.rint(np.linspace(lo, hi, num_frames)).astype(int)
  if direction in ("right to left", "bottom to top"):
    travel = travel[::-1]
  across = int(rng.integers(lo, hi + 1))
  frames = np.empty((num_frames, size, size, 3), np.uint8)
  frames[:] = _dark_background(rng)
  horizontal = direction in ("left to right", "right to left")
  for t in range(num_frames):
    cx, cy = (travel[t], across) if horizontal else (across, travel[t])
    _draw(frames[t], shape, PALETTE[colour], cx, cy, r)
  conversations = _qa("Describe the video in one sentence.", f"A {colour} {shape} moves from {direction}.", True)
  if rng.random() < multi_turn:
    if rng.random() < 0.5:
      conversations += _qa(f"What colour is the {shape}?", f"{_cap(colour)}.", False)
    else:
      conversations += _qa(f"What shape is the {colour} object?", f"A {shape}.", False)
  return frames, fps, conversations


def make_temporal_grounding(rng, *, size=64, fps_range=(4, 24), duration_range=(4.0, 40.0), slots=16,
                            multi_turn=0.25):
  """Two shapes of different colours, one in each half of the frame, each visible during its own slot window."""
  fps, num_frames = _timing(rng, fps_range, duration_range, slots)
  colours = [str(c) for c in rng.choice(COLOURS, size=2, replace=False)]
  shapes = [str(s) for s in rng.choice(SHAPES, size=2)]
  r = size // 8
  halves = [(r + 1, size // 2 - r - 1), (size // 2 + r, size - r - 2)]
  if rng.random() < 0.5:
    halves = halves[::-1]
  bg = _dark_background(rng)
  slot_frames = np.empty((slots, size, size, 3), np.uint8)
  slot_frames[:] = bg
  windows = []
  for k in range(2):
    length = int(rng.integers(2, max(3, slots // 4 + 1)))
    start = int(rng.integers(0, slots - length + 1))
    windows.append((start, start + length))
    cx, cy = int(rng.integers(*halves[k])), int(rng.integers(r + 1, size - r - 1))
    for s in range(start, start + length):
      _draw(slot_frames[s], shapes[k], PALETTE[colours[k]], cx, cy, r)
  frames = _by_slot(slot_frames, num_frames)
  per_slot = num_frames // slots

  def ask(k, first):
    f0, f1 = windows[k][0] * per_slot, windows[k][1] * per_slot
    return _qa(f"When does the {colours[k]} {shapes[k]} appear?",
               f"From {_seconds(f0, fps)} to {_seconds(f1, fps)} seconds.", first)

  target = int(rng.integers(2))
  conversations = ask(target, True)
  if rng.random() < multi_turn:
    conversations += ask(1 - target, False)
  return frames, fps, conversations


def make_event_relation(rng, *, size=64, fps_range=(4, 24), duration_range=(4.0, 40.0), slots=16, multi_turn=0.25):
  """Two full-screen flashes of different colours, one after the other, with a gap between them."""
  fps, num_frames = _timing(rng, fps_range, duration_range, slots)
  first, second = (str(c) for c in rng.choice(COLOURS, size=2, replace=False))
  lengths = [int(v) for v in rng.integers(1, 4, size=2)]
  starts = _place_runs(rng, lengths, slots)
  slot_frames = np.empty((slots, size, size, 3), np.uint8)
  slot_frames[:] = _dark_background(rng)
  for colour, start, length in zip((first, second), starts, lengths):
    slot_frames[start:start + length] = PALETTE[colour]
  frames = _by_slot(slot_frames, num_frames)
  named = [first, second] if rng.random() < 0.5 else [second, first]  # the question's order says nothing
  conversations = _qa(f"What happens first, the {named[0]} flash or the {named[1]} flash?",
                      f"The {first} flash.", True)
  if rng.random() < multi_turn:
    conversations += _qa(f"What happens last, the {named[0]} flash or the {named[1]} flash?",
                         f"The {second} flash.", False)
  return frames, fps, conversations


def make_scene_relation(rng, *, size=64, fps_range=(4, 24), duration_range=(4.0, 40.0), slots=16, multi_turn=0.25):
  """The background has one colour, then another from a slot boundary on; a grey object sits in each scene."""
  fps, num_frames = _timing(rng, fps_range, duration_range, slots)
  before, after = (str(c) for c in rng.choice(COLOURS, size=2, replace=False))
  change = int(rng.integers(2, slots - 1))
  r = size // 8
  slot_frames = np.empty((slots, size, size, 3), np.uint8)
  for colour, span in ((before, slice(0, change)), (after, slice(change, slots))):
    scene = np.empty((size, size, 3), np.uint8)
    scene[:] = PALETTE[colour]
    grey = int(rng.integers(90, 170))
    _draw(scene, str(rng.choice(SHAPES)), (grey, grey, grey), int(rng.integers(r + 1, size - r - 1)),
          int(rng.integers(r + 1, size - r - 1)), r)
    slot_frames[span] = scene
  frames = _by_slot(slot_frames, num_frames)
  turns = [("after", after), ("before", before)]
  if rng.random() < 0.5:
    turns = turns[::-1]
  conversations = []
  for i, (when, colour) in enumerate(turns[:2 if rng.random() < multi_turn else 1]):
    conversations += _qa(f"What colour is the background {when} the scene change?", f"{_cap(colour)}.", i == 0)
  return frames, fps, conversations


def make_event_counting(rng, *, size=64, fps_range=(4, 24), duration_range=(4.0, 40.0), slots=16, multi_turn=0.25):
  """N white full-screen flashes (N uniform in 1..5), each one or two slots long, separated by dark slots."""
  fps, num_frames = _timing(rng, fps_range, duration_range, slots)
  n = int(rng.integers(1, 6))
  lengths = [int(v) for v in rng.integers(1, 3, size=n)]
  if sum(lengths) + n - 1 > slots:
    lengths = [1] * n
  starts = _place_runs(rng, lengths, slots)
  slot_frames = np.empty((slots, size, size, 3), np.uint8)
  slot_frames[:] = _dark_background(rng)
  for start, length in zip(starts, lengths):
    slot_frames[start:start + length] = WHITE
  frames = _by_slot(slot_frames, num_frames)
  conversations = _qa("How many times does the screen flash?", f"{n}.", True)
  if rng.random() < multi_turn:
    conversations += _qa("Does the screen flash more than twice?", "Yes." if n > 2 else "No.", False)
  return frames, fps, conversations


# Each returns (frames uint8 (T, H, W, 3) RGB, fps: int, conversations: list[dict]).
GENERATORS: dict[str, Callable[..., tuple]] = {
    "captioning": make_captioning,
    "temporal_grounding": make_temporal_grounding,
    "event_relation": make_event_relation,
    "scene_relation": make_scene_relation,
    "event_counting": make_event_counting,
}


def sample_rng(seed: int, task: str, index: int) -> np.random.Generator:
  """The generator that make_dataset gives video `index` of `task`: the same whatever else is built."""
  return np.random.default_rng([seed, TASKS.index(task), index])


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------

def write_video(path, frames: np.ndarray, fps: float) -> Path:
  """Writes RGB uint8 frames (T, H, W, 3) as an mp4v video; the file appears complete or not at all."""
  path = Path(path)
  frames = np.asarray(frames)
  if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or frames.shape[0] == 0:
    raise ValueError(f"video {path}: frames must be uint8 (T, H, W, 3) with T >= 1, "
                     f"got {frames.dtype} {frames.shape}")
  num_frames, height, width, _ = frames.shape
  if height % 2 or width % 2:  # mp4v silently crops odd sizes by a pixel
    raise ValueError(f"video {path}: mp4v needs an even height and width, got {height}x{width}")
  if not fps > 0:
    raise ValueError(f"video {path}: fps must be positive, got {fps}")
  # The writer picks the container from the extension, so the temporary name keeps it.
  tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
  writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), float(fps), (width, height))
  try:
    if not writer.isOpened():
      raise OSError(f"cv2.VideoWriter could not open {path} (mp4v, {width}x{height} at {fps} fps)")
    for frame in frames:
      writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))  # OpenCV wants BGR
    writer.release()
    if not tmp.is_file() or tmp.stat().st_size == 0:
      raise OSError(f"cv2.VideoWriter wrote nothing for {path} ({num_frames} frames)")
    os.replace(tmp, path)
  finally:
    writer.release()
    tmp.unlink(missing_ok=True)
  return path


def _write_text(path: Path, text: str) -> None:
  tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
  tmp.write_text(text)
  os.replace(tmp, path)


def _jsonl(records) -> str:
  return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


@dataclasses.dataclass(frozen=True)
class SyntheticDataset:
  """What make_dataset built. Usable as a path (os.fspath gives data.yaml), with the counts and bad records.

  corrupt: one dict per bad record, {"kind", "id", "json_path", "line"} (line is 1-based in json_path);
  kinds cycle through CORRUPT_KINDS.
  """
  yaml_path: Path
  counts: dict
  corrupt: tuple = ()
  reused: bool = False  # True when out_dir already held this dataset and nothing was written

  def __fspath__(self) -> str:
    return str(self.yaml_path)

  def __str__(self) -> str:
    return str(self.yaml_path)

  @property
  def out_dir(self) -> Path:
    return self.yaml_path.parent


def _check_params(num_videos, seed, size, tasks, fps_range, duration_range, slots, corrupt, multi_turn):
  if not isinstance(num_videos, int) or num_videos < 1:
    raise ValueError(f"num_videos must be a positive integer, got {num_videos!r}")
  if not isinstance(seed, int) or seed < 0:
    raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
  if not isinstance(size, int) or size < 32 or size % 2:
    raise ValueError(f"size must be an even integer >= 32 (mp4v needs even sizes), got {size!r}")
  unknown = [t for t in tasks if t not in TASKS]
  if unknown or not tasks or len(set(tasks)) != len(tasks):
    raise ValueError(f"tasks must be distinct names from {TASKS}, got {list(tasks)}")
  if not 1 <= fps_range[0] <= fps_range[1]:
    raise ValueError(f"fps_range must be integers 1 <= lo <= hi, got {fps_range}")
  if not (0 < duration_range[0] <= duration_range[1]):
    raise ValueError(f"duration_range must be seconds 0 < lo <= hi, got {duration_range}")
  if not isinstance(slots, int) or slots < 10:
    raise ValueError(f"slots must be an integer >= 10 (counting up to 5 flashes needs 9), got {slots!r}")
  if not isinstance(corrupt, int) or corrupt < 0:
    raise ValueError(f"corrupt must be a non-negative integer, got {corrupt!r}")
  if not 0 <= multi_turn <= 1:
    raise ValueError(f"multi_turn must be a probability in [0, 1], got {multi_turn!r}")


def _clear_previous(out_dir: Path) -> None:
  """Removes what an earlier make_dataset wrote; refuses a folder that was not made by it."""
  manifest = out_dir / "manifest.json"
  if not out_dir.exists() or not any(out_dir.iterdir()):
    return
  try:
    ours = json.loads(manifest.read_text()).get("generator") == _GENERATOR
  except (OSError, ValueError, AttributeError):
    ours = False
  if not ours:
    raise ValueError(f"{out_dir} is not empty and has no manifest.json from {_GENERATOR}: not a synthetic "
                     f"dataset folder, refusing to write into it")
  for sub in ("videos", "annotations"):
    shutil.rmtree(out_dir / sub, ignore_errors=True)
  (out_dir / "data.yaml").unlink(missing_ok=True)
  manifest.unlink()


def _write_corrupt(videos: Path, count: int, seed: int, size: int, slots: int, fps_range,
                   duration_range) -> tuple[list[dict], list[str]]:
  """Bad records for the pipeline's bad-input tests, cycling through CORRUPT_KINDS."""
  markers, lines = [], []
  json_path = "annotations/corrupt.jsonl"
  for j in range(count):
    kind = CORRUPT_KINDS[j % len(CORRUPT_KINDS)]
    rid = f"corrupt_{kind}_{j:05d}"
    frames, fps, conversations = make_event_counting(
        np.random.default_rng([seed, len(TASKS), j]), size=size, fps_range=fps_range,
        duration_range=duration_range, slots=slots, multi_turn=0.0)
    record = {"id": rid, "video": f"{rid}.mp4", "conversations": conversations, "task": "corrupt"}
    if kind == "truncated_video":
      path = write_video(videos / record["video"], frames, fps)
      data = path.read_bytes()
      path.write_bytes(data[: len(data) // 3])  # mp4 keeps its index (moov) at the end: unreadable
    elif kind == "empty_conversation":
      write_video(videos / record["video"], frames, fps)
      record["conversations"] = []
    if kind == "malformed_json":
      lines.append(json.dumps(record)[:-25] + "\n")  # cut mid-record
    else:
      lines.append(json.dumps(record) + "\n")
    markers.append({"kind": kind, "id": rid, "json_path": json_path, "line": j + 1})
  return markers, lines


def make_dataset(out_dir, *, num_videos: int = 100, seed: int = 0, size: int = 64, tasks=TASKS,
                 fps_range=(4, 24), duration_range=(4.0, 40.0), slots: int = 16, corrupt: int = 0,
                 multi_turn: float = 0.25) -> SyntheticDataset:
  """Builds (or finds already built) a synthetic dataset in out_dir; returns it, usable as data.yaml's path.

  num_videos is the total, split evenly over `tasks` (the first tasks take the remainder). fps is an integer
  drawn from fps_range; the duration is drawn from duration_range, then rounded so that the frame count is a
  multiple of `slots`. About multi_turn of the records ask a second question about the same video. corrupt=k
  adds k bad records in annotations/corrupt.jsonl (see SyntheticDataset.corrupt). Deterministic given the
  arguments; a folder already holding the same parameters is returned as it is.
  """
  out_dir = Path(out_dir)
  tasks = tuple(tasks)
  if len(fps_range) != 2 or any(int(v) != v for v in fps_range):
    raise ValueError(f"fps_range must be two integers (lo, hi), got {fps_range!r}")
  if len(duration_range) != 2:
    raise ValueError(f"duration_range must be two numbers of seconds (lo, hi), got {duration_range!r}")
  fps_range, duration_range = tuple(int(v) for v in fps_range), tuple(float(v) for v in duration_range)
  _check_params(num_videos, seed, size, tasks, fps_range, duration_range, slots, corrupt, multi_turn)
  params = {"version": GENERATOR_VERSION, "num_videos": num_videos, "seed": seed, "size": size,
            "tasks": list(tasks), "fps_range": list(fps_range), "duration_range": list(duration_range),
            "slots": slots, "corrupt": corrupt, "multi_turn": multi_turn}
  manifest_path, yaml_path = out_dir / "manifest.json", out_dir / "data.yaml"
  if manifest_path.is_file() and yaml_path.is_file():
    try:
      manifest = json.loads(manifest_path.read_text())
    except ValueError:
      manifest = {}
    if manifest.get("status") == "complete" and manifest.get("params") == params:
      return SyntheticDataset(yaml_path, manifest["counts"], tuple(manifest["corrupt"]), reused=True)

  _clear_previous(out_dir)
  videos, annotations = out_dir / "videos", out_dir / "annotations"
  videos.mkdir(parents=True, exist_ok=True)
  annotations.mkdir(parents=True, exist_ok=True)
  # Written first, as "building": a crashed build is recognised as ours and cleared by the next call.
  building = {"generator": _GENERATOR, "params": params, "status": "building"}
  _write_text(manifest_path, json.dumps(building, indent=1) + "\n")
  started = time.perf_counter()

  counts, entries = {}, []
  for t, task in enumerate(tasks):
    count = num_videos // len(tasks) + (t < num_videos % len(tasks))
    records = []
    for i in range(count):
      frames, fps, conversations = GENERATORS[task](
          sample_rng(seed, task, i), size=size, fps_range=fps_range, duration_range=duration_range, slots=slots,
          multi_turn=multi_turn)
      name = f"{task}_{i:05d}"
      write_video(videos / f"{name}.mp4", frames, fps)
      records.append({"id": name, "video": f"{name}.mp4", "conversations": conversations, "task": task})
    _write_text(annotations / f"{task}.jsonl", _jsonl(records))
    counts[task] = count
    entries.append({"name": task, "json_path": f"annotations/{task}.jsonl", "data_root": "videos",
                    "sampling_strategy": "all", "media_type": "video"})

  markers = []
  if corrupt:
    markers, lines = _write_corrupt(videos, corrupt, seed, size, slots, fps_range, duration_range)
    _write_text(annotations / "corrupt.jsonl", "".join(lines))
    entries.append({"name": "corrupt", "json_path": "annotations/corrupt.jsonl", "data_root": "videos",
                    "sampling_strategy": "all", "media_type": "video"})

  _write_text(yaml_path, yaml.safe_dump({"datasets": entries}, sort_keys=False))
  manifest = {"generator": _GENERATOR, "params": params, "status": "complete", "counts": counts,
              "corrupt": markers,
              "build_seconds": round(time.perf_counter() - started, 3)}
  _write_text(manifest_path, json.dumps(manifest, indent=1) + "\n")
  return SyntheticDataset(yaml_path, counts, tuple(markers))
