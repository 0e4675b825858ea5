"""MVBench's episodic_reasoning, whose videos are folders of frame images (video/tvqa/frames_fps3_hq/<clip>/):
real PNG and JPEG frames written with OpenCV, read as the reference's read_frames_img reads them, then the whole
tool with the tiny model.

Independent references: `reference_indices` below is a line-by-line transcription of read_frames_img's frame
choice (and of get_frame_indices' dynamic_fps1/middle branch it calls without a span), checked by hand on one
span; each frame image is a solid colour that encodes its number, so which images were read is seen in the
pixels."""

import os

import cv2
import numpy as np
import pytest

from hico_jax.data import normalize
from hico_jax.eval import frame_folders, results as results_io, runner
from tests.test_evaluate import _json, loaded, model_dir  # noqa: F401  (fixtures)


def reference_indices(count, fps, clip, min_num_frames=64, max_num_frames=512, local_num_frames=4):
  if clip is not None:
    start, end = max(0, float(clip[0])), min(count / fps, float(clip[1]))
    vlen = (end - start) * fps
  else:
    vlen = count
  duration = vlen / fps
  if min_num_frames > vlen:
    min_num_frames = (vlen // local_num_frames) * local_num_frames
  num_segments = int(duration // local_num_frames)
  num_frames = local_num_frames if num_segments == 0 else local_num_frames * num_segments
  num_frames = int(max(min_num_frames, min(num_frames, max_num_frames)))
  if clip is not None:
    start_idx = max(1, round(float(clip[0]) * fps))
    end_idx = min(round(float(clip[1]) * fps), count - 1)
    seg_size = float(end_idx - start_idx) / (num_frames - 1)
    return [start_idx + int(np.round(seg_size * i)) for i in range(num_frames)], duration
  # get_frame_indices(num_frames, vlen, 'dynamic_fps1', input_fps=1, ...): the count again from vlen seconds.
  if min_num_frames > vlen:
    min_num_frames = (vlen // local_num_frames) * local_num_frames
  n = local_num_frames * int(vlen // local_num_frames) or local_num_frames
  n = max(min_num_frames, min(n, max_num_frames))
  intervals = np.linspace(0, vlen, min(n, vlen) + 1).astype(int)
  idx = [(intervals[i] + intervals[i + 1] - 1) // 2 for i in range(len(intervals) - 1)]
  return idx + [idx[-1]] * (n - len(idx)), duration


# The spans of the published episodic_reasoning.json's first rows, over folders of TVQA-like lengths (3 fps).
CASES = [(270, 3.0, (0.0, 38.32)), (270, 3.0, (32.77, 61.26)), (275, 3.0, (57.26, 90.18)), (90, 3.0, (0.0, 34.32)),
         (40, 3.0, (2.0, 11.9)), (300, 1.0, None), (2000, 3.0, None), (30, 3.0, None), (1000, 3.0, (0.0, 900.0))]


@pytest.mark.parametrize("count,fps,clip", CASES)
def test_frame_choice_is_read_frames_imgs(count, fps, clip):
  got, duration = frame_folders.frame_indices(count, fps, *(clip or (None, None)), min_frames=64, max_frames=512,
                                              clip_frames=4)
  want, want_duration = reference_indices(count, fps, clip)
  assert got.tolist() == want
  assert duration == pytest.approx(want_duration)


def test_frame_choice_by_hand():
  # 0-38.32 s at 3 fps: 114.96 frames, 38.32 s -> 4 * 9 = 36 frames, floor 64; from frame 1 to round(114.96) =
  # 115 in steps of 114/63.
  got, duration = frame_folders.frame_indices(270, 3.0, 0.0, 38.32, min_frames=64, max_frames=512, clip_frames=4)
  assert len(got) == 64 and got[0] == 1 and got[1] == 3 and got[2] == 5 and got[-1] == 115
  assert duration == pytest.approx(38.32)


def _colour(i):
  return np.array([(i * 37) % 256, (i * 11) % 256, (255 - i * 5) % 256], np.uint8)   # RGB


def write_frames(folder, count, name, ext):
  """count solid frames; name(i) is the file name of frame i (1-based, as TVQA numbers them)."""
  os.makedirs(folder, exist_ok=True)
  for i in range(1, count + 1):
    rgb = np.broadcast_to(_colour(i), (48, 64, 3))
    assert cv2.imwrite(os.path.join(folder, name(i) + ext), np.ascontiguousarray(rgb[..., ::-1]))


def test_frames_are_the_images_at_the_chosen_positions_in_numeric_order(tmp_path):
  # Unpadded numbers: name order (clip_10 before clip_2) is not frame order; the number after "_" decides.
  folder = str(tmp_path / "tvqa/frames_fps3_hq/clip")
  write_frames(folder, 120, lambda i: f"clip_{i}", ".png")
  pixels, duration = frame_folders.read_frames(folder, start=3.0, end=30.0, min_frames=64, max_frames=512,
                                               clip_frames=4, image_size=16)
  want, want_duration = reference_indices(120, 3.0, (3.0, 30.0))
  # position p in the ordered folder is frame number p + 1
  expected = normalize(np.stack([np.broadcast_to(_colour(p + 1), (16, 16, 3)) for p in want]).astype(np.uint8))
  np.testing.assert_allclose(pixels, expected, atol=1e-6)
  assert duration == pytest.approx(want_duration)


def test_jpeg_frames_without_numbers_go_in_name_order_at_one_frame_a_second(tmp_path):
  folder = str(tmp_path / "other/frames")       # no "tvqa" in the path: 1 fps
  write_frames(folder, 10, lambda i: f"{i:05d}", ".jpg")
  pixels, duration = frame_folders.read_frames(folder, start=None, end=None, min_frames=64, max_frames=512,
                                               clip_frames=4, image_size=16)
  # 10 images, floor 64 -> 8 (whole clips of the 10): middle of 8 segments of 10 frames
  assert duration == 10.0 and len(pixels) == 8
  want, _ = reference_indices(10, 1.0, None)
  colours = normalize(np.stack([_colour(p + 1) for p in want])[:, None, None, :]).reshape(8, 3)
  np.testing.assert_allclose(pixels[:, 8, 8, :], colours, atol=0.05)   # JPEG: close, not exact


def test_a_stray_file_and_an_empty_folder_are_one_line_errors(tmp_path):
  folder = tmp_path / "f"
  write_frames(str(folder), 4, lambda i: f"f_{i}", ".jpg")
  (folder / "notes.txt").write_text("x")
  with pytest.raises(ValueError, match="notes.txt"):
    frame_folders.frame_files(str(folder))
  with pytest.raises(ValueError, match="empty frame folder"):
    frame_folders.frame_indices(0, 3.0, None, None, min_frames=64, max_frames=512, clip_frames=4)


EPISODIC_ROWS = [  # the published row's fields (json/episodic_reasoning.json)
    {"video": "castle_s07e04_seg02_clip_14", "question": "Why did Castle dress like a fairy?",
     "candidates": ["To get her to trust him", "He lost a bet"], "answer": "To get her to trust him",
     "subtitle": "(Castle:)you just use that strength.", "show_name": "Castle", "start": 0.0, "end": 38.32,
     "fps": 3},
    {"video": "house_s01e02_seg02_clip_00", "question": "Who walks in?", "candidates": ["Foreman", "Chase", "Cuddy"],
     "answer": "Cuddy", "subtitle": "", "show_name": "House M.D.", "start": 2.0, "end": 11.9, "fps": 3},
    {"video": "stray_file_clip", "question": "?", "candidates": ["a", "b"], "answer": "a", "subtitle": "",
     "show_name": "x", "start": 0.0, "end": 5.0, "fps": 3}]


@pytest.mark.slow   # ~22 s on 2 cores; test_eval_tfds_source runs frame folders through the runner by default
def test_the_tool_answers_episodic_reasoning_from_its_frame_folders(loaded, tmp_path):
  root = tmp_path / "mvbench"
  _json(root / "json/episodic_reasoning.json", EPISODIC_ROWS)
  frames = root / "video/tvqa/frames_fps3_hq"
  write_frames(str(frames / "castle_s07e04_seg02_clip_14"), 130, lambda i: f"castle_s07e04_seg02_clip_14_{i:05d}",
               ".jpg")
  write_frames(str(frames / "house_s01e02_seg02_clip_00"), 40, lambda i: f"house_s01e02_seg02_clip_00_{i:05d}",
               ".png")
  write_frames(str(frames / "stray_file_clip"), 20, lambda i: f"s_{i}", ".jpg")
  (frames / "stray_file_clip" / "Thumbs.db").write_bytes(b"\0")
  model, tokenizer = loaded
  run = runner.Runner(model, tokenizer, str(tmp_path / "out"), runner.Options(batch_size=2, progress=False))
  summary = run.run("mvbench", str(root))
  records = results_io.read_records(str(tmp_path / "out"), "mvbench")
  castle, house, stray = (records[f"episodic_reasoning/{i}"] for i in range(3))
  # 38.32 s -> the 64-frame floor; house: 9.9 s at 3 fps = 29.7 frames -> floor 4 * (29.7 // 4) = 28
  assert (castle["status"], castle["num_frames"]) == ("answered", 64)
  assert (house["status"], house["num_frames"]) == ("answered", 28)
  assert castle["prompt"] == ("Question: Why did Castle dress like a fairy?\nOption:\n(A) To get her to trust him\n"
                              "(B) He lost a bet\n\nOnly give the best option.")
  assert stray["status"] == "no_video" and "Thumbs.db" in stray["error"]
  assert summary["missing_videos"] == [f"episodic_reasoning/2: {stray['error']}"]
  assert summary["tasks"]["episodic_reasoning"]["counted"] == sum(r["raw"] != "" for r in (castle, house))
  assert summary["tasks"]["episodic_reasoning"]["questions"] == 3


def test_lvbench_reads_a_frame_folder_named_by_its_id_at_one_frame_a_second(loaded, tmp_path):
  """The official LVBench task reads <cache_dir>/<id>/ frame folders (video_read_type "img"), no span."""
  root = tmp_path / "lvbench"
  _json(root / "json/lvbench_clean_tv.json", [
      {"video": "00000038", "type": "tv", "question": "What type of video is this?",
       "candidates": ["(A) News report", "(B) TV show"], "answer": "(B) TV show",
       "question_type": ["event understanding"], "time_reference": "00:00-75:57"}])
  write_frames(str(root / "videos/00000038"), 22, lambda i: f"00000038_{i}", ".jpg")
  model, tokenizer = loaded
  run = runner.Runner(model, tokenizer, str(tmp_path / "out"), runner.Options(batch_size=1, progress=False))
  run.run("lvbench", str(root))
  [record] = results_io.read_records(str(tmp_path / "out"), "lvbench").values()
  # 22 images at 1 fps, no span: floor 64 -> 4 * (22 // 4) = 20 frames
  assert record["status"] == "answered"
  assert record["num_frames"] == len(reference_indices(22, 1.0, None)[0]) == 20
