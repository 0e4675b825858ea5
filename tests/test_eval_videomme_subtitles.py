"""Video-MME with subtitles (`videomme_w_subtitle`): the published layout (the parquet, videos/<videoID>.mp4,
subtitle/<videoID>.srt as subtitle.zip unpacks) with real OpenCV mp4s and real .srt files, through the tool.

Independent reference: the prompts are written out by hand from the official videomme_doc_to_text_subtitle
(lmms-eval_videochat/lmms_eval/tasks/videomme/utils.py, gemini_api_flag "full subtitle") for these rows: every
line's first <font color="white" size=".72c"> span, joined by newlines; no subtitle file: no header, the
frames-only preamble; an .srt with no tagged line: the header, then the frames-only preamble."""

import re

import pytest

from hico_jax.eval import benchmarks, results as results_io, runner
from tests.test_evaluate import _parquet, _write_mp4, loaded, model_dir  # noqa: F401  (fixtures)

BASE = {"domain": "Knowledge", "sub_category": "Astronomy", "url": "https://www.youtube.com/watch?v=x",
        "task_type": "Counting Problem"}
ROWS = [
    {**BASE, "video_id": "001", "duration": "short", "videoID": "talkVideo", "question_id": "001-1",
     "question": "What does the speaker greet?", "options": ["A. The world.", "B. A cat.", "C. Nobody.", "D. Mars."],
     "answer": "A"},
    {**BASE, "video_id": "001", "duration": "short", "videoID": "talkVideo", "question_id": "001-2",
     "question": "How many cues?", "options": ["A. 1.", "B. 2.", "C. 3.", "D. 4."], "answer": "C"},
    {**BASE, "video_id": "301", "duration": "medium", "videoID": "silentOne", "question_id": "301-1",
     "question": "Is it silent?", "options": ["A. Yes.", "B. No.", "C. Maybe.", "D. Never."], "answer": "A"},
    {**BASE, "video_id": "601", "duration": "long", "videoID": "untagged", "question_id": "601-1",
     "question": "Any words?", "options": ["A. x.", "B. y.", "C. z.", "D. w."], "answer": "D"},
]
# As in Video-MME's subtitle.zip: numbered cues, "-->" timings, the text inside a white <font> tag. Cue 2 spans two
# lines; cue 3 holds two spans on one line (only the first is kept) and an untagged line (dropped).
TALK_SRT = """1
00:00:00,000 --> 00:00:01,200
<font color="white" size=".72c">Hello world.</font>

2
00:00:01,200 --> 00:00:01,900
<font color="white" size=".72c">Second cue,</font>
<font color="white" size=".72c">on two lines — ça va?</font>

3
00:00:01,900 --> 00:00:02,000
<font color="white" size=".72c">First span</font> <font color="white" size=".72c">second span</font>
[Music]
"""
UNTAGGED_SRT = """1
00:00:00,000 --> 00:00:01,000
[Applause]
"""

WITH = ("These are the frames and subtitles of a video. Select the best answer to the following multiple-choice "
        "question based on the video and the subtitles. Respond with only the letter (A, B, C, or D) of the correct "
        "option.")
FRAMES_ONLY = ("These are the frames of a video. Select the best answer to the following multiple-choice question "
               "based on the video. Respond with only the letter (A, B, C, or D) of the correct option.")
TALK = ("This video's subtitles are listed below: \nHello world.\nSecond cue,\non two lines — ça va?\nFirst span\n"
        + WITH)
