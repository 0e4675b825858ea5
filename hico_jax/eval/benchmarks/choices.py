"""The shared shape of MVBench, MLVU and LVBench: per-subtask JSON lists of {video, question, candidates, answer}
scored by `mcq_acc` against the letter of the candidate equal to `answer`, over the non-empty answers."""

from __future__ import annotations

import os
import string

from hico_jax.eval.benchmarks import tables
from hico_jax.eval.benchmarks.base import Question, Score
from hico_jax.eval.benchmarks.parsing import mcq_letter


def gt_letter(candidates, answer) -> str | None:
  for letter, candidate in zip(string.ascii_uppercase, candidates):
    if candidate == answer:
      return letter
  return None


def score(question: Question, raw: str) -> Score:
  # process_results keeps the raw prediction; the aggregate counts it when it is not "" (an empty generation).
  parsed = mcq_letter(raw)
  gt = question.answer
  correct = gt is not None and parsed == mcq_letter(gt)
  return Score(parsed=parsed, correct=bool(correct), counted=raw != "")


def load_subtasks(benchmark: str, data_root: str, subtasks: dict, make_prompt, video_path):
  """subtasks: official task name -> annotation file relative to data_root. video_path(task, row) -> path."""
  questions, bad, missing = [], [], []
  for task, rel in subtasks.items():
    path = os.path.join(data_root, rel)
    if not os.path.exists(path):
      missing.append(rel)     # a partial download: named in the summary; its task is left out of the overall
      continue
    for i, row in enumerate(tables.read_rows(path)):
      try:
        questions.append(Question(
            benchmark=benchmark, task=task, qid=f"{task}/{i}", video=video_path(task, row),
            prompt=make_prompt(row), answer=gt_letter(row["candidates"], row["answer"]),
            start=row.get("start"), end=row.get("end")))
      except (KeyError, TypeError) as e:
        bad.append(f"{rel} row {i}: {type(e).__name__} {e}")
  if len(missing) == len(subtasks):
    raise FileNotFoundError(f"{benchmark}: none of its annotation files under {data_root} (e.g. {missing[0]}): "
                            "point --data_root at the benchmark's downloaded folder")
  return questions, [f"{rel}: missing annotation file" for rel in missing] + bad
