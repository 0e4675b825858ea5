"""The Table 2 benchmarks end to end: fixtures in each benchmark's published layout (JSON lists, parquet) with
real OpenCV mp4s, a tiny random VideoChat-Flash checkpoint in the official layout, the runner as tools/evaluate.py
drives it.

Independent references: the prompts are written out by hand from the official doc_to_text functions
(lmms-eval_videochat/lmms_eval/tasks/*/utils.py) for the fixture rows; the parser tables give the letter the
official parsers return (worked out from their code, and checked once against it); accuracies are counted here
from the raw answers with the official rules, not read from the code under test.
"""

import json
import os
import re
import shutil

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hico_jax import api, presets
from hico_jax.data import tokenizer as tk
from hico_jax.eval import benchmarks, results as results_io, runner, scoring
from hico_jax.eval.benchmarks import parsing
from hico_jax.infer import visual
from hico_jax.models import hico
from tests.random_params import random_hico_params

SIZE = 112
IM_END, ENDOFTEXT = 151645, 151643


# ------------------------------------------------------------------------------------------------------------
# Answer parsing: raw answer -> the letter (or text) each official parser returns.

# mvbench / mlvu_mc / lvbench mcq_acc's process(): "B." matches its option pattern; otherwise punctuation is
# cleaned, the text lower-cased and the first standalone a-e (any case) returned upper-cased, else the text.
MCQ = [("(B)", "B"), ("B.", "B"), ("B. A dog", "B"), ("The best answer is C", "C"), ("c", "C"),
       ("(c) the cat", "C"), ("I don't know", "i don't know"), ("A and B", "A"), ("B, then C", "B"), ("", ""),
       ("This is a cat", "A"), ("E", "E"), ("The answer is (A).", "A"), ("D) Blue", "D")]
# videomme extract_characters_regex: prefixes removed, then the first capital A-D anywhere; "" when none, or when
# over ten words with no A-D. "Answer: D" gives the A of "Answer"; lower case is never a letter.
VIDEOMME = [("(B)", "B"), ("B.", "B"), ("The best answer is C", "C"), ("c", ""), ("I don't know", ""),
            ("A and B", "A"), ("Answer: D", "A"), ("E", ""), ("The answer is (A).", "A"),
            ("one two three four five six seven eight nine ten eleven", ""), ("", "")]
# perceptiontest: the first standalone capital A-D, else "".
PERCEPTION = [("(B)", "B"), ("B.", "B"), ("The best answer is C", "C"), ("c", ""), ("I don't know", ""),
              ("A and B", "A"), ("Answer: D", "D"), ("E", ""), ("", "")]


@pytest.mark.parametrize("raw,letter", MCQ)
def test_mcq_parser_matches_the_official_table(raw, letter):
  assert parsing.mcq_letter(raw) == letter


@pytest.mark.parametrize("raw,letter", VIDEOMME)
def test_videomme_parser_matches_the_official_table(raw, letter):
  assert parsing.videomme_letter(raw) == letter


@pytest.mark.parametrize("raw,letter", PERCEPTION)
def test_perceptiontest_parser_matches_the_official_table(raw, letter):
  assert parsing.perceptiontest_letter(raw) == letter


# ------------------------------------------------------------------------------------------------------------
# Fixtures: one tiny model, mp4s, and each benchmark's files as published.

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  config = hico.HiCoConfig.from_dict({
      "vit": dict(image_size=SIZE, width=128, depth=2, num_heads=2, mlp_dim=256, dtype="float32"),
      "llm": dict(presets.llm("tiny", dtype="float32", num_layers=2, tie_word_embeddings=False))})
  path = tmp_path_factory.mktemp("eval_model")
  api.CausalLM(config, random_hico_params(config, seed=5), eos_ids=[IM_END], pad_id=ENDOFTEXT) \
      .save_pretrained(str(path))
  tk.build_qwen2_tokenizer_json(path)
  return str(path)


@pytest.fixture(scope="module")
def loaded(model_dir):
  import hico_jax
  return hico_jax.from_pretrained(model_dir), tk.load_tokenizer(model_dir)


