"""Evaluation data as TFDS builders over ArrayRecord, as training's: MVBench in its published layout (JSON per
task, videos per source folder, a frame folder, a missing video, a broken row) read back question by question
against the benchmark's own loader and the files on disk, and a NIAH haystack whose frames come back as the
direct reader samples them."""

import json
import os

import cv2
import numpy as np
import pytest

from hico_jax.eval import benchmarks, tfds_benchmarks
from tests.test_eval_frame_folders import write_frames
from tests.test_evaluate import _json, _write_mp4


@pytest.fixture
def mvbench(tmp_path):
  root = tmp_path / "MVBench"
  _json(root / "json/action_count.json", [
      {"video": "v1.mp4", "question": "How many launches?", "candidates": ["3", "2", "4"], "answer": "2"},
      {"video": "gone.mp4", "question": "Where?", "candidates": ["Here", "There"], "answer": "Here"},
      {"video": "v1.mp4", "question": "No candidates in this row."},
      {"video": "v1.mp4", "question": "Again the first video?", "candidates": ["Yes", "No"], "answer": "Yes"}])
  _json(root / "json/moving_count.json", [
      {"video": "c1.mp4", "question": "How many cubes move?", "candidates": ["0", "1"], "answer": "1",
       "start": 0.5, "end": 1.75}])
  _json(root / "json/episodic_reasoning.json", [
      {"video": "s01e01_seg1", "question": "Who speaks?", "candidates": ["A", "B"], "answer": "B"}])
  _write_mp4(root / "video/perception/videos/v1.mp4", 1)
  _write_mp4(root / "video/clevrer/video_validation/c1.mp4", 2)
  write_frames(str(root / "video/tvqa/frames_fps3_hq/s01e01_seg1"), 10, lambda i: f"s01e01_seg1_{i}", ".png")
  return root


def test_a_prepared_benchmark_gives_the_loaders_questions_and_the_video_files(mvbench, tmp_path):
  logged = []
  path = tfds_benchmarks.build("mvbench", str(mvbench), str(tmp_path / "tfds"), log=logged.append, quiet=True)
  assert path.endswith(os.path.join("eval_benchmark", "mvbench", "2.0.0"))
  source = tfds_benchmarks.BenchmarkSource(path)
  questions, bad_rows = benchmarks.get("mvbench").load(str(mvbench))
  # Every question the loader asks, in its order, the video's path relative to the download.
  assert len(questions) == len(source) == 5
  for got, want in zip(source.questions, questions):
    assert got == type(want)(**{**want.__dict__, "video": os.path.relpath(want.video, mvbench)})
  by_qid = {q.qid: i for i, q in enumerate(source.questions)}
  assert (source.questions[by_qid["moving_count/0"]].start, source.questions[by_qid["action_count/3"]].answer) == (
      0.5, "A")
  files = {"action_count/0": "video/perception/videos/v1.mp4", "action_count/3": "video/perception/videos/v1.mp4",
           "moving_count/0": "video/clevrer/video_validation/c1.mp4"}
  for qid, file in files.items():
    stored = source.video(by_qid[qid])
    assert (stored.kind, stored.data) == ("file", [(mvbench / file).read_bytes()])
  frames = source.video(by_qid["episodic_reasoning/0"])        # the folder's images in frame-number order
  folder = mvbench / "video/tvqa/frames_fps3_hq/s01e01_seg1"
  assert (frames.kind, frames.frame_rate) == ("frames", 3.0)
  assert frames.data == [(folder / f"s01e01_seg1_{i}.png").read_bytes() for i in range(1, 11)]
  assert source.video_error[by_qid["action_count/1"]] == "missing video video/perception/videos/gone.mp4"
  with pytest.raises(ValueError, match="action_count/1 has no video: missing video"):
    source.video(by_qid["action_count/1"])
  assert source.bad_rows == bad_rows and len(bad_rows) == 17 + 1  # 17 of the 20 task files not in this download
  assert "action_count.json row 2" in bad_rows[-1]
  assert logged == [f"skipped {line}" for line in bad_rows] + ["skipped action_count/1: missing video "
                                                               "video/perception/videos/gone.mp4"]
  info = json.loads(open(os.path.join(path, "dataset_info.json")).read())
  counts = {s["name"]: sum(int(n) for n in s["shardLengths"]) for s in info["splits"]}
  assert counts == {"test": 5, "videos": 3}        # v1.mp4, shared by two questions, is stored once


