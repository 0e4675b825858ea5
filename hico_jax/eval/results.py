"""Result files of a benchmark run: one JSON line per question, appended as answers come, one file per process,
so a killed run resumes where it stopped and several processes merge by reading every file of the folder."""

from __future__ import annotations

import glob
import json
import os

# Records without an answer: the video was missing or did not decode. They are kept (and named in the summary)
# so a resumed run does not retry them forever; delete the line to retry one.
STATUS_ANSWERED, STATUS_NO_VIDEO = "answered", "no_video"


def shard_path(out_dir: str, benchmark: str, process_index: int, process_count: int) -> str:
  return os.path.join(out_dir, benchmark, f"results.{process_index:05d}-of-{process_count:05d}.jsonl")


def read_records(out_dir: str, benchmark: str) -> dict[str, dict]:
  """qid -> record over every process's file; a truncated last line (a killed write) is ignored."""
  records = {}
  for path in sorted(glob.glob(os.path.join(out_dir, benchmark, "results.*.jsonl"))):
    with open(path, encoding="utf-8") as f:
      for line in f:
        try:
          record = json.loads(line)
        except json.JSONDecodeError:
          continue
        records.setdefault(record["qid"], record)
  return records


class Writer:
  """Appends records to one process's file, flushed per record."""

  def __init__(self, path: str):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    self._drop_torn_tail(path)
    self._file = open(path, "a", encoding="utf-8")

  @staticmethod
  def _drop_torn_tail(path: str):
    # A run killed mid-write leaves a line without its newline; the next record must not be glued to it.
    if not os.path.exists(path) or os.path.getsize(path) == 0:
      return
    with open(path, "rb+") as f:
      data = f.read()
      if not data.endswith(b"\n"):
        f.seek(0)
        f.truncate(data.rfind(b"\n") + 1)

  def write(self, record: dict):
    self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
    self._file.flush()

  def close(self):
    self._file.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def write_submission(out_dir: str, files: dict[str, dict]) -> dict[str, int]:
  """Writes each {file name: JSON object} under out_dir/submissions/; returns path (relative to out_dir) -> the
  number of answers it holds."""
  os.makedirs(os.path.join(out_dir, "submissions"), exist_ok=True)
  written = {}
  for name, content in files.items():
    rel = os.path.join("submissions", name)
    with open(os.path.join(out_dir, rel), "w", encoding="utf-8") as f:
      json.dump(content, f)
    written[rel] = len(content)
  return written
