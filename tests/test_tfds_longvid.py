"""The TFDS LongVid builder and its Grain source on real mp4 files: the same records, counts and skip reasons
as the ArrayRecord shard builder it replaces, sampling strategies over the annotation's numbering, and no
TensorFlow anywhere."""

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from hico_jax.data import records, shards, tfds_longvid


def _write_mp4(path, frames=12, size=32):
  writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 4.0, (size, size))
  assert writer.isOpened()
  for i in range(frames):
    writer.write(np.full((size, size, 3), 10 * i, np.uint8))
  writer.release()


def _turns(question="<image>\nWhat is it?", answer="A box."):
  return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


@pytest.fixture
def dataset(tmp_path):
  """Two datasets: `good` (5 records, one without a video) and `mixed` (bad records among good ones)."""
  videos = tmp_path / "videos"
  videos.mkdir()
  for i in range(5):
    _write_mp4(videos / f"v{i}.mp4")
  (videos / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(500))
  good = [{"id": f"g{i}", "video": f"v{i}.mp4", "conversations": _turns()} for i in range(4)]
  good.append({"id": "g4", "conversations": _turns("Hello?", "Hi.")})
  (tmp_path / "good.json").write_text(json.dumps(good))
  lines = [json.dumps({"id": "m0", "video": "v0.mp4", "conversations": _turns()}),
           "{not json",
           json.dumps({"id": "m2", "video": "missing.mp4", "conversations": _turns()}),
           json.dumps({"id": "m3", "video": "v1.mp4", "conversations": []}),
           json.dumps({"id": "m4", "video": "corrupt.mp4", "conversations": _turns()}),
           json.dumps({"id": "m5", "video": "v2.mp4", "conversations": _turns(), "start": 0.5, "end": 2.0}),
           json.dumps({"id": "m6", "video": "v3.mp4", "conversations": _turns()[:1]}),
           json.dumps({"id": "m7", "video": ["v1.mp4", "v2.mp4"], "conversations": _turns()}),
           json.dumps({"id": "m8", "image": ["v4.mp4"], "conversations": _turns("<image>\nAnd this?", "Ünïcode.")}),
           json.dumps(["a list, not a record"])]
  (tmp_path / "mixed.jsonl").write_text("\n".join(lines) + "\n")
  (tmp_path / "data.yaml").write_text(
      "datasets:\n"
      "  - {json_path: good.json, data_root: videos, sampling_strategy: all}\n"
      "  - {json_path: mixed.jsonl, data_root: videos, sampling_strategy: 'first:6'}\n")
  return tmp_path


def test_builder_gives_the_records_counts_and_skip_reasons_of_the_shard_builder(dataset):
  old = shards.build(str(dataset / "data.yaml"), str(dataset / "shards"), records_per_shard=2, log=lambda _: None)
  new = tfds_longvid.build(str(dataset / "data.yaml"), str(dataset / "tfds"), log=lambda _: None)
  assert new.taken == old.taken and new.skipped == old.skipped
  assert new.skipped_ids == old.skipped_ids
  for strategies in ({}, {"good": "end:2", "mixed": "all"}, {"good": "random:3", "mixed": "end:50%"}):
    old_source = shards.MixedSource(str(dataset / "shards"), strategies, seed=5)
    new_source = tfds_longvid.LongVidSource(str(dataset / "tfds"), strategies, seed=5)
    assert len(new_source) == len(old_source)
    for i in range(len(old_source)):
      old_header, old_media = records.decode_record(old_source[i])
      new_header, new_media = new_source[i]
      old_source_path = old_header.pop("source")
      assert new_header.pop("source") == ([] if old_source_path is None else
                                          old_source_path if isinstance(old_source_path, list) else [old_source_path])
      assert new_header == old_header
      assert new_media == ([old_media] if old_media else [])