def _write_mp4(path, seed, frames=8, fps=4.0):
  """8 frames at 4 fps: dynamic_fps1 with the 64-frame floor takes all 8 (the floor shrinks to 4*floor(8/4))."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rng = np.random.default_rng(seed)
  writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (SIZE, SIZE))
  assert writer.isOpened()
  for _ in range(frames):
    writer.write(cv2.resize(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), (SIZE, SIZE)))
  writer.release()


def _json(path, rows):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(rows, f)


def _parquet(path, rows):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  pq.write_table(pa.Table.from_pylist(rows), path)


def make_mvbench(root):
  _json(root / "json/action_count.json", [
      {"video": "v1.mp4", "question": "How many times did the person launch objects on the table?",
       "candidates": ["3", "2", "4"], "answer": "2"},
      {"video": "v2.mp4", "question": "What is the person doing?", "candidates": ["Sitting", "Jumping"],
       "answer": "Jumping"},
      {"video": "gone.mp4", "question": "Where?", "candidates": ["Here", "There"], "answer": "Here"},
      {"video": "v1.mp4", "question": "No candidates in this row."}])
  _json(root / "json/object_shuffle.json", [
      {"video": "v3.mp4", "question": "Where is the ball?", "candidates": ["Left", "Middle", "Right"],
       "answer": "Right"}])
  for i in (1, 2):
    _write_mp4(root / f"video/perception/videos/v{i}.mp4", i)
  _write_mp4(root / "video/perception/videos/v3.mp4", 3)


MVBENCH_PROMPTS = {
    "action_count/0": "Question: How many times did the person launch objects on the table?\nOption:\n(A) 3\n(B) 2\n"
                      "(C) 4\n\nOnly give the best option.",
    "action_count/1": "Question: What is the person doing?\nOption:\n(A) Sitting\n(B) Jumping\n\nOnly give the best "
                      "option.",
    "action_count/2": "Question: Where?\nOption:\n(A) Here\n(B) There\n\nOnly give the best option.",
    "object_shuffle/0": "Question: Where is the ball?\nOption:\n(A) Left\n(B) Middle\n(C) Right\n\nOnly give the "
                        "best option.",
}


def make_mlvu(root):
  _json(root / "json/4_count.json", [
      {"video": "c.mp4", "duration": 2.0, "question": "How many cats?", "candidates": ["1", "5"], "answer": "5",
       "question_type": "count"}])
  _json(root / "json/2_needle.json", [
      {"video": "n.mp4", "duration": 2.0, "question": "What is hidden?", "candidates": ["A key", "A cup", "A pen"],
       "answer": "A key", "question_type": "needle"}])
  _write_mp4(root / "video/4_count/c.mp4", 4)
  _write_mp4(root / "video/2_needle/n.mp4", 5)


MLVU_PROMPTS = {
    "count/0": "Question:How many cats?\nOption:\n(A) 1\n(B) 5\nAnswer with the option's letter from the given "
               "choices directly.",
    "needle/0": "Question:What is hidden?\nOption:\n(A) A key\n(B) A cup\n(C) A pen\nAnswer with the option's "
                "letter from the given choices directly.",
}


def make_lvbench(root):
  _json(root / "json/lvbench_clean_tv.json", [
      {"video": "00000038", "type": "tv", "question": "What type of video is this?",
       "candidates": ["(A) News report", "(B) TV show"], "answer": "(B) TV show",
       "question_type": ["event understanding"], "time_reference": "00:00-75:57"}])
  _json(root / "json/lvbench_clean_sport.json", [
      {"video": "00000040", "type": "sport", "question": "Who scores?", "candidates": ["(A) Red", "(B) Blue"],
       "answer": "(A) Red", "question_type": ["key information retrieval"], "time_reference": "00:10-00:20"}])
  _write_mp4(root / "videos/00000038.mp4", 6)
  _write_mp4(root / "videos/00000040.mp4", 7)


LVBENCH_PROMPTS = {
    "tv/0": "What type of video is this?\nA. (A) News report\nB. (B) TV show\nAnswer with the option's letter from "
            "the given choices directly.",
    "sport/0": "Who scores?\nA. (A) Red\nB. (B) Blue\nAnswer with the option's letter from the given choices "
               "directly.",
}


def make_videomme(root):
  base = {"domain": "Knowledge", "sub_category": "Astronomy", "url": "https://www.youtube.com/watch?v=x",
          "task_type": "Counting Problem"}
  _parquet(str(root / "videomme/test-00000-of-00001.parquet"), [
      {**base, "video_id": "001", "duration": "short", "videoID": "fFjv93ACGo8", "question_id": "001-1",
       "question": "When demonstrating the Germany modern Christmas tree is initially decorated with apples, "
                   "candles and berries, which kind of the decoration has the largest number?",
       "options": ["A. Apples.", "B. Candles.", "C. Berries.", "D. The three kinds are of the same number."],
       "answer": "C"},
      {**base, "video_id": "601", "duration": "long", "videoID": "longOne", "question_id": "601-1",
       "question": "What is shown?", "options": ["A. x.", "B. y.", "C. z.", "D. w."], "answer": "A"},
      {**base, "video_id": "602", "duration": "long", "videoID": "notThere", "question_id": "602-1",
       "question": "Missing?", "options": ["A. x.", "B. y.", "C. z.", "D. w."], "answer": "B"}])
  _write_mp4(root / "videos/fFjv93ACGo8.mp4", 8)
  _write_mp4(root / "videos/longOne.mp4", 9)


VIDEOMME_PROMPTS = {
    "001-1": "These are the frames of a video. Select the best answer to the following multiple-choice question "
             "based on the video. Respond with only the letter (A, B, C, or D) of the correct option.\nQuestion: "
             "When demonstrating the Germany modern Christmas tree is initially decorated with apples, candles and "
             "berries, which kind of the decoration has the largest number?\nOption:\nA. Apples.\nB. Candles.\nC. "
             "Berries.\nD. The three kinds are of the same number.\nAnswer with the option's letter from the given "
             "choices directly.",
    "601-1": "These are the frames of a video. Select the best answer to the following multiple-choice question "
             "based on the video. Respond with only the letter (A, B, C, or D) of the correct option.\nQuestion: "
             "What is shown?\nOption:\nA. x.\nB. y.\nC. z.\nD. w.\nAnswer with the option's letter from the given "
             "choices directly.",
    "602-1": "These are the frames of a video. Select the best answer to the following multiple-choice question "
             "based on the video. Respond with only the letter (A, B, C, or D) of the correct option.\nQuestion: "
             "Missing?\nOption:\nA. x.\nB. y.\nC. z.\nD. w.\nAnswer with the option's letter from the given "
             "choices directly.",
}


def make_perceptiontest(root):
  _parquet(str(root / "mc_question_val/validation-00000-of-00001.parquet"), [
      {"video_name": "video_10909", "question": "Is the camera moving or static?", "question_id": "0",
       "options": ["I am not sure", "static", "moving"], "answer_id": "1", "area": "physics",
       "reasoning": "descriptive", "tag": ["camera motion"]},
      {"video_name": "video_7", "question": "What happens next?", "question_id": "1",
       "options": ["a", "b", "c", "d"], "answer_id": "2", "area": "semantics", "reasoning": "predictive",
       "tag": ["action"]}])
  _write_mp4(root / "videos/video_10909.mp4", 10)
  _write_mp4(root / "videos/video_7.mp4", 11)


# Options past the second are all labelled (C) in the official text.
PERCEPTION_PROMPTS = {
    "0": "\nQuestion: Is the camera moving or static?\n(A). I am not sure\n(B). static\n(C). moving\nOnly give the "
         "best option.",
    "1": "\nQuestion: What happens next?\n(A). a\n(B). b\n(C). c\n(C). d\nOnly give the best option.",
}

LVB_ROWS = [  # the parquet's columns (option0..4, "N/A" for the unused)
    {"id": "abc_0", "video_id": "abc", "video_path": "abc.mp4", "subtitle_path": "abc.json", "duration": 10.0,
     "starting_timestamp_for_subtitles": 0.0, "question": "What colour?", "option0": "Red", "option1": "Blue",
     "option2": "N/A", "option3": "N/A", "option4": "N/A", "correct_choice": 1, "duration_group": 15,
     "question_category": "S2E"},
    {"id": "def_0", "video_id": "def", "video_path": "def.mp4", "subtitle_path": "def_en.json", "duration": 6.0,
     "starting_timestamp_for_subtitles": 1.0, "question": "Who speaks?", "option0": "Ann", "option1": "Bob",
     "option2": "Cat", "option3": "N/A", "option4": "N/A", "correct_choice": 2, "duration_group": 60,
     "question_category": "S2E"},
    {"id": "ghi_0", "video_id": "ghi", "video_path": "ghi.mp4", "subtitle_path": "nowhere.json", "duration": 6.0,
     "starting_timestamp_for_subtitles": 0.0, "question": "?", "option0": "x", "option1": "y", "option2": "N/A",
     "option3": "N/A", "option4": "N/A", "correct_choice": 0, "duration_group": 15, "question_category": "S2E"}]


def make_longvideobench(root):
  _parquet(str(root / "validation-00000-of-00001.parquet"), LVB_ROWS)
  # Frame times 0..9 s: kept when a frame time lies strictly inside the span (spans under 1 s widen to 1 s).
  _json(root / "subtitles/abc_en.json", [
      {"start": "00:00:01.000", "end": "00:00:03.000", "line": "Hello there."},
      {"start": "00:00:20.000", "end": "00:00:21.000", "line": "Too late."},
      {"start": "00:00:05.200", "end": "00:00:05.400", "line": "Short one."}])
  # Offset 1 s, frame times 0..5 s; a null end means the video's end (6 s), here before its start: the span
  # becomes 1 s around (7.5 + 5) / 2 and holds no frame time.
  _json(root / "subtitles/def_en.json", [{"timestamp": [2.0, 4.0], "text": "Stamp."},
                                         {"timestamp": [8.5, None], "text": "Till end."}])
  _write_mp4(root / "videos/abc.mp4", 12)
  _write_mp4(root / "videos/def.mp4", 13)


_LVB_MIDDLE = ("\n Select the best answer to the following multiple-choice question based on the video and the "
               "subtitles. Respond with only the letter of the correct option.\nQuestion: ")
LONGVIDEOBENCH_PROMPTS = {
    "abc_0": " This video's subtitles are listed below: \nHello there.\nShort one.." + _LVB_MIDDLE + "What colour?\n"
             "(A). Red\n(B). Blue\nAnswer with the option's letter from the given choices directly.\n",
    "def_0": " This video's subtitles are listed below: \nStamp.." + _LVB_MIDDLE + "Who speaks?\n(A). Ann\n(B). Bob\n"
             "(C). Cat\nAnswer with the option's letter from the given choices directly.\n",
}

# MMMU's parse_multi_choice_response over options A Red, B Blue, C Green: None = no letter, drawn at random.
LONGVIDEOBENCH = [("(B)", "B"), ("B.", "B"), ("The best answer is C", "C"), ("c", None), ("A and B", "B"),
                  ("(A) or (C)", "C"), ("It is blue , I think so really", "B"), ("no idea", None), ("", None)]


def test_longvideobench_json_layout_gives_the_parquets_prompts(data_root, tmp_path):
  """lvb_val.json lists the options as "candidates"; the questions and prompts are the parquet's."""
  root = tmp_path / "lvb"
  shutil.copytree(data_root / "longvideobench" / "subtitles", root / "subtitles")
  rows = [{**{k: v for k, v in r.items() if not k.startswith("option")},
           "candidates": [r[f"option{i}"] for i in range(5) if r[f"option{i}"] != "N/A"]} for r in LVB_ROWS]
  _json(root / "lvb_val.json", rows)
  questions, _ = benchmarks.get("longvideobench").load(str(root))
  assert {q.qid: q.prompt for q in questions} == LONGVIDEOBENCH_PROMPTS


