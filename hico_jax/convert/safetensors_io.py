"""Reading and writing Hugging Face safetensors checkpoints (single file or sharded with an index)."""

from __future__ import annotations

import json
import os
import re
from typing import Iterator

import ml_dtypes  # noqa: F401  # registers bfloat16 with numpy, so safetensors' numpy backend reads bf16
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SHARD_FILE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


_DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


class CheckpointReader:
  """Lazy access to the tensors of a model directory: each tensor is read when asked for, so a 7B
  checkpoint never sits in host memory twice."""

  def __init__(self, model_dir: str):
    self.model_dir = model_dir
    index_path = os.path.join(model_dir, INDEX_FILE)
    single_path = os.path.join(model_dir, SINGLE_FILE)
    if os.path.exists(index_path):
      with open(index_path) as f:
        weight_map = json.load(f)["weight_map"]
      self._file_of = {name: os.path.join(model_dir, file) for name, file in weight_map.items()}
    elif os.path.exists(single_path):
      with safe_open(single_path, "numpy") as f:
        self._file_of = {name: single_path for name in f.keys()}
    else:
      raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in model directory {model_dir!r}")
    self._handles = {}

  def keys(self) -> list[str]:
    return sorted(self._file_of)

  def __contains__(self, name: str) -> bool:
    return name in self._file_of

  def __getitem__(self, name: str) -> np.ndarray:
    return self._handle(name).get_tensor(name)

  def dtype(self, name: str) -> str:
    """numpy name of a tensor's dtype, read from the header without loading the tensor."""
    return _DTYPE_NAMES[self._handle(name).get_slice(name).get_dtype()]

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._handle(name).get_slice(name).get_shape())

  def _handle(self, name: str):
    path = self._file_of[name]
    if path not in self._handles:
      if not os.path.exists(path):
        raise FileNotFoundError(f"{INDEX_FILE} in {self.model_dir!r} names shard {path!r}, which is missing")
      self._handles[path] = safe_open(path, "numpy")
    return self._handles[path]


def write_checkpoint(tensors: Iterator[tuple[str, np.ndarray]] | dict, out_dir: str,
                     max_shard_bytes: int = 4 * 2**30):
  """Writes tensors as transformers does: one model.safetensors, or numbered shards plus an index when the
  total passes `max_shard_bytes`. Each file is written under a temporary name and renamed, so a crash never
  leaves a truncated file with the final name."""
  os.makedirs(out_dir, exist_ok=True)
  items = list(tensors.items() if isinstance(tensors, dict) else tensors)
  shards, current, current_bytes = [], {}, 0
  for name, array in items:
    array = np.ascontiguousarray(array)
    if current and current_bytes + array.nbytes > max_shard_bytes:
      shards.append(current)
      current, current_bytes = {}, 0
    current[name] = array
    current_bytes += array.nbytes
  shards.append(current)

  metadata = {"format": "pt"}  # transformers refuses files whose metadata lacks a format
  if len(shards) == 1:
    _write_file(shards[0], os.path.join(out_dir, SINGLE_FILE), metadata)
    _remove_stale(out_dir, keep={SINGLE_FILE})
    return
  weight_map = {}
  for i, shard in enumerate(shards):
    file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    _write_file(shard, os.path.join(out_dir, file), metadata)
    weight_map.update({name: file for name in shard})
  total = sum(a.nbytes for _, a in items)
  _write_json({"metadata": {"total_size": total}, "weight_map": weight_map}, os.path.join(out_dir, INDEX_FILE))
  _remove_stale(out_dir, keep=set(weight_map.values()) | {INDEX_FILE})


def _remove_stale(out_dir, keep):
  """Deletes weights of an earlier save in another layout, as transformers' save_pretrained does: with both
  a single file and an index present, transformers reads the one and CheckpointReader the other."""
  for file in os.listdir(out_dir):
    if file not in keep and (file in (SINGLE_FILE, INDEX_FILE) or _SHARD_FILE.fullmatch(file)):
      os.remove(os.path.join(out_dir, file))


def _write_file(tensors, path, metadata):
  save_file(tensors, path + ".tmp", metadata=metadata)
  os.replace(path + ".tmp", path)


def _write_json(obj, path):
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(path + ".tmp", path)
