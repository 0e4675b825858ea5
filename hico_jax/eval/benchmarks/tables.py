"""Annotation readers for the published layouts: JSON lists, JSON lines and parquet (pyarrow, lazily)."""

from __future__ import annotations

import glob
import json
import os


def read_rows(path: str) -> list[dict]:
  """Rows of one annotation file, by its extension."""
  if path.endswith(".parquet"):
    import pyarrow.parquet as pq   # lazily: only parquet benchmarks need it
    return pq.read_table(path).to_pylist()
  with open(path, encoding="utf-8") as f:
    if path.endswith(".jsonl"):
      return [json.loads(line) for line in f if line.strip()]
    rows = json.load(f)
  if not isinstance(rows, list):
    raise ValueError(f"{path}: expected a JSON list of questions, got {type(rows).__name__}")
  return rows


def find_one(root: str, *patterns: str) -> str:
  """The first file under root matching one of the patterns (in order), or a one-line error naming them."""
  for pattern in patterns:
    hits = sorted(glob.glob(os.path.join(root, pattern)))
    if hits:
      return hits[0]
  raise FileNotFoundError(f"no annotation file under {root} matching {' or '.join(patterns)}: point --data_root "
                          "at the benchmark's downloaded folder")
