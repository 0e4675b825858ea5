"""Synthetic LongVid data: real mp4 files, well-formed LLaVA annotations, and answers that the pixels determine.

The oracles below read only decoded pixels (OpenCV, independently of the generator's drawing code) and name
colours by hue, so agreement with the annotations shows that every answer is learnable from the video — also
from the few frames that the reference's `middle` sampling keeps.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from hico_jax.data import synthetic

REPO = Path(__file__).resolve().parents[1]
HUE_CENTRES = {"red": 0, "yellow": 55, "green": 125, "blue": 225, "purple": 280}  # degrees


# ---------------------------------------------------------------------------------------------------------------
# Pixel oracles
# ---------------------------------------------------------------------------------------------------------------

def decode(path):
  """All frames as RGB uint8 (T, H, W, 3), the container's fps and its frame count."""
  cap = cv2.VideoCapture(str(path))
  assert cap.isOpened(), f"OpenCV cannot open {path}"
  fps, count = cap.get(cv2.CAP_PROP_FPS), int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
  frames = []
  while True:
    ok, frame = cap.read()
    if not ok:
      break
    frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
  cap.release()
  return np.stack(frames), fps, count


def colour_name(rgb) -> str:
  hue = float(cv2.cvtColor(np.uint8([[rgb]]), cv2.COLOR_RGB2HSV_FULL)[0, 0, 0]) * 360 / 256
  return min(HUE_CENTRES, key=lambda n: min(abs(hue - HUE_CENTRES[n]), 360 - abs(hue - HUE_CENTRES[n])))


def pixel_colour_names(frames):
  """Per pixel: the nearest hue name where the pixel is saturated and bright, else None (as an object array)."""
  hsv = cv2.cvtColor(frames.reshape(-1, frames.shape[-2], 3), cv2.COLOR_RGB2HSV_FULL).reshape(frames.shape)
  hue = hsv[..., 0].astype(np.float32) * 360 / 256
  dist = np.stack([np.minimum(abs(hue - c), 360 - abs(hue - c)) for c in HUE_CENTRES.values()])
  names = np.array(list(HUE_CENTRES), dtype=object)[dist.argmin(0)]
  return np.where((hsv[..., 1] > 100) & (hsv[..., 2] > 100), names, None)


def foreground(frame):
  """Pixels far from the frame's median colour (the background)."""
  bg = np.median(frame.reshape(-1, 3), axis=0)
  return np.abs(frame.astype(np.float32) - bg).sum(-1) > 90


def runs(flags):
  """(start, end) of each run of True in a 1-D boolean array."""
  edges = np.diff(np.concatenate([[0], flags.astype(np.int8), [0]]))
  return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


def answer(task, question, frames, fps, bounds):
  """What the pixels say. frames[i] stands for source frames [bounds[i], bounds[i+1]) of a video at `fps`."""
  if task == "captioning":
    masks = np.stack([foreground(f) for f in frames])
    ys, xs = np.nonzero(masks[0])
    ye, xe = np.nonzero(masks[-1])
    dx, dy = xe.mean() - xs.mean(), ye.mean() - ys.mean()
    if abs(dx) > abs(dy):
      direction = "left to right" if dx > 0 else "right to left"
    else:
      direction = "top to bottom" if dy > 0 else "bottom to top"
    colour = colour_name(np.median(frames[masks], axis=0).astype(np.uint8))
    fills = []
    for m in masks:
      y, x = np.nonzero(m)
      fills.append(m.sum() / ((y.max() - y.min() + 1) * (x.max() - x.min() + 1)))
    fill = np.median(fills)  # bounding-box fill: triangle 1/2, circle π/4, square 1
    shape = "triangle" if fill < 0.65 else "circle" if fill < 0.9 else "square"
    if question.startswith("Describe"):
      return f"A {colour} {shape} moves from {direction}."
    if question.startswith("What colour"):
      return f"{colour.capitalize()}."
    return f"A {shape}."

  if task == "temporal_grounding":
    colour = re.search(r"When does the (\w+) \w+ appear\?", question).group(1)
    visible = (pixel_colour_names(frames) == colour).sum(axis=(1, 2)) > 30
    (i0, i1), = runs(visible)  # exactly one stretch
    return f"From {bounds[i0] / fps:.1f} to {bounds[i1] / fps:.1f} seconds."

  if task == "event_relation":
    means = frames.reshape(len(frames), -1, 3).mean(1)
    flashes = [colour_name(means[a:b].mean(0).astype(np.uint8)) for a, b in runs(means.max(-1) > 100)]
    assert len(flashes) == 2 and flashes[0] != flashes[1], flashes
    return f"The {flashes[0] if 'first' in question else flashes[1]} flash."

  if task == "scene_relation":
    frame = frames[-1] if "after" in question else frames[0]
    return f"{colour_name(np.median(frame.reshape(-1, 3), axis=0).astype(np.uint8)).capitalize()}."

  if task == "event_counting":
    count = len(runs(frames.mean(axis=(1, 2, 3)) > 128))
    if question.startswith("How many"):
      return f"{count}."
    return "Yes." if count > 2 else "No."
  raise AssertionError(task)