PROMPTS = {
    "001-1": TALK + "\nQuestion: What does the speaker greet?\nOption:\nA. The world.\nB. A cat.\nC. Nobody.\n"
                    "D. Mars.\nThe best answer is:",
    "001-2": TALK + "\nQuestion: How many cues?\nOption:\nA. 1.\nB. 2.\nC. 3.\nD. 4.\nThe best answer is:",
    "301-1": "\n" + FRAMES_ONLY + "\nQuestion: Is it silent?\nOption:\nA. Yes.\nB. No.\nC. Maybe.\nD. Never.\n"
                                  "The best answer is:",
    "601-1": "This video's subtitles are listed below: \n\n" + FRAMES_ONLY + "\nQuestion: Any words?\nOption:\n"
             "A. x.\nB. y.\nC. z.\nD. w.\nThe best answer is:",
}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("videomme_subs")
  _parquet(str(root / "videomme/test-00000-of-00001.parquet"), ROWS)
  for seed, video in enumerate(("talkVideo", "silentOne", "untagged")):
    _write_mp4(root / f"videos/{video}.mp4", 20 + seed)
  (root / "subtitle").mkdir()
  (root / "subtitle/talkVideo.srt").write_text(TALK_SRT, encoding="utf-8")
  (root / "subtitle/untagged.srt").write_text(UNTAGGED_SRT, encoding="utf-8")
  return root


def test_prompts_are_the_official_doc_to_text_with_subtitles(data_root):
  questions, bad = benchmarks.get("videomme_w_subtitle").load(str(data_root))
  assert {q.qid: q.prompt for q in questions} == PROMPTS
  assert bad == []
  assert [q.task for q in questions] == ["short", "short", "medium", "long"]


def test_a_download_without_its_subtitle_folder_is_a_one_line_error(tmp_path):
  _parquet(str(tmp_path / "videomme/test-00000-of-00001.parquet"), ROWS)
  with pytest.raises(FileNotFoundError, match="unzip Video-MME's subtitle.zip"):
    benchmarks.get("videomme_w_subtitle").load(str(tmp_path))


def test_crlf_subtitles_read_as_the_official_text_mode_open_reads_them(tmp_path, data_root):
  root = tmp_path / "crlf"
  _parquet(str(root / "videomme/test-00000-of-00001.parquet"), ROWS[:1])
  (root / "subtitle").mkdir()
  (root / "subtitle/talkVideo.srt").write_bytes(TALK_SRT.replace("\n", "\r\n").encode("utf-8"))
  questions, _ = benchmarks.get("videomme_w_subtitle").load(str(root))
  assert questions[0].prompt == PROMPTS["001-1"]


def test_the_tool_scores_it_as_counted_by_hand_and_names_the_video_without_subtitles(loaded, data_root, tmp_path):
  model, tokenizer = loaded
  run = runner.Runner(model, tokenizer, str(tmp_path), runner.Options(batch_size=2, progress=False))
  run.run("videomme_w_subtitle", str(data_root))
  [summary] = runner.summarize(str(tmp_path), ["videomme_w_subtitle"], {"videomme_w_subtitle": str(data_root)},
                               "tiny")
  records = results_io.read_records(str(tmp_path), "videomme_w_subtitle")
  assert {qid: r["prompt"] for qid, r in records.items()} == PROMPTS
  # Video-MME's rule by hand: prefixes removed, the first capital A-D; every question counts.
  answers = {r["question_id"]: r["answer"] for r in ROWS}
  tasks = {r["question_id"]: r["duration"] for r in ROWS}
  counts = {}
  for qid, r in records.items():
    s = r["raw"].strip()
    for prefix in ("The best answer is", "The correct answer is", "The answer is", "The answer"):
      s = s.replace(prefix, "")
    m = None if len(s.split()) > 10 and not re.search("[ABCD]", s) else re.search("[ABCD]", s)
    c = counts.setdefault(tasks[qid], [0, 0])
    c[0] += int(bool(m) and m[0] == answers[qid])
    c[1] += 1
  assert {t: [v["correct"], v["counted"]] for t, v in summary["tasks"].items()} == counts
  assert summary["overall"] == pytest.approx(100 * sum(c[0] for c in counts.values()) / 4)
  assert summary["notes"] == [f"301-1: no subtitle file {data_root}/subtitle/silentOne.srt: asked without "
                              "subtitles"]
  md = (tmp_path / "summary.md").read_text()
  assert md.splitlines()[0] == "| Model | VideoMME (w/ sub.) |"
  assert "1 questions with a note (asked all the same)" in md
