"""ArrayRecord shards: writing them from annotations, and reading them back as one mixed source.

A shard directory holds, per dataset, `<name>.array_record-KKKKK-of-NNNNN` files of records
(hico_jax.data.records), `<name>.indices.npy` (the annotation index of every record kept, so sampling
strategies apply to the annotation's own numbering even after bad records were dropped), and one
`manifest.json`, written last. Every file is written under a temporary name and renamed when complete, so
a crash never leaves a half-written shard or a manifest naming one.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os

import numpy as np
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from hico_jax.data import annotations, records

MANIFEST = "manifest.json"


@dataclasses.dataclass
class BuildReport:
  taken: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)   # reason -> count
  skipped_ids: list = dataclasses.field(default_factory=list)                            # (dataset, id, reason)

  def summary(self) -> str:
    lines = [f"{name}: {count} records" for name, count in sorted(self.taken.items())]
    lines.append(f"taken {sum(self.taken.values())}, skipped {sum(self.skipped.values())}")
    lines += [f"  skipped {count}: {reason}" for reason, count in self.skipped.most_common()]
    return "\n".join(lines)


def _media(record: dict, spec: annotations.DatasetSpec) -> tuple[str, list[str]]:
  """(media type, paths) of a record: one video, one or several images, or none (text)."""
  for kind in ("video", "image"):
    if kind in record:
      value = record[kind]
      if isinstance(value, list):
        if not value or (kind == "video" and len(value) != 1):
          raise ValueError(f"{kind} lists of {len(value)} files are not supported (one video per sample, "
                           "one or more images)")
      else:
        value = [value]
      if not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{kind} paths must be non-empty strings, got {value!r}")
      return kind, [os.path.join(spec.data_root, v) for v in value]
  return "text", []


def _read_bytes(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def _readable_video(path: str) -> str | None:
  """Why OpenCV cannot read a first frame of the video, or None when it can."""
  import cv2  # only the builder needs it
  capture = cv2.VideoCapture(path)
  try:
    if not capture.isOpened():
      return "video cannot be opened"
    ok, _ = capture.read()
    return None if ok else "video has no decodable frame"
  finally:
    capture.release()


def build(yaml_path: str, out_dir: str, *, records_per_shard: int = 512, verify_media: bool = True,
          log=print) -> BuildReport:
  """Shards every dataset of a YAML list into out_dir; returns what was taken and skipped, and why."""
  specs = annotations.load_dataset_list(yaml_path)
  os.makedirs(out_dir, exist_ok=True)
  report, manifest = BuildReport(), {"version": 1, "datasets": []}
  for spec in specs:
    paths, kept, num_raw = [], [], 0
    writer, in_shard = None, 0

    def skip(index, record_id, reason):
      report.skipped[reason] += 1
      report.skipped_ids.append((spec.name, record_id, reason))
      log(f"skipped {spec.name} record {record_id} (#{index}): {reason}")

    for index, record, error in annotations.read_records(spec.json_path):
      num_raw = index + 1
      record_id = (record or {}).get("id", f"{spec.name}:{index}")
      reason = error or annotations.check_conversations(record)
      media = None
      if reason is None:
        try:
          media_type, media_paths = _media(record, spec)
        except ValueError as e:
          media_type, media_paths, reason = None, [], str(e)
      if reason is None and media_paths:
        missing = [p for p in media_paths if not os.path.isfile(p)]
        if missing:
          reason = f"{media_type} file missing: {missing[0]}"
        elif verify_media and media_type == "video":
          reason = _readable_video(media_paths[0])
        if reason is None:
          media = [_read_bytes(p) for p in media_paths]
      if reason is not None:
        skip(index, record_id, reason)
        continue
      header = {"id": str(record_id), "index": index, "dataset": spec.name, "media_type": media_type,
                "conversations": record["conversations"], "source": record.get(media_type)}
      for key in ("start", "end"):
        if record.get(key) is not None:
          header[key] = float(record[key])
      if writer is None or in_shard == records_per_shard:
        if writer is not None:
          writer.close()
        paths.append(os.path.join(out_dir, f"{spec.name}.array_record-{len(paths):05d}.tmp"))
        writer, in_shard = ArrayRecordWriter(paths[-1], "group_size:1"), 0
      writer.write(records.encode_record(header, media))
      in_shard += 1
      kept.append(index)
    if writer is not None:
      writer.close()

    final = []
    for k, path in enumerate(paths):
      final.append(f"{spec.name}.array_record-{k:05d}-of-{len(paths):05d}")
      os.replace(path, os.path.join(out_dir, final[-1]))
    np.save(os.path.join(out_dir, f"{spec.name}.indices.tmp.npy"), np.asarray(kept, np.int64))
    os.replace(os.path.join(out_dir, f"{spec.name}.indices.tmp.npy"), os.path.join(out_dir, f"{spec.name}.indices.npy"))
    report.taken[spec.name] = len(kept)
    manifest["datasets"].append({"name": spec.name, "json_path": spec.json_path, "num_raw": num_raw,
                                 "num_records": len(kept), "sampling_strategy": spec.sampling_strategy,
                                 "shards": final, "indices": f"{spec.name}.indices.npy"})
  with open(os.path.join(out_dir, MANIFEST + ".tmp"), "w") as f:
    json.dump(manifest, f, indent=2)
  os.replace(os.path.join(out_dir, MANIFEST + ".tmp"), os.path.join(out_dir, MANIFEST))
  return report


class MixedSource:
  """Random access over the records that each dataset's sampling strategy keeps, datasets concatenated
  in manifest order (the reference concatenates its sampled lists the same way). Picklable, so Grain's
  worker processes can each open the shards."""

  def __init__(self, shard_dir: str, strategies: dict[str, str] | None = None, seed: int = 0):
    path = os.path.join(shard_dir, MANIFEST)
    if not os.path.exists(path):
      raise FileNotFoundError(f"no {MANIFEST} in shard directory {shard_dir!r}: build it with tools/build_shards.py")
    with open(path) as f:
      self.manifest = json.load(f)
    self.shard_dir, strategies = shard_dir, strategies or {}
    unknown = sorted(set(strategies) - {d["name"] for d in self.manifest["datasets"]})
    if unknown:
      raise ValueError(f"sampling strategies name unknown dataset(s) {unknown}")
    parts = []
    self._files = []
    for number, dataset in enumerate(self.manifest["datasets"]):
      kept = np.load(os.path.join(shard_dir, dataset["indices"]), allow_pickle=False)
      chosen = annotations.select(dataset["num_raw"], strategies.get(dataset["name"], dataset["sampling_strategy"]),
                                  seed)
      position = np.searchsorted(kept, chosen)
      present = (position < len(kept)) & (kept[np.minimum(position, len(kept) - 1)] == chosen) if len(kept) else \
          np.zeros(len(chosen), bool)
      parts.append(np.stack([np.full(present.sum(), number), position[present]], axis=1))
      self._files.append([os.path.join(shard_dir, s) for s in dataset["shards"]])
    self._index = np.concatenate(parts) if parts else np.zeros((0, 2), np.int64)
    self._readers = None

  def __len__(self) -> int:
    return len(self._index)

  def __getitem__(self, i: int) -> bytes:
    dataset, position = self._index[i]
    if self._readers is None:        # opened lazily, once per process
      self._readers = [[ArrayRecordReader(p) for p in files] for files in self._files]
      self._starts = [np.cumsum([0] + [r.num_records() for r in readers]) for readers in self._readers]
    shard = int(np.searchsorted(self._starts[dataset], position, side="right") - 1)
    return self._readers[dataset][shard].read([int(position - self._starts[dataset][shard])])[0]

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_readers"] = None          # file handles do not cross process boundaries
    return state