@pytest.mark.parametrize("raw,letter", LONGVIDEOBENCH)
def test_longvideobench_parser_matches_the_official_table(raw, letter):
  from hico_jax.eval.benchmarks import longvideobench
  got, parsed = longvideobench.parse_choice(raw, {"A": "Red", "B": "Blue", "C": "Green"}, seed="q")
  assert (got if parsed else None) == letter
  assert got in "ABC"


FIXTURES = {"mvbench": (make_mvbench, MVBENCH_PROMPTS), "mlvu": (make_mlvu, MLVU_PROMPTS),
            "lvbench": (make_lvbench, LVBENCH_PROMPTS), "videomme": (make_videomme, VIDEOMME_PROMPTS),
            "perceptiontest": (make_perceptiontest, PERCEPTION_PROMPTS),
            "longvideobench": (make_longvideobench, LONGVIDEOBENCH_PROMPTS)}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("bench_data")
  for name, (make, _) in FIXTURES.items():
    make(root / name)
  return root


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_prompts_are_the_official_doc_to_text(name, data_root):
  questions, _ = benchmarks.get(name).load(str(data_root / name))
  assert {q.qid: q.prompt for q in questions} == FIXTURES[name][1]


def test_a_row_without_its_fields_and_a_partial_download_are_named(data_root):
  questions, bad = benchmarks.get("mvbench").load(str(data_root / "mvbench"))
  assert [q.qid for q in questions] == ["action_count/0", "action_count/1", "action_count/2", "object_shuffle/0"]
  assert "json/action_sequence.json: missing annotation file" in bad
  assert any(b.startswith("json/action_count.json row 3: KeyError") for b in bad)
  assert len(bad) == 18 + 1    # the 18 task files not in the fixture, and the bad row


