"""MVBench (OpenGVLab/MVBench on HF: json/<task>.json and video/<source>/...); tasks/mvbench/ is the spec."""

from __future__ import annotations

import os
import string

from hico_jax.eval.benchmarks import choices
from hico_jax.eval.benchmarks.base import Benchmark, first_existing

# mvbench.yaml's order; the video folder per task: the official DATA_LIST's (without its "your_data_dir/"), then
# the folder name the HF download unpacks to where the two differ.
TASKS = {
    "action_sequence": ("star/Charades_v1_480",),
    "moving_count": ("clevrer/video_validation",),
    "action_prediction": ("star/Charades_v1_480",),
    "episodic_reasoning": ("tvqa/frames_fps3_hq",),
    "action_antonym": ("ssv2-video", "ssv2_video"),
    "action_count": ("perception/videos",),
    "scene_transition": ("scene-qa/video", "scene_qa/video"),
    "object_shuffle": ("perception/videos",),
    "object_existence": ("clevrer/video_validation",),
    "fine_grained_pose": ("nturgbd",),
    "unexpected_action": ("funqa-test/test", "FunQA_test/test"),
    "moving_direction": ("clevrer/video_validation",),
    "state_change": ("perception/videos",),
    "object_interaction": ("star/Charades_v1_480",),
    "character_order": ("perception/videos",),
    "action_localization": ("sta/sta_video",),
    "counterfactual_inference": ("clevrer/video_validation",),
    "fine_grained_action": ("Moments_in_Time_Raw/videos",),
    "moving_attribute": ("clevrer/video_validation",),
    "egocentric_navigation": ("vlnqa",),
}
POST_PROMPT = "\nOnly give the best option."


def doc_to_text(row) -> str:
  options = "".join(f"({letter}) {option}\n" for letter, option in zip(string.ascii_uppercase, row["candidates"]))
  return "Question: " + row["question"] + "\nOption:\n" + options + POST_PROMPT


def load(data_root: str):
  def video_path(task, row):
    return first_existing(*(os.path.join(data_root, "video", folder, row["video"]) for folder in TASKS[task]))
  return choices.load_subtasks("mvbench", data_root, {t: f"json/{t}.json" for t in TASKS}, doc_to_text, video_path)


BENCHMARK = Benchmark(name="mvbench", column="MVBench", load=load, score=choices.score, max_new_tokens=16)
