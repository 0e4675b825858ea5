"""LongVideoBench's test split (longvideobench_test_v): the published test-00000-of-00001.parquet layout (answers
withheld as correct_choice -1) with real OpenCV mp4s and subtitle JSON, through the tool, which writes the
official submission file instead of a score.

Independent references: the prompts are written out by hand from longvideobench_doc_to_text; the submission files
are built here from the raw answers in the result files, as longvideobench_aggregate_results_for_submission
builds its dict ({video_id: raw prediction}, a later question of the same video overwriting an earlier one)."""

import json

import pytest

from hico_jax.eval import benchmarks, results as results_io, runner
from tests.test_evaluate import _json, _parquet, _write_mp4, loaded, model_dir  # noqa: F401  (fixtures)

ROWS = [  # the test parquet's columns; two questions share video G1D (as 1,556 test videos do)
    {"video_id": "G1D", "id": "G1D_0", "video_path": "G1D.mp4", "subtitle_path": "G1D_en.json",
     "correct_choice": -1, "question": "What does the person pick up?", "option0": "The drawing",
     "option1": "The rubber", "option2": "A pen", "option3": "N/A", "option4": "N/A", "duration": 10.0,
     "duration_group": 15, "question_category": "T3E", "topic_category": "LV-Lifestyle-Life-Vlogs",
     "starting_timestamp_for_subtitles": 0.0},
    {"video_id": "G1D", "id": "G1D_1", "video_path": "G1D.mp4", "subtitle_path": "G1D_en.json",
     "correct_choice": -1, "question": "What colour is the leaf?", "option0": "Green", "option1": "Red",
     "option2": "N/A", "option3": "N/A", "option4": "N/A", "duration": 10.0, "duration_group": 15,
     "question_category": "S2A", "topic_category": "LV-Lifestyle-Life-Vlogs",
     "starting_timestamp_for_subtitles": 0.0},
    {"video_id": "xyz", "id": "xyz_0", "video_path": "xyz.mp4", "subtitle_path": "xyz.json", "correct_choice": -1,
     "question": "Who talks?", "option0": "Ann", "option1": "Bob", "option2": "Cy", "option3": "Di", "option4": "Ed",
     "duration": 6.0, "duration_group": 60, "question_category": "S2E", "topic_category": "LV-News",
     "starting_timestamp_for_subtitles": 0.0},
    {"video_id": "gone", "id": "gone_0", "video_path": "gone.mp4", "subtitle_path": "xyz.json", "correct_choice": -1,
     "question": "Missing video?", "option0": "y", "option1": "n", "option2": "N/A", "option3": "N/A",
     "option4": "N/A", "duration": 6.0, "duration_group": 60, "question_category": "S2E",
     "topic_category": "LV-News", "starting_timestamp_for_subtitles": 0.0}]

_MIDDLE = ("\n Select the best answer to the following multiple-choice question based on the video and the "
           "subtitles. Respond with only the letter of the correct option.\nQuestion: ")
_POST = "Answer with the option's letter from the given choices directly.\n"
PROMPTS = {
    "G1D_0": " This video's subtitles are listed below: \nThe snow fairy was hurt.." + _MIDDLE +
             "What does the person pick up?\n(A). The drawing\n(B). The rubber\n(C). A pen\n" + _POST,
    "G1D_1": " This video's subtitles are listed below: \nThe snow fairy was hurt.." + _MIDDLE +
             "What colour is the leaf?\n(A). Green\n(B). Red\n" + _POST,
    "xyz_0": " This video's subtitles are listed below: \nGood evening.." + _MIDDLE +
             "Who talks?\n(A). Ann\n(B). Bob\n(C). Cy\n(D). Di\n(E). Ed\n" + _POST,
    "gone_0": " This video's subtitles are listed below: \nGood evening.." + _MIDDLE +
              "Missing video?\n(A). y\n(B). n\n" + _POST,
}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("lvb_test")
  _parquet(str(root / "test-00000-of-00001.parquet"), ROWS)
  # Frame times 0..9 s (G1D) and 0..5 s (xyz): a line is kept when one lies strictly inside its span.
  _json(root / "subtitles/G1D_en.json", [{"start": "00:00:01.000", "end": "00:00:02.500",
                                          "line": "The snow fairy was hurt."},
                                         {"start": "00:00:30.000", "end": "00:00:31.000", "line": "Past the end."}])
  _json(root / "subtitles/xyz_en.json", [{"timestamp": [0.5, 3.0], "text": "Good evening."}])
  _write_mp4(root / "videos/G1D.mp4", 30)
  _write_mp4(root / "videos/xyz.mp4", 31)
  return root


def test_prompts_are_the_official_doc_to_text_and_no_question_has_an_answer(data_root):
  questions, bad = benchmarks.get("longvideobench_test").load(str(data_root))
  assert {q.qid: q.prompt for q in questions} == PROMPTS
  assert bad == [] and all(q.answer is None for q in questions)


def test_the_json_layout_without_correct_choice_gives_the_same_questions(data_root, tmp_path):
  rows = [{**{k: v for k, v in r.items() if not k.startswith("option") and k != "correct_choice"},
           "candidates": [r[f"option{i}"] for i in range(5) if r[f"option{i}"] != "N/A"]} for r in ROWS]
  _json(tmp_path / "lvb_test_wo_gt.json", rows)
  (tmp_path / "subtitles").symlink_to(data_root / "subtitles")
  questions, bad = benchmarks.get("longvideobench_test").load(str(tmp_path))
  assert {q.qid: q.prompt for q in questions} == PROMPTS and bad == []


def test_the_tool_writes_the_official_submission_file_instead_of_a_score(loaded, data_root, tmp_path):
  model, tokenizer = loaded
  run = runner.Runner(model, tokenizer, str(tmp_path), runner.Options(batch_size=2, progress=False))
  run.run("longvideobench_test", str(data_root))
  [summary] = runner.summarize(str(tmp_path), ["longvideobench_test"], {"longvideobench_test": str(data_root)},
                               "tiny")
  records = results_io.read_records(str(tmp_path), "longvideobench_test")
  raw = {qid: r["raw"] for qid, r in records.items() if r["status"] == "answered"}
  assert set(raw) == {"G1D_0", "G1D_1", "xyz_0"}
  official = json.loads((tmp_path / "submissions/longvideobench_test_for_submission.json").read_text())
  assert official == {"G1D": raw["G1D_1"], "xyz": raw["xyz_0"]}
  assert list(official) == ["G1D", "xyz"]
  by_id = json.loads((tmp_path / "submissions/longvideobench_test_by_question_id.json").read_text())
  assert by_id == raw
  assert summary["overall"] is None
  assert all(t["counted"] == 0 and t["correct"] == 0 for t in summary["tasks"].values())
  assert summary["submission_files"] == {"submissions/longvideobench_test_for_submission.json": 2,
                                         "submissions/longvideobench_test_by_question_id.json": 3}
  assert summary["missing_videos"][0].startswith("gone_0: missing video")
  md = (tmp_path / "summary.md").read_text().splitlines()
  assert md[:3] == ["| Model | LongVideoBench (test) |", "|---|---|", "| tiny | submit |"]
  assert md[6] == ("No answers in this split: not scored; for the leaderboard: "
                   "submissions/longvideobench_test_for_submission.json (2 answers), "
                   "submissions/longvideobench_test_by_question_id.json (3 answers).")
