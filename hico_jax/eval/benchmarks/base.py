"""What every benchmark module provides: its questions read from the published files, the official prompt,
and the official task's parsing and scoring (lmms-eval_videochat/lmms_eval/tasks/<name>/ is the spec)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

# VideoChat_Flash in the official lmms-eval is launched with max_num_frames=512 (scripts/eval_*.sh); LVBench, the
# longest videos, with 640. The reference's load_video floors the count at 64 frames (hico_jax.infer.chat).
DEFAULT_MAX_FRAMES = 512
MIN_FRAMES = 64


@dataclasses.dataclass(frozen=True)
class Question:
  benchmark: str
  task: str               # the official subtask (MVBench's action_count, Video-MME's "short", ...)
  qid: str                # unique within the benchmark: the key a resumed run skips by
  video: str              # path of the video file as the official doc_to_visual forms it under data_root
  prompt: str             # the official doc_to_text: chat()'s question, after the time message
  answer: Any             # what the official process_results compares against
  start: float | None = None
  end: float | None = None
  meta: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Score:
  parsed: str             # the letter (or text) the official parser made of the raw answer
  correct: bool
  counted: bool           # in the official denominator


@dataclasses.dataclass(frozen=True)
class Benchmark:
  name: str
  column: str                                     # its column in the paper's Table 2
  load: Callable[[str], tuple[list[Question], list[str]]]   # data_root -> (questions, unreadable rows named)
  score: Callable[[Question, str], Score]
  max_new_tokens: int = 16
  max_frames: int = DEFAULT_MAX_FRAMES
  # The download it reads under one --data_root folder, when it shares another benchmark's (default: its name).
  folder: str | None = None
  # A split without answers (LongVideoBench's test): (questions, result records) -> {file name: JSON content},
  # the files the official task writes for the leaderboard instead of a score.
  submission: Callable[[list[Question], dict[str, dict]], dict[str, Any]] | None = None


def first_existing(*paths: str) -> str:
  """The first path that exists, else the first: a missing video is then named by its official path."""
  for path in paths:
    if os.path.exists(path):
      return path
  return paths[0]
