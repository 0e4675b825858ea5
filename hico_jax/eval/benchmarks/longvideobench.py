"""LongVideoBench with interleaved subtitles (longvideobench/LongVideoBench: <split>-*.parquet or lvb_val.json /
lvb_test_wo_gt.json, videos/<video_path>, subtitles/<subtitle_path with _en.json>); tasks/longvideobench/ is the
spec: `longvideobench` is longvideobench_val_v, `longvideobench_test` is longvideobench_test_v.

The prompt lists the subtitles that fall near the 512 frame times the official code assumes (duration/512
apart), whatever frames the model is given. Parsing is MMMU's: bracketed letter, bare letter, "X.", then the
option text; with none of those the official code picks a random letter, here one seeded by the question id
(named in the summary). Every question counts; overall = correct / all (the official mean over duration groups
and question categories, weighted by size, comes to the same).

The test split has no answers (correct_choice -1): the official task scores nothing and writes
submissions/longvideobench_test_for_submission.json, {video_id: raw answer}. Its key is the video id, which
1,556 of the 3,008 test videos share between questions, so that file keeps one answer per video (the last
question's, as the official dict does); longvideobench_test_by_question_id.json beside it holds every answer
under the question's own id."""

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


SPLITS = {"validation": ("validation-*.parquet", "lvb_val.json"), "test": ("test-*.parquet", "lvb_test_wo_gt.json")}


def load(data_root: str, split: str = "validation"):
  # The parquet is what the official task reads (its option0..4 columns); the JSON files hold the same questions.
  path = tables.find_one(data_root, *SPLITS[split])
  questions, bad = [], []
  for i, row in enumerate(tables.read_rows(path)):
    try:
      sub = row["subtitle_path"]
      sub = sub if "_en.json" in sub else sub.replace(".json", "_en.json")
      with open(os.path.join(data_root, "subtitles", sub), encoding="utf-8") as f:
        subtitles = json.load(f)
      # The test split: -1 in the parquet, no such field in lvb_test_wo_gt.json.
      choice = int(row["correct_choice"] if split == "validation" else row.get("correct_choice", -1))
      questions.append(Question(
          benchmark="longvideobench" if split == "validation" else "longvideobench_test",
          task=str(row["duration_group"]), qid=str(row.get("id", row["video_id"])),
          video=os.path.join(data_root, "videos", row["video_path"]), prompt=doc_to_text(row, subtitles),
          answer=chr(ord("A") + choice) if choice >= 0 else None,
          meta={"options": options(row), "question_category": row.get("question_category"),
                "video_id": row["video_id"]}))
    except (KeyError, TypeError, ValueError, OSError) as e:
      bad.append(f"{os.path.basename(path)} row {i}: {type(e).__name__} {e}")
  return questions, bad


def score(question: Question, raw: str) -> Score:
  index2ans = {chr(ord("A") + i): c for i, c in enumerate(question.meta["options"])}
  letter, parsed = parse_choice(raw, index2ans, question.qid)
  # An answer drawn at random is recorded lower case, so the summary names it as unparsed; it still scores.
  # A test question (no answer) is parsed all the same but counts nowhere.
  return Score(parsed=letter if parsed else letter.lower(), correct=letter == question.answer,
               counted=question.answer is not None)


SUBMISSION = "longvideobench_test_for_submission.json"
SUBMISSION_BY_ID = "longvideobench_test_by_question_id.json"


def submission(questions, records) -> dict[str, dict]:
  """longvideobench_aggregate_results_for_submission's file (answered questions in the split's order), and the
  same answers keyed by question id."""
  answered = [(q, records[q.qid]) for q in questions if records.get(q.qid, {}).get("status") == "answered"]
  return {SUBMISSION: {q.meta["video_id"]: r["raw"] for q, r in answered},
          SUBMISSION_BY_ID: {q.qid: r["raw"] for q, r in answered}}


BENCHMARK = Benchmark(name="longvideobench", column="LongVideoBench", load=load, score=score, max_new_tokens=32)