def test_the_chat_prompt_is_the_references(data_root):
  assert runner.chat_prompt("Q?", 2.0, 8) == (
      "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\nThe video lasts for "
      "2.00 seconds, and 8 frames are uniformly sampled from it. Q?<|im_end|>\n<|im_start|>assistant\n")


# ------------------------------------------------------------------------------------------------------------
# Scoring rules against hand counts.

def _hand_letter(name, raw):
  table = {"videomme": VIDEOMME, "perceptiontest": PERCEPTION}.get(name, MCQ)
  return dict(table)[raw]


def test_scoring_rules_on_hand_written_answers(data_root):
  """MVBench: "" is out of the denominator and a non-letter is wrong; overall weights tasks by their size."""
  bench = benchmarks.get("mvbench")
  questions, bad = bench.load(str(data_root / "mvbench"))
  raw = {"action_count/0": "(B)", "action_count/1": "", "action_count/2": "I don't know", "object_shuffle/0": "C"}
  records = {q.qid: runner._record(bench, runner.Decoded(q, np.zeros((8, 1, 1, 3))), raw[q.qid]) for q in questions}
  s = scoring.summarize(bench, questions, records, bad)
  # action_count: correct (B)=B; "" not counted; "i don't know" counted, wrong -> 1/2. object_shuffle: 1/1.
  assert (s["tasks"]["action_count"]["correct"], s["tasks"]["action_count"]["counted"]) == (1, 2)
  assert s["tasks"]["object_shuffle"]["accuracy"] == 100.0
  assert s["overall"] == pytest.approx((50.0 * 3 + 100.0 * 1) / 4)
  assert s["unparseable_answers"] == ["action_count/1", "action_count/2"]

  bench = benchmarks.get("videomme")
  questions, bad = bench.load(str(data_root / "videomme"))
  raw = {"001-1": "The best answer is C", "601-1": "c", "602-1": ""}
  records = {q.qid: runner._record(bench, runner.Decoded(q, np.zeros((8, 1, 1, 3))), raw[q.qid]) for q in questions}
  s = scoring.summarize(bench, questions, records, bad)
  # every question counts: short 1/1, long 0/2 ("c" and "" are wrong); overall weighted: (100*1 + 0*2) / 3
  assert s["tasks"]["short"]["accuracy"] == 100.0 and s["tasks"]["long"]["counted"] == 2
  assert s["overall"] == pytest.approx(100 / 3)