def middle_sampling(num_frames, n):
  """The reference's `middle` sampling: the middle frame of each of a = min(n, T) equal segments (the reference
  then repeats the last frame up to n, which adds nothing here), and the exact segment bounds for reading times
  (the reference's float linspace can put a bound one frame early, which moves no middle frame out of its slot)."""
  a = min(n, num_frames)
  s = np.linspace(0, num_frames, a + 1).astype(int)
  return (s[:-1] + s[1:] - 1) // 2, np.arange(a + 1) * num_frames // a


def records(path):
  return [json.loads(line) for line in Path(path).read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  # Default fps and duration ranges, enough videos for every task to show multi-turn records.
  return synthetic.make_dataset(tmp_path_factory.mktemp("synth"), num_videos=100, seed=0, corrupt=4)


def task_records(dataset):
  for task in synthetic.TASKS:
    for r in records(dataset.out_dir / "annotations" / f"{task}.jsonl"):
      yield task, r


# ---------------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------------

def test_videos_decode_to_the_rendered_frames_frame_count_and_fps(dataset):
  params = json.loads((dataset.out_dir / "manifest.json").read_text())["params"]
  for task, r in task_records(dataset):
    index = int(r["id"].rsplit("_", 1)[1])
    rendered, fps, conversations = synthetic.GENERATORS[task](
        synthetic.sample_rng(0, task, index), size=params["size"], fps_range=params["fps_range"],
        duration_range=params["duration_range"], slots=params["slots"], multi_turn=params["multi_turn"])
    decoded, decoded_fps, count = decode(dataset.out_dir / "videos" / r["video"])
    assert decoded.shape == rendered.shape and count == len(rendered), (r["id"], decoded.shape, rendered.shape)
    assert decoded_fps == fps and 4 <= fps <= 24
    assert len(rendered) % params["slots"] == 0
    # mp4v is lossy; a mean error of a few levels means the frames are the rendered ones, in order.
    assert np.abs(decoded.astype(np.int16) - rendered).mean() < 4, r["id"]
    assert conversations == r["conversations"]


@pytest.mark.parametrize("sampled", [None, 16, 32], ids=["all_frames", "middle16", "middle32"])
def test_every_answer_is_recoverable_from_the_decoded_pixels(dataset, sampled):
  turns = {task: 0 for task in synthetic.TASKS}
  for task, r in task_records(dataset):
    frames, fps, _ = decode(dataset.out_dir / "videos" / r["video"])
    if sampled:
      picks, bounds = middle_sampling(len(frames), sampled)
      frames = frames[picks]
    else:
      bounds = np.arange(len(frames) + 1)
    conv = r["conversations"]
    for q, a in zip(conv[::2], conv[1::2]):
      assert answer(task, q["value"].removeprefix("<image>\n"), frames, fps, bounds) == a["value"], (r["id"], q)
      turns[task] += 1
  assert all(n >= 20 for n in turns.values()), turns


def test_answers_cover_the_vocabulary(dataset):
  answers = {task: set() for task in synthetic.TASKS}
  for task, r in task_records(dataset):
    answers[task].add(r["conversations"][1]["value"])
  assert {"1.", "2.", "3.", "4.", "5."} == answers["event_counting"]
  assert {f"{c.capitalize()}." for c in synthetic.COLOURS} == answers["scene_relation"]
  assert len(answers["captioning"]) >= 10 and len(answers["temporal_grounding"]) >= 10


def test_yaml_and_jsonl_are_well_formed_llava(dataset):
  spec = yaml.safe_load(Path(dataset).read_text())
  names = [d["name"] for d in spec["datasets"]]
  assert names == list(synthetic.TASKS) + ["corrupt"]
  assert dataset.counts == {task: 20 for task in synthetic.TASKS}
  ids, multi_turn = set(), 0
  for d in spec["datasets"][:-1]:
    assert d["sampling_strategy"] == "all" and d["media_type"] == "video"
    root = dataset.out_dir / d["data_root"]  # relative paths resolve against the YAML's folder
    for r in records(dataset.out_dir / d["json_path"]):
      assert set(r) == {"id", "video", "conversations", "task"} and r["task"] == d["name"]
      assert r["id"] not in ids and (root / r["video"]).is_file()
      ids.add(r["id"])
      conv = r["conversations"]
      assert len(conv) in (2, 4) and [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
      assert conv[0]["value"].startswith("<image>\n") and conv[0]["value"].count("<image>") == 1
      assert all("<image>" not in t["value"] for t in conv[1:])
      assert all(t["value"].strip() == t["value"] and t["value"] for t in conv)
      multi_turn += len(conv) == 4
  assert 10 <= multi_turn <= 45, multi_turn  # about a quarter of 100


def test_grounding_times_are_frame_exact_at_the_video_fps(dataset):
  for r in records(dataset.out_dir / "annotations" / "temporal_grounding.jsonl"):
    frames, fps, _ = decode(dataset.out_dir / "videos" / r["video"])
    for a in r["conversations"][1::2]:
      t0, t1 = map(float, re.fullmatch(r"From (\d+\.\d) to (\d+\.\d) seconds\.", a["value"]).groups())
      assert 0 <= t0 < t1 <= len(frames) / fps + 0.05
      per_slot_s = len(frames) / 16 / fps  # events start and end on slot boundaries
      assert abs(t0 / per_slot_s - round(t0 / per_slot_s)) * per_slot_s <= 0.05 + 1e-9


def test_same_seed_gives_the_same_bytes_and_another_seed_does_not(tmp_path):
  kwargs = dict(num_videos=10, fps_range=(4, 8), duration_range=(4, 10), corrupt=4)
  a = synthetic.make_dataset(tmp_path / "a", seed=3, **kwargs)
  b = synthetic.make_dataset(tmp_path / "b", seed=3, **kwargs)
  c = synthetic.make_dataset(tmp_path / "c", seed=4, **kwargs)
  files = sorted(p.relative_to(a.out_dir) for p in a.out_dir.rglob("*")
                 if p.is_file() and p.name != "manifest.json")
  assert len(files) == 1 + 6 + 10 + 2  # yaml, 6 annotation files, 10 videos, 2 corrupt-record videos
  for f in files:
    assert (a.out_dir / f).read_bytes() == (b.out_dir / f).read_bytes(), f
  assert (a.out_dir / "annotations" / "event_counting.jsonl").read_bytes() != \
      (c.out_dir / "annotations" / "event_counting.jsonl").read_bytes()
  # The same video whatever else is built: task subsets and counts do not shift the generators.
  d = synthetic.make_dataset(tmp_path / "d", seed=3, num_videos=4, tasks=["event_counting"],
                             fps_range=(4, 8), duration_range=(4, 10))
  assert records(d.out_dir / "annotations/event_counting.jsonl")[:2] == \
      records(a.out_dir / "annotations/event_counting.jsonl")
  assert (d.out_dir / "videos/event_counting_00001.mp4").read_bytes() == \
      (a.out_dir / "videos/event_counting_00001.mp4").read_bytes()


def test_a_second_call_with_the_same_parameters_writes_nothing(tmp_path):
  kwargs = dict(num_videos=5, fps_range=(4, 6), duration_range=(4, 6))
  first = synthetic.make_dataset(tmp_path, **kwargs)
  stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
  again = synthetic.make_dataset(tmp_path, **kwargs)
  assert again.reused and not first.reused and again.counts == first.counts
  assert stamps == {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
  other = synthetic.make_dataset(tmp_path, seed=1, **kwargs)
  assert not other.reused
  fewer = synthetic.make_dataset(tmp_path, num_videos=3, fps_range=(4, 6), duration_range=(4, 6))
  assert len(list((tmp_path / "videos").glob("*.mp4"))) == 3 and sum(fewer.counts.values()) == 3


def test_corrupt_records_are_there_and_bad(dataset):
  assert [m["kind"] for m in dataset.corrupt] == list(synthetic.CORRUPT_KINDS)
  lines = (dataset.out_dir / "annotations" / "corrupt.jsonl").read_text().splitlines()
  assert len(lines) == 4
  for m in dataset.corrupt:
    line = lines[m["line"] - 1]
    if m["kind"] == "malformed_json":
      with pytest.raises(json.JSONDecodeError):
        json.loads(line)
      continue
    r = json.loads(line)
    assert r["id"] == m["id"]
    video = dataset.out_dir / "videos" / r["video"]
    if m["kind"] == "missing_video":
      assert not video.exists()
    elif m["kind"] == "truncated_video":
      cap = cv2.VideoCapture(str(video))
      assert video.stat().st_size > 0 and not (cap.isOpened() and cap.read()[0])
    elif m["kind"] == "empty_conversation":
      assert r["conversations"] == [] and decode(video)[0].shape[0] > 0


def test_bad_arguments_name_the_problem(tmp_path):
  with pytest.raises(ValueError, match="even integer >= 32.*got 63"):
    synthetic.make_dataset(tmp_path / "x", size=63)
  with pytest.raises(ValueError, match="tasks must be distinct names"):
    synthetic.make_dataset(tmp_path / "x", tasks=["dancing"])
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "notes.txt").write_text("keep me")
  with pytest.raises(ValueError, match="refusing to write into it"):
    synthetic.make_dataset(tmp_path / "mine")
  assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
  with pytest.raises(ValueError, match=r"odd\.mp4.*even height and width"):
    synthetic.write_video(tmp_path / "odd.mp4", np.zeros((2, 63, 64, 3), np.uint8), 8)
  with pytest.raises(OSError, match="no_such_dir/v.mp4"):
    synthetic.write_video(tmp_path / "no_such_dir" / "v.mp4", np.zeros((2, 64, 64, 3), np.uint8), 8)
  assert not (tmp_path / "no_such_dir").exists()


def test_cli_builds_reports_counts_and_rejects_bad_arguments(tmp_path):
  tool = [sys.executable, str(REPO / "tools" / "make_synthetic_data.py")]
  # hico_jax importable as `pip install -e .` makes it (README); the script edits no sys.path of its own.
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  assert subprocess.run(tool + ["--help"], capture_output=True, env=env).returncode == 0
  ok = subprocess.run(tool + ["--out", str(tmp_path / "d"), "--num_videos", "5", "--duration", "4,6"],
                      capture_output=True, text=True, env=env)
  assert ok.returncode == 0, ok.stderr
  assert re.search(r"event_counting\s+1 videos", ok.stdout) and "videos/s" in ok.stdout
  bad = subprocess.run(tool + ["--out", str(tmp_path / "e"), "--size", "63"], capture_output=True, text=True,
                       env=env)
  assert bad.returncode != 0 and bad.stderr.strip().splitlines()[-1].endswith("got 63")
