"""A benchmark case in its own subprocess: `script --case JSON` runs it and prints one RESULT line, which the
parent reads back. A crash comes back as the case with an "error" field ("out of memory" when it was one)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

RESULT_PREFIX = "RESULT "


def print_result(result: dict):
  """The child's side: the line run_case_in_subprocess reads."""
  print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_case_in_subprocess(case: dict, timeout: int, script: str) -> dict:
  """Runs `script --case JSON` (a benchmark script that answers --case with print_result) and returns the
  case with its result's fields, or with an "error"."""
  command = [sys.executable, os.path.abspath(script), "--case", json.dumps(case)]
  try:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return {**case, "error": f"timed out after {timeout} s"}
  for line in reversed(done.stdout.splitlines()):
    if line.startswith(RESULT_PREFIX):
      return {**case, **json.loads(line[len(RESULT_PREFIX):])}
  tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
  oom = any("out of memory" in l.lower() or "resource_exhausted" in l.lower() for l in tail)
  return {**case, "error": "out of memory" if oom else " | ".join(tail)[-400:]}
