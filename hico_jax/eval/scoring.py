"""Per-task and overall accuracy from result records, by the official rules, and the paper's Table 2 layout.

Per task: correct / counted, counted being the benchmark's official denominator (MVBench, MLVU, LVBench leave out
empty generations; Video-MME and Perception Test count every question). Overall: lmms-eval's group score, the
mean of the task scores weighted by each task's number of questions (for one-task benchmarks, the task).
Questions whose video was missing are outside both (the official harness stops on them) and are named; so is
what a benchmark's loader noted about a question it still asks (a Video-MME video without subtitles)."""

from __future__ import annotations

from typing import Sequence

from hico_jax.eval import results as results_io


def summarize(benchmark, questions: Sequence, records: dict[str, dict], bad_rows: Sequence[str]) -> dict:
  tasks: dict[str, dict] = {}
  no_video, unparsed, pending = [], [], 0
  for q in questions:
    t = tasks.setdefault(q.task, {"questions": 0, "counted": 0, "correct": 0})
    t["questions"] += 1
    record = records.get(q.qid)
    if record is None:
      pending += 1
    elif record["status"] == results_io.STATUS_NO_VIDEO:
      no_video.append(f"{q.qid}: {record['error']}")
    else:
      t["counted"] += int(record["counted"])
      t["correct"] += int(record["correct"])
      if record["parsed"] not in ("A", "B", "C", "D", "E"):
        unparsed.append(q.qid)
  notes = [f"{q.qid}: {q.meta['note']}" for q in questions if q.meta.get("note")]
  for t in tasks.values():
    t["accuracy"] = 100.0 * t["correct"] / t["counted"] if t["counted"] else 0.0
  sizes = sum(t["questions"] for t in tasks.values() if t["counted"])
  overall = (sum(t["accuracy"] * t["questions"] for t in tasks.values() if t["counted"]) / sizes) if sizes else 0.0
  if benchmark.submission is not None:    # a split without answers: submitted, not scored
    overall = None
  return {"benchmark": benchmark.name, "column": benchmark.column, "overall": overall, "tasks": tasks,
          "questions": len(questions), "pending": pending, "unreadable_rows": list(bad_rows),
          "missing_videos": no_video, "unparseable_answers": unparsed, "notes": notes}


def markdown(summaries: Sequence[dict], model_name: str) -> str:
  """Table 2's row for this model (benchmarks as columns), then each benchmark's tasks."""
  lines = ["| Model | " + " | ".join(s["column"] for s in summaries) + " |",
           "|---|" + "---|" * len(summaries),
           f"| {model_name} | " + " | ".join("submit" if s["overall"] is None else f"{s['overall']:.1f}"
                                             for s in summaries) + " |"]
  for s in summaries:
    lines += ["", f"**{s['column']}**", ""]
    if s["overall"] is None:
      files = ", ".join(f"{path} ({count} answers)" for path, count in s.get("submission_files", {}).items())
      lines.append(f"No answers in this split: not scored; for the leaderboard: {files}.")
    else:
      lines += ["| task | correct / counted | accuracy |", "|---|---|---|"]
      for name, t in s["tasks"].items():
        lines.append(f"| {name} | {t['correct']} / {t['counted']} | {t['accuracy']:.1f} |")
      lines.append(f"| overall | | {s['overall']:.1f} |")
    labels = {"missing_videos": "missing or unreadable videos", "unreadable_rows": "unreadable rows or missing "
              "annotation files", "unparseable_answers": "answers without a parseable letter"}
    notes = [f"{len(s[k])} {label}" for k, label in labels.items() if s[k]]
    if s.get("notes"):
      notes.append(f"{len(s['notes'])} questions with a note (asked all the same)")
    if s["pending"]:
      notes.append(f"{s['pending']} not yet answered")
    if notes:
      lines += ["", "Skipped or unparsed: " + ", ".join(notes) + " (named in summary.json)."]
  return "\n".join(lines) + "\n"