# ------------------------------------------------------------------------------------------------------------
# The whole tool.

def _run(loaded, out, data_root, names, **options):
  model, tokenizer = loaded
  run = runner.Runner(model, tokenizer, str(out), runner.Options(batch_size=2, progress=False, **options))
  for name in names:
    run.run(name, str(data_root / name))
  return runner.summarize(str(out), names, {n: str(data_root / n) for n in names}, "tiny")


def _hand_count(name, data_root, out):
  """Per task (correct, counted) from the raw answers in the result files, by the official rules."""
  questions, _ = benchmarks.get(name).load(str(data_root / name))
  lines = [json.loads(line) for path in sorted((out / name).glob("*.jsonl")) for line in open(path)]
  by_qid = {r["qid"]: r for r in lines}
  counts = {}
  for q in questions:
    r = by_qid[q.qid]
    c = counts.setdefault(q.task, [0, 0])
    if r["status"] != "answered":
      continue
    raw = r["raw"]
    if name == "videomme":
      prefixes = ["The best answer is", "The correct answer is", "The answer is", "The answer"]
      s = raw.strip()
      for p in prefixes:
        s = s.replace(p, "")
      m = None if len(s.split()) > 10 and not re.search("[ABCD]", s) else re.search("[ABCD]", s)
      c[0] += int(bool(m) and m[0] == q.answer)
      c[1] += 1
    elif name == "longvideobench":
      c[0] += int(r["parsed"].upper() == q.answer)   # a random draw is recorded lower case; it scores too
      c[1] += 1
    elif name == "perceptiontest":
      m = re.search(r"\b([A-D])\b", raw.strip())
      c[0] += int(bool(m) and "ABCD".index(m.group(1)) == q.answer)
      c[1] += 1
    elif raw != "":
      c[0] += int(parsing.mcq_letter(raw) == q.answer)   # the parser itself is pinned by the table above
      c[1] += 1
  return counts


