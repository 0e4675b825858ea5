"""MLVU multiple choice (MLVU_MC: json/<n_task>.json and video/<n_task>/...); tasks/mlvu_mc/ is the spec."""

from __future__ import annotations

import os
import string

from hico_jax.eval.benchmarks import choices
from hico_jax.eval.benchmarks.base import Benchmark

# mlvu_mc.yaml's order (official task name -> its dataset_name / sub_task).
TASKS = {"count": "4_count", "ego": "3_ego", "needle": "2_needle", "order": "5_order", "plotqa": "1_plotQA",
         "anomaly_reco": "6_anomaly_reco", "topic_reasoning": "7_topic_reasoning"}
POST_PROMPT = "Answer with the option's letter from the given choices directly."


def doc_to_text(row) -> str:
  options = "".join(f"({letter}) {option}\n" for letter, option in zip(string.ascii_uppercase, row["candidates"]))
  return "Question:" + row["question"] + "\nOption:\n" + options + POST_PROMPT   # no space: the official text


def load(data_root: str):
  def video_path(task, row):
    return os.path.join(data_root, "video", TASKS[task], row["video"])
  return choices.load_subtasks("mlvu", data_root, {t: f"json/{sub}.json" for t, sub in TASKS.items()},
                               doc_to_text, video_path)


BENCHMARK = Benchmark(name="mlvu", column="MLVU", load=load, score=choices.score, max_new_tokens=16)
