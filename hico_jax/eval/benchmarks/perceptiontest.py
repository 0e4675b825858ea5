"""Perception Test validation, multiple choice (lmms-lab/PerceptionTest_Val: mc_question_val/validation-*.parquet,
videos/<video_name>.mp4); tasks/perceptiontest/val/ is the spec. Every question counts."""

from __future__ import annotations

import os

from hico_jax.eval.benchmarks import tables
from hico_jax.eval.benchmarks.base import Benchmark, Question, Score, first_existing
from hico_jax.eval.benchmarks.parsing import perceptiontest_letter

OPTION_LABELS = ("(A). ", "(B). ")   # every option past the second is labelled "(C). " in the official text


def doc_to_text(row) -> str:
  # pre_prompt and post_prompt are "" in the yaml; with options the post prompt becomes the fixed line below.
  question = row["question"]
  for index, option in enumerate(row["options"]):
    question += "\n" + (OPTION_LABELS[index] if index < 2 else "(C). ") + option
  return f"\nQuestion: {question}\nOnly give the best option."


def load(data_root: str):
  path = tables.find_one(data_root, "mc_question_val/validation-*.parquet", "*.parquet")
  questions, bad = [], []
  for i, row in enumerate(tables.read_rows(path)):
    try:
      name = row["video_name"] + ".mp4"
      questions.append(Question(
          benchmark="perceptiontest", task="mc", qid=str(row["question_id"]),
          video=first_existing(os.path.join(data_root, "videos", name), os.path.join(data_root, name)),
          prompt=doc_to_text(row), answer=int(row["answer_id"]), meta={"area": row.get("area")}))
    except (KeyError, TypeError, ValueError) as e:
      bad.append(f"{os.path.basename(path)} row {i}: {type(e).__name__} {e}")
  return questions, bad


def score(question: Question, raw: str) -> Score:
  parsed = perceptiontest_letter(raw)
  index = {"A": 0, "B": 1, "C": 2, "D": 3}.get(parsed, -1)
  return Score(parsed=parsed, correct=index == question.answer, counted=True)


# No generation_kwargs in the yaml: the model's default, 1024 new tokens. The official aggregate is a fraction;
# the summary gives it in percent like the others.
BENCHMARK = Benchmark(name="perceptiontest", column="PerceptionTest", load=load, score=score, max_new_tokens=1024)