def test_unknown_benchmarks_unbuilt_paths_and_videos_too_large_for_a_record_are_named(mvbench, tmp_path,
                                                                                        monkeypatch):
  with pytest.raises(ValueError, match="unknown benchmark 'mvbench2'"):
    tfds_benchmarks.build("mvbench2", str(mvbench), str(tmp_path / "tfds"))
  size = (mvbench / "video/clevrer/video_validation/c1.mp4").stat().st_size
  monkeypatch.setattr(tfds_benchmarks, "MAX_VIDEO_BYTES", size - 1)     # the 2 GiB protobuf limit, scaled down
  with pytest.raises(ValueError, match=r"c1.mp4 is 0.0 GiB; a TFDS record holds under 2 GiB: evaluate mvbench "
                                       r"from its download \(--data_root\)"):
    tfds_benchmarks.build("mvbench", str(mvbench), str(tmp_path / "tfds"), log=lambda _: None, quiet=True)
  assert not (tmp_path / "tfds" / "eval_benchmark" / "mvbench" / "2.0.0").exists()
  with pytest.raises(FileNotFoundError, match="no prepared benchmark"):
    tfds_benchmarks.BenchmarkSource(str(tmp_path))


@pytest.fixture
def niah_download(tmp_path):
  root = tmp_path / "niah"
  root.mkdir()
  rng = np.random.default_rng(0)
  writer = cv2.VideoWriter(str(root / "haystack.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 3.0, (48, 32))
  assert writer.isOpened()
  for _ in range(29):                     # at 3 fps: frames 0, 3, ..., 27, ten of them
    writer.write(cv2.resize(rng.integers(0, 256, (4, 6, 3), dtype=np.uint8), (48, 32)))
  writer.release()
  (root / "images").mkdir()
  for i in range(3):
    cv2.imwrite(str(root / "images" / f"n{i}.png"), rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
  cv2.imwrite(str(root / "images" / "n3.jpg"), rng.integers(0, 256, (24, 24, 3), dtype=np.uint8))
  _json(root / "single.json", [{"question": "What is in the needle?", "answer": "(A) a cat", "image": "n0.png"},
                               {"question": "Ünïcode?", "answer": "(B) no", "image": "n3.jpg", "extra": [1, 2.5]}])
  _json(root / "multi.json", [{"images": ["n1.png", "n2.png", "n0.png"], "question1": "First?", "answer1": "(A)",
                               "question2": "Then?", "answer2": "(C)"}])
  return root


def test_a_prepared_niah_haystack_gives_the_frames_and_needles_the_files_give(niah_download, tmp_path):
  from hico_jax.eval import niah, tfds_niah
  path = tfds_niah.build(str(niah_download), str(tmp_path / "tfds"), haystack="haystack.mp4",
                         single_hop="single.json", multi_hop="multi.json", image_root="images", quiet=True)
  want = np.concatenate(list(niah.haystack_chunks(str(niah_download / "haystack.mp4"))))
  assert want.shape == (10, 32, 48, 3)
  chunks = list(tfds_niah.haystack_chunks(path, chunk_frames=4))
  assert [len(c) for c in chunks] == [4, 4, 2]
  np.testing.assert_array_equal(np.concatenate(chunks), want)          # lossless, frame for frame

  def image(name):
    return cv2.cvtColor(cv2.imread(str(niah_download / "images" / name), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)

  items, images = tfds_niah.needles(path, "single_hop")
  assert items == json.loads((niah_download / "single.json").read_text())
  for got, name in zip(images, ("n0.png", "n3.jpg")):
    np.testing.assert_array_equal(got, image(name))
  items, images = tfds_niah.needles(path, "multi_hop")
  assert items == json.loads((niah_download / "multi.json").read_text()) and len(images[0]) == 3
  for got, name in zip(images[0], ("n1.png", "n2.png", "n0.png")):
    np.testing.assert_array_equal(got, image(name))


def test_niah_needle_records_without_their_fields_or_images_are_named(niah_download, tmp_path):
  from hico_jax.eval import tfds_niah
  _json(niah_download / "bad.json", [{"question": "Where?", "image": "n0.png"}])
  with pytest.raises(ValueError, match=r"bad.json record 0 has no \['answer'\]"):
    tfds_niah.build(str(niah_download), str(tmp_path / "a"), haystack="haystack.mp4", single_hop="bad.json",
                    image_root="images", quiet=True)
  _json(niah_download / "gone.json", [{"question": "Where?", "answer": "(A)", "image": "gone.png"}])
  with pytest.raises(FileNotFoundError, match="needle image .*gone.png is missing"):
    tfds_niah.build(str(niah_download), str(tmp_path / "b"), haystack="haystack.mp4", single_hop="gone.json",
                    image_root="images", quiet=True)
  path = tfds_niah.build(str(niah_download), str(tmp_path / "c"), haystack="haystack.mp4", quiet=True)
  with pytest.raises(ValueError, match="has no 'single_hop' split"):
    tfds_niah.needles(path, "single_hop")