def test_tool_runs_every_benchmark_and_scores_as_counted_by_hand(loaded, data_root, tmp_path):
  names = sorted(FIXTURES)
  summaries = _run(loaded, tmp_path, data_root, names)
  for s in summaries:
    counts = _hand_count(s["benchmark"], data_root, tmp_path)
    assert {t: [v["correct"], v["counted"]] for t, v in s["tasks"].items()} == counts
    sizes = {t: v["questions"] for t, v in s["tasks"].items() if v["counted"]}
    hand = sum(100 * counts[t][0] / counts[t][1] * n for t, n in sizes.items()) / sum(sizes.values())
    assert s["overall"] == pytest.approx(hand)
    assert s["pending"] == 0
  by = {s["benchmark"]: s for s in summaries}
  assert by["mvbench"]["missing_videos"][0].startswith("action_count/2: missing video")
  assert by["videomme"]["missing_videos"][0].startswith("602-1: missing video")
  records = [json.loads(line) for line in open(tmp_path / "mvbench/results.00000-of-00001.jsonl")]
  answered = [r for r in records if r["status"] == "answered"]
  assert {r["prompt"] for r in answered} <= set(MVBENCH_PROMPTS.values())
  assert all(r["num_frames"] == 8 and set(r) >= {"qid", "raw", "parsed", "correct"} for r in answered)
  md = (tmp_path / "summary.md").read_text()
  assert md.splitlines()[0] == ("| Model | LongVideoBench | LVBench | MLVU | MVBench | PerceptionTest | "
                                "VideoMME (w/o sub.) |")
  assert by["longvideobench"]["unreadable_rows"][0].startswith(
      "validation-00000-of-00001.parquet row 2: FileNotFoundError")
  assert json.loads((tmp_path / "summary.json").read_text())["benchmarks"][0]["benchmark"] == "longvideobench"


def test_a_resumed_run_and_a_split_run_equal_an_uninterrupted_one(loaded, data_root, tmp_path):
  names = ["mvbench", "videomme"]
  whole = _run(loaded, tmp_path / "whole", data_root, names)
  # Killed after two records, mid-way through writing a third.
  _run(loaded, tmp_path / "resumed", data_root, names)
  for name in names:
    path = tmp_path / "resumed" / name / "results.00000-of-00001.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:2]) + lines[2][:15])
  resumed = _run(loaded, tmp_path / "resumed", data_root, names)
  split_out = tmp_path / "split"
  for index in (0, 1):
    model, tokenizer = loaded
    run = runner.Runner(model, tokenizer, str(split_out), runner.Options(batch_size=2, progress=False,
                                                                          process_index=index, process_count=2))
    for name in names:
      run.run(name, str(data_root / name))
  split = runner.summarize(str(split_out), names, {n: str(data_root / n) for n in names}, "tiny")
  for name in names:
    def answers(out):
      records = results_io.read_records(str(out), name)
      return {q: (r["status"], r.get("raw")) for q, r in records.items()}
    assert answers(tmp_path / "resumed") == answers(tmp_path / "whole") == answers(split_out)
    lines = (tmp_path / "resumed" / name / "results.00000-of-00001.jsonl").read_text().splitlines()
    qids = [json.loads(line)["qid"] for line in lines]
    assert len(qids) == len(set(qids))       # nothing scored twice
  assert resumed == whole == split


def test_a_benchmark_run_shows_its_question_bar_and_no_bar_of_the_video_encoder(loaded, data_root, tmp_path, capfd,
                                                                              monkeypatch):
  """The runner encodes each video itself, quietly: a user sees one bar, questions answered, not a second one
  per video nested in it. Here every video is two encoder chunks and a bar would show at once."""
  model, tokenizer = loaded
  monkeypatch.setattr(visual, "PROGRESS_DELAY_S", 0.0)
  monkeypatch.setattr(model, "_video_encoders", {None: visual.VideoEncoder(model.config, model.params,
                                                                            chunk_clips=1)})
  run = runner.Runner(model, tokenizer, str(tmp_path), runner.Options(batch_size=2, progress=True, limit=2))
  run.run("mvbench", str(data_root / "mvbench"))
  err = capfd.readouterr().err
  assert "mvbench (0 done before)" in err and "2/2" in err, err
  assert "encoding video" not in err, err
