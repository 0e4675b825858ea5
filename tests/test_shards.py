"""Shard records, annotation sampling strategies, and the shard builder/reader on real mp4 files."""

import json
import math
import os

import cv2
import numpy as np
import pytest

from hico_jax.data import annotations, records, shards


def _write_mp4(path, frames=12, size=32):
  writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 4.0, (size, size))
  assert writer.isOpened()
  for i in range(frames):
    writer.write(np.full((size, size, 3), 10 * i, np.uint8))
  writer.release()


def _turns(question="<image>\nWhat is it?", answer="A box."):
  return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def test_record_round_trip_keeps_header_and_media_bytes():
  header = {"id": "v1", "media_type": "video", "conversations": _turns(), "start": 1.5}
  media = bytes(range(256)) * 3
  decoded_header, decoded_media = records.decode_record(records.encode_record(header, media))
  assert decoded_header == header and decoded_media == media


@pytest.mark.parametrize("data,message", [
    (b"garbage bytes", "not a hico record"),
    (records.MAGIC + b"\x05\x00", "truncated inside its header length"),
    (records.MAGIC + (100).to_bytes(4, "little") + b"{}", "truncated"),
    (records.MAGIC + (3).to_bytes(4, "little") + b"{x}", "not valid JSON"),
])
def test_malformed_records_are_refused_with_the_reason(data, message):
  with pytest.raises(records.RecordError, match=message):
    records.decode_record(data)


def _reference_select(n, strategy):
  """The reference loader's rule, transcribed: N or ceil(P% of n); first / end slices."""
  if strategy == "all":
    return list(range(n))
  kind, number = strategy.split(":")
  count = math.ceil(int(number[:-1]) * n / 100) if "%" in number else int(number)
  items = list(range(n))
  return items[:count] if kind == "first" else items[-count:] if count else []


@pytest.mark.parametrize("n", [0, 1, 7, 100, 101])
@pytest.mark.parametrize("strategy", ["all", "first:3", "first:50%", "end:5", "end:33%", "first:100%"])
def test_sampling_strategies_follow_the_reference_rules(n, strategy):
  assert annotations.select(n, strategy).tolist() == _reference_select(n, strategy)


def test_random_strategy_is_seeded_sorted_and_sized():
  picked = annotations.select(100, "random:25%", seed=3)
  assert len(picked) == 25 and np.all(np.diff(picked) > 0)
  np.testing.assert_array_equal(picked, annotations.select(100, "random:25%", seed=3))
  with pytest.raises(ValueError, match="unknown sampling_strategy"):
    annotations.select(10, "middle:3")


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
           json.dumps({"id": "m6", "video": "v3.mp4", "conversations": _turns()[:1]})]
  (tmp_path / "mixed.jsonl").write_text("\n".join(lines) + "\n")
  (tmp_path / "data.yaml").write_text(
      "datasets:\n"
      "  - {json_path: good.json, data_root: videos, sampling_strategy: all}\n"
      "  - {json_path: mixed.jsonl, data_root: videos, sampling_strategy: 'first:6'}\n")
  return tmp_path


def test_build_takes_good_records_and_counts_each_bad_one_with_its_reason(dataset):
  out = dataset / "shards"
  report = shards.build(str(dataset / "data.yaml"), str(out), records_per_shard=2, log=lambda _: None)
  assert report.taken == {"good": 5, "mixed": 2}
  reasons = {record_id: reason for _, record_id, reason in report.skipped_ids}
  assert set(reasons) == {"mixed:1", "m2", "m3", "m4", "m6"}
  assert "not valid JSON" in reasons["mixed:1"] and "missing" in reasons["m2"]
  assert "empty" in reasons["m3"] and "video" in reasons["m4"] and "without an answer" in reasons["m6"]
  assert not [f for f in os.listdir(out) if ".tmp" in f]            # every file under its final name
  manifest = json.loads((out / "manifest.json").read_text())
  assert [len(d["shards"]) for d in manifest["datasets"]] == [3, 1]
  assert manifest["datasets"][1]["num_raw"] == 7


def test_mixed_source_applies_strategies_to_the_annotation_numbering(dataset):
  out = dataset / "shards"
  shards.build(str(dataset / "data.yaml"), str(out), records_per_shard=2, log=lambda _: None)
  source = shards.MixedSource(str(out))
  ids = [records.decode_record(source[i])[0]["id"] for i in range(len(source))]
  # mixed keeps m0 and m5, but first:6 keeps raw records 0..5 only, of which m0 and m5 survived.
  assert ids == ["g0", "g1", "g2", "g3", "g4", "m0", "m5"]
  header, media = records.decode_record(source[6])
  assert header["start"] == 0.5 and header["end"] == 2.0
  assert media == (dataset / "videos" / "v2.mp4").read_bytes()
  narrowed = shards.MixedSource(str(out), {"good": "end:2", "mixed": "first:1"})
  assert [records.decode_record(narrowed[i])[0]["id"] for i in range(len(narrowed))] == ["g3", "g4", "m0"]
  with pytest.raises(ValueError, match="unknown dataset"):
    shards.MixedSource(str(out), {"nope": "all"})
