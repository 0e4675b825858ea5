"""Video-MME with subtitles (lmms-lab/Video-MME: videomme/test-*.parquet, videos/<videoID>.mp4 and
subtitle/<videoID>.srt from subtitle.zip); tasks/videomme/videomme_w_subtitle.yaml is the spec: same videos,
frame cap (512), token limit, parser and scoring as `videomme`, another prompt.

The official task runs with gemini_api_flag "full subtitle": every subtitle of the video goes into the prompt,
whatever frames are sampled (its frame-matched branch sits after a `raise NotImplementedError` and never runs).
A subtitle is the first `<font color="white" size=".72c">...</font>` span of an .srt line; lines without one
(cue numbers, timings, untagged text) are left out. A video without a subtitle file is asked without subtitles,
as the official code does (it prints and goes on), and is named in the summary's notes; an .srt with no tagged
line keeps the subtitle header but the frames-only preamble, as there. No subtitle/ folder at all is an error."""

from __future__ import annotations

import os
import re

from hico_jax.eval.benchmarks import videomme
from hico_jax.eval.benchmarks.base import Benchmark

SUBTITLE_SPAN = re.compile(r'<font color="white" size=".72c">(.*?)</font>')
HEADER = "This video's subtitles are listed below: \n"
PREAMBLE = ("These are the frames and subtitles of a video. Select the best answer to the following "
            "multiple-choice question based on the video and the subtitles. Respond with only the letter (A, B, C, "
            "or D) of the correct option.")
POST_PROMPT = "\nThe best answer is:"


def subtitle_text(lines: list[str]) -> str:
  spans = (SUBTITLE_SPAN.findall(line) for line in lines)
  return "\n".join(found[0] for found in spans if found)


def doc_to_text(row, subtitle_lines: list[str] | None) -> str:
  """subtitle_lines: the .srt's lines as readlines() gives them, None when the video has no subtitle file."""
  header = "" if subtitle_lines is None else HEADER
  text = "" if subtitle_lines is None else subtitle_text(subtitle_lines)
  preamble = PREAMBLE if text else videomme.PREAMBLE
  question = "Question: " + row["question"] + "\nOption:\n" + "\n".join(row["options"])
  return header + text + "\n" + preamble + "\n" + question + POST_PROMPT


def subtitle_path(data_root: str, row) -> str:
  return os.path.join(data_root, "subtitle", row["videoID"] + ".srt")


def _prompt(row, data_root):
  path = subtitle_path(data_root, row)
  if not os.path.exists(path):
    return doc_to_text(row, None), {"note": f"no subtitle file {path}: asked without subtitles"}
  with open(path, encoding="utf-8") as f:
    return doc_to_text(row, f.readlines()), {}


def load(data_root: str):
  # Single videos without subtitles are expected (the official task asks them without); a whole missing folder
  # is a download not unpacked, which would quietly score the task without subtitles.
  if not os.path.isdir(os.path.join(data_root, "subtitle")):
    raise FileNotFoundError(f"videomme_w_subtitle: no subtitle/ folder under {data_root}: unzip Video-MME's "
                            "subtitle.zip there (it holds subtitle/<videoID>.srt)")
  return videomme.load(data_root, name="videomme_w_subtitle", prompt=_prompt)


BENCHMARK = Benchmark(name="videomme_w_subtitle", column="VideoMME (w/ sub.)", load=load, score=videomme.score,
                      max_new_tokens=16, folder="videomme")
