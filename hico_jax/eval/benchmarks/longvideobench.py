"""LongVideoBench validation with interleaved subtitles (longvideobench/LongVideoBench: validation-*.parquet or
lvb_val.json, videos/<video_path>, subtitles/<subtitle_path with _en.json>); tasks/longvideobench/
(longvideobench_val_v) is the spec.

The prompt lists the subtitles that fall near the 512 frame times the official code assumes (duration/512
apart), whatever frames the model is given. Parsing is MMMU's: bracketed letter, bare letter, "X.", then the
option text; with none of those the official code picks a random letter, here one seeded by the question id
(named in the summary). Every question counts; overall = correct / all (the official mean over duration groups
and question categories, weighted by size, comes to the same)."""

from __future__ import annotations

import json
import os
import random

from hico_jax.eval.benchmarks import tables
from hico_jax.eval.benchmarks.base import Benchmark, Question, Score

POST_PROMPT = "Answer with the option's letter from the given choices directly.\n"
SUBTITLE_FRAMES = 512      # longvideobench_val_i.yaml sets no max_num_frames: the code's default
PUNCTUATION = [",", ".", "!", "?", ";", ":", "'"]


def _seconds(timestamp: str) -> float:
  h, m, s = timestamp.split(":")
  return int(h) * 3600 + int(m) * 60 + float(s)


def frame_timestamps(duration: float, num_frames: int = SUBTITLE_FRAMES) -> list[float]:
  if duration > num_frames:
    return [duration / num_frames * i for i in range(num_frames)]
  return [i for i in range(int(duration))]


def interleaved_subtitles(times, subtitles, start_offset: float, duration: float) -> str:
  """The subtitle lines kept by insert_subtitles_into_frames (add_image=False): those whose span (widened to
  1 s around its middle when shorter) holds a frame time strictly inside it."""
  kept = []
  for sub in subtitles:
    if "timestamp" in sub:
      start, end = sub["timestamp"]
      if not isinstance(end, float):     # the official test: an int or null end means "until the end"
        end = duration
      line = sub["text"]
    else:
      start, end = _seconds(sub["start"]), _seconds(sub["end"])
      line = sub["line"]
    start, end = start - start_offset, end - start_offset
    middle = (start + end) / 2
    if end - start < 1:
      start, end = middle - 0.5, middle + 0.5
    if any(start < t < end for t in times):
      kept.append(line)
  return "\n".join(kept)


def options(row) -> list[str]:
  if "option0" not in row and "candidates" in row:     # lvb_val.json lists them; the parquet has option0..4
    return list(row["candidates"])
  out = []
  for i in range(5):
    candidate = row.get(f"option{i}")
    if candidate != "N/A":
      out.append(candidate)
  return out


def doc_to_text(row, subtitles) -> str:
  question = row["question"] + "\n" + "\n".join(f"({chr(ord('A') + i)}). {c}" for i, c in enumerate(options(row)))
  prefix = interleaved_subtitles(frame_timestamps(row["duration"]), subtitles,
                                 row["starting_timestamp_for_subtitles"], row["duration"])
  return (f" This video's subtitles are listed below: \n{prefix}.\n Select the best answer to the following "
          "multiple-choice question based on the video and the subtitles. Respond with only the letter of the "
          f"correct option.\nQuestion: {question}\n{POST_PROMPT}")


def parse_choice(response: str, index2ans: dict[str, str], seed: str) -> tuple[str, bool]:
  """(letter, whether it was parsed rather than drawn at random): MMMU's parse_multi_choice_response."""
  all_choices = list(index2ans)
  for char in PUNCTUATION:
    response = response.strip(char)
  response = " " + response + " "
  index_ans, with_bracket, candidates = True, False, []
  for choice in all_choices:
    if f"({choice})" in response:
      candidates.append(choice)
      with_bracket = True
  if not candidates:
    candidates = [c for c in all_choices if f"{c} " in response]
  if not candidates:
    candidates = [c for c in all_choices if f"{c}." in response]
  if not candidates and len(response.split()) > 5:
    candidates = [i for i, ans in index2ans.items() if ans.lower() in response.lower()]
    index_ans = not candidates
  if not candidates:
    return random.Random(seed).choice(all_choices), False
  if len(candidates) == 1:
    return candidates[0], True
  if index_ans:
    where = [response.rfind(f"({c})") if with_bracket else response.rfind(f" {c} ") for c in candidates]
  else:
    where = [response.lower().rfind(index2ans[c].lower()) for c in candidates]
  return candidates[where.index(max(where))], True    # the last mentioned; ties: the first, as np.argmax


def load(data_root: str):
  # The parquet is what the official task reads (its option0..4 columns); lvb_val.json holds the same questions.
  path = tables.find_one(data_root, "validation-*.parquet", "lvb_val.json")
  questions, bad = [], []
  for i, row in enumerate(tables.read_rows(path)):
    try:
      sub = row["subtitle_path"]
      sub = sub if "_en.json" in sub else sub.replace(".json", "_en.json")
      with open(os.path.join(data_root, "subtitles", sub), encoding="utf-8") as f:
        subtitles = json.load(f)
      questions.append(Question(
          benchmark="longvideobench", task=str(row["duration_group"]), qid=str(row.get("id", row["video_id"])),
          video=os.path.join(data_root, "videos", row["video_path"]), prompt=doc_to_text(row, subtitles),
          answer=chr(ord("A") + int(row["correct_choice"])),
          meta={"options": options(row), "question_category": row.get("question_category")}))
    except (KeyError, TypeError, ValueError, OSError) as e:
      bad.append(f"{os.path.basename(path)} row {i}: {type(e).__name__} {e}")
  return questions, bad


def score(question: Question, raw: str) -> Score:
  index2ans = {chr(ord("A") + i): c for i, c in enumerate(question.meta["options"])}
  letter, parsed = parse_choice(raw, index2ans, question.qid)
  # An answer drawn at random is recorded lower case, so the summary names it as unparsed; it still scores.
  return Score(parsed=letter if parsed else letter.lower(), correct=letter == question.answer, counted=True)


BENCHMARK = Benchmark(name="longvideobench", column="LongVideoBench", load=load, score=score, max_new_tokens=32)
