"""LVBench (json/lvbench_clean_<type>.json; videos by id); tasks/lvbench/ is the spec, run at 640 frames."""

from __future__ import annotations

import os
import string

from hico_jax.eval.benchmarks import choices
from hico_jax.eval.benchmarks.base import Benchmark, first_existing

TASKS = ("cartoon", "documentary", "live", "selfmedia", "sport", "tv")   # lvbench.yaml's order
POST_PROMPT = "Answer with the option's letter from the given choices directly."


def doc_to_text(row) -> str:
  # The candidates already start "(A) ...", so the official prompt reads "A. (A) ...".
  options = "".join(f"{letter}. {option}\n" for letter, option in zip(string.ascii_uppercase, row["candidates"]))
  return row["question"] + "\n" + options + POST_PROMPT


def load(data_root: str):
  def video_path(task, row):
    # The official cache_dir holds extracted frame folders named by the id (read at 1 fps, as
    # hico_jax.eval.frame_folders does); users download <id>.mp4 files. Either is read, a video file first.
    vid = row["video"]
    subs = ("videos", "video", "")
    return first_existing(*(os.path.join(data_root, sub, vid + ext) for sub in subs for ext in (".mp4", ".mkv")),
                          *(os.path.join(data_root, sub, vid) for sub in subs))
  return choices.load_subtasks("lvbench", data_root, {t: f"json/lvbench_clean_{t}.json" for t in TASKS},
                               doc_to_text, video_path)


BENCHMARK = Benchmark(name="lvbench", column="LVBench", load=load, score=choices.score, max_new_tokens=16,
                      max_frames=640)
