"""LongVid / LLaVA-style annotations: the YAML list of datasets, JSON(L) records, sampling strategies.

  datasets:
    - json_path: annotations/caption.jsonl       # JSON list or JSON lines
      data_root: videos                          # media paths in records are relative to it
      sampling_strategy: "first:50%"            # all | first:N | first:P% | end:N | end:P% | random:N | random:P%
      media_type: video                          # optional; otherwise taken from each record

Relative paths in the YAML are relative to the YAML file. Strategies follow the reference loader: N is a
count, P% is ceil(P/100 · n), and `random` takes the first N of a seeded shuffle.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Iterator

import numpy as np
import yaml


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  name: str
  json_path: str
  data_root: str
  sampling_strategy: str = "all"
  media_type: str | None = None


def load_dataset_list(yaml_path: str) -> list[DatasetSpec]:
  with open(yaml_path) as f:
    spec = yaml.safe_load(f)
  if not isinstance(spec, dict) or not isinstance(spec.get("datasets"), list) or not spec["datasets"]:
    raise ValueError(f"{yaml_path}: expected a mapping with a non-empty 'datasets' list")
  base = os.path.dirname(os.path.abspath(yaml_path))
  out, names = [], set()
  for i, entry in enumerate(spec["datasets"]):
    if not isinstance(entry, dict) or "json_path" not in entry:
      raise ValueError(f"{yaml_path}: datasets[{i}] needs a json_path")
    json_path = os.path.join(base, entry["json_path"])
    name = entry.get("name") or os.path.splitext(os.path.basename(json_path))[0]
    if name in names:
      name = f"{name}_{i}"
    names.add(name)
    strategy = str(entry.get("sampling_strategy", "all"))
    select(1, strategy)   # fail now, naming the dataset, rather than at training time
    out.append(DatasetSpec(name, json_path, os.path.join(base, entry.get("data_root", "")), strategy,
                           entry.get("media_type")))
  return out


def read_records(json_path: str) -> Iterator[tuple[int, dict | None, str | None]]:
  """(index, record, None) for each record, or (index, None, reason) for one that cannot be parsed.
  Indices count every record (or line) of the file, bad ones included, as the reference's list does."""
  if json_path.endswith(".jsonl"):
    with open(json_path) as f:
      index = 0
      for line_number, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          record = json.loads(line)
          yield index, (record if isinstance(record, dict) else None), (
              None if isinstance(record, dict) else f"line {line_number} is not a JSON object")
        except json.JSONDecodeError as e:
          yield index, None, f"line {line_number} is not valid JSON ({e.msg})"
        index += 1
  elif json_path.endswith(".json"):
    with open(json_path) as f:
      records = json.load(f)
    if not isinstance(records, list):
      raise ValueError(f"{json_path}: expected a JSON list of records")
    for index, record in enumerate(records):
      yield index, (record if isinstance(record, dict) else None), (
          None if isinstance(record, dict) else "not a JSON object")
  else:
    raise ValueError(f"unsupported annotation file {json_path!r}: expected .json or .jsonl")


def select(num_records: int, strategy: str, seed: int = 0) -> np.ndarray:
  """Indices (into the dataset's records) that a sampling strategy keeps, in order."""
  if strategy == "all":
    return np.arange(num_records)
  kind, _, amount = strategy.partition(":")
  if kind not in ("first", "end", "random") or not amount:
    raise ValueError(f"unknown sampling_strategy {strategy!r}; expected all, first:N, first:P%, end:N, "
                     "end:P%, random:N or random:P%")
  try:
    count = (math.ceil(float(amount[:-1]) * num_records / 100) if amount.endswith("%") else int(amount))
  except ValueError:
    raise ValueError(f"sampling_strategy {strategy!r}: {amount!r} is not a count or a percentage") from None
  count = max(0, min(count, num_records))
  if kind == "first":
    return np.arange(count)
  if kind == "end":
    return np.arange(num_records - count, num_records)
  return np.sort(np.random.default_rng(seed).permutation(num_records)[:count])


def check_conversations(record: dict) -> str | None:
  """Why a record's conversations cannot be trained on, or None when they can."""
  turns = record.get("conversations")
  if not isinstance(turns, list) or not turns:
    return "empty or missing conversations"
  for i, turn in enumerate(turns):
    if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
      return f"conversation turn {i} has no text value"
    expected = "human" if i % 2 == 0 else "gpt"
    if turn.get("from") != expected:
      return f"conversation turn {i} is from {turn.get('from')!r}, expected {expected!r}"
  if len(turns) % 2:
    return "conversation ends without an answer"
  return None
