"""Video-MME without subtitles (lmms-lab/Video-MME: videomme/test-*.parquet, videos/<videoID>.mp4);
tasks/videomme/ is the spec. Every question counts; an answer with no A-D letter is wrong."""

from __future__ import annotations

import os

from hico_jax.eval.benchmarks import tables
from hico_jax.eval.benchmarks.base import Benchmark, Question, Score, first_existing
from hico_jax.eval.benchmarks.parsing import videomme_letter

PREAMBLE = ("These are the frames of a video. Select the best answer to the following multiple-choice question "
            "based on the video. Respond with only the letter (A, B, C, or D) of the correct option.")
POST_PROMPT = "\nAnswer with the option's letter from the given choices directly."
DURATIONS = ("short", "medium", "long")


def doc_to_text(row) -> str:
  question = "Question: " + row["question"] + "\nOption:\n" + "\n".join(row["options"])
  return PREAMBLE + "\n" + question + POST_PROMPT


def load(data_root: str, name: str = "videomme", prompt=None):
  """prompt(row, data_root) -> (doc_to_text, extra meta): the variant's (videomme_w_subtitle); default this one's."""
  prompt = prompt or (lambda row, _: (doc_to_text(row), {}))
  path = tables.find_one(data_root, "videomme/test-*.parquet", "*.parquet")
  questions, bad = [], []
  for i, row in enumerate(tables.read_rows(path)):
    try:
      video = os.path.join(data_root, "videos", row["videoID"] + ".mp4")
      text, extra = prompt(row, data_root)
      questions.append(Question(
          benchmark=name, task=row["duration"], qid=str(row["question_id"]),
          video=first_existing(video, video.replace("mp4", "MP4"), video.replace("mp4", "mkv")),
          prompt=text, answer=row["answer"],
          meta={"domain": row.get("domain"), "task_type": row.get("task_type"), **extra}))
    except (KeyError, TypeError, OSError, UnicodeDecodeError) as e:
      bad.append(f"{os.path.basename(path)} row {i}: {type(e).__name__} {e}")
  order = {d: k for k, d in enumerate(DURATIONS)}
  return sorted(questions, key=lambda q: order.get(q.task, len(order))), bad


def score(question: Question, raw: str) -> Score:
  parsed = videomme_letter(raw)
  return Score(parsed=parsed, correct=parsed == question.answer, counted=True)


BENCHMARK = Benchmark(name="videomme", column="VideoMME (w/o sub.)", load=load, score=score, max_new_tokens=16)
