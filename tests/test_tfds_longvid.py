"""The TFDS LongVid builder and its Grain source on real mp4 files: the records, counts and skip reasons of
the shard builder it replaced (a live comparison with it passed before it was removed; its results are the
hand-written table below), sampling strategies over the annotation's numbering, and no TensorFlow anywhere."""

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from hico_jax.data import tfds_longvid


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
           json.dumps({"id": "m5", "video": "v2.mp4", "conversations": _turns(), "start": 0.1, "end": 2.7}),
           json.dumps({"id": "m6", "video": "v3.mp4", "conversations": _turns()[:1]}),
           json.dumps({"id": "m7", "video": ["v1.mp4", "v2.mp4"], "conversations": _turns()}),
           json.dumps({"id": "m8", "image": ["v4.mp4"], "conversations": _turns("<image>\nAnd this?", "Ünïcode.")}),
           json.dumps(["a list, not a record"]),
           json.dumps({"id": "m10", "video": "v0.mp4", "conversations": _turns(), "start": "soon"})]
  (tmp_path / "mixed.jsonl").write_text("\n".join(lines) + "\n")
  (tmp_path / "data.yaml").write_text(
      "datasets:\n"
      "  - {json_path: good.json, data_root: videos, sampling_strategy: all}\n"
      "  - {json_path: mixed.jsonl, data_root: videos, sampling_strategy: 'first:6'}\n")
  return tmp_path


def test_tensorflow_is_not_importable_and_the_builder_and_source_never_need_it(dataset):
  with pytest.raises(ImportError):
    import tensorflow  # noqa: F401  # pylint: disable=unused-import,import-outside-toplevel
  # In a fresh interpreter: build, read, and check that nothing imported tensorflow on the way.
  script = ("import sys; from hico_jax.data import tfds_longvid as t; "
            f"t.build({str(dataset / 'data.yaml')!r}, {str(dataset / 'tfds')!r}, log=lambda _: None); "
            f"s = t.LongVidSource({str(dataset / 'tfds')!r}); [s[i] for i in range(len(s))]; "
            "assert not [m for m in sys.modules if m == 'tensorflow' or m.startswith('tensorflow.')], 'tf imported'")
  env = dict(os.environ, PYTHONPATH=os.getcwd())
  subprocess.run([sys.executable, "-c", script], check=True, env=env, capture_output=True)


def test_prepared_dataset_records_counts_splits_and_the_skip_report(dataset):
  report = tfds_longvid.build(str(dataset / "data.yaml"), str(dataset / "tfds"), log=lambda _: None)
  path = tfds_longvid.prepared_dir(str(dataset / "tfds"))
  assert path.endswith(os.path.join("long_vid", "data", "1.0.0"))
  assert not [p for p in os.listdir(dataset / "tfds" / "long_vid" / "data") if p.startswith("incomplete")]
  info = json.loads(open(os.path.join(path, "dataset_info.json")).read())
  counts = {s["name"]: sum(int(n) for n in s["shardLengths"]) for s in info["splits"]}
  assert counts == {"good": 5, "mixed": 3}            # hand count: m0, m5, m8 of mixed survive
  assert info["fileFormat"] == "array_record"
  metadata = json.loads(open(os.path.join(path, "metadata.json")).read())
  # The hand-written table: every bad record of the fixture, named, with its reason (annotation order).
  table = [("mixed", "mixed:1", "not valid JSON"), ("mixed", "m2", "video file missing"),
           ("mixed", "m3", "empty or missing conversations"), ("mixed", "m4", "video"),
           ("mixed", "m6", "conversation ends without an answer"), ("mixed", "m7", "video lists of 2 files"),
           ("mixed", "mixed:9", "not a JSON object"), ("mixed", "m10", "start 'soon' is not a number of seconds")]
  assert len(metadata["skipped"]) == len(table) == len(report.skipped_ids)
  for (dataset_name, record_id, reason), (want_name, want_id, want_reason) in zip(metadata["skipped"], table):
    assert (dataset_name, record_id) == (want_name, want_id) and want_reason in reason
  assert [d["kept"] for d in metadata["datasets"]] == [[0, 1, 2, 3, 4], [0, 5, 8]]
  source = tfds_longvid.LongVidSource(str(dataset / "tfds"))          # mixed's first:6 keeps m0 and m5
  assert [source[i][0]["id"] for i in range(len(source))] == ["g0", "g1", "g2", "g3", "g4", "m0", "m5"]
  narrowed = tfds_longvid.LongVidSource(str(dataset / "tfds"), {"good": "end:2", "mixed": "first:1"})
  assert [narrowed[i][0]["id"] for i in range(len(narrowed))] == ["g3", "g4", "m0"]
  header, media = source[6]
  assert (header["start"], header["end"]) == (0.1, 2.7) and media == [(dataset / "videos" / "v2.mp4").read_bytes()]
  assert source[4] == ({"id": "g4", "index": 4, "dataset": "good", "media_type": "text", "source": [],
                        "conversations": _turns("Hello?", "Hi.")}, [])
  header, media = tfds_longvid.LongVidSource(str(dataset / "tfds"), {"mixed": "end:3"})[5]
  assert header["media_type"] == "image" and header["conversations"][1]["value"] == "Ünïcode."
  assert media == [(dataset / "videos" / "v4.mp4").read_bytes()] and header["source"] == ["v4.mp4"]
  with pytest.raises(ValueError, match="unknown dataset"):
    tfds_longvid.LongVidSource(str(dataset / "tfds"), {"nope": "all"})
  with pytest.raises(FileNotFoundError, match="build it with tools/build_shards.py"):
    tfds_longvid.LongVidSource(str(dataset))


def test_the_fast_record_parser_agrees_with_tfds_decoding(dataset):
  import tensorflow_datasets as tfds
  tfds_longvid.build(str(dataset / "data.yaml"), str(dataset / "tfds"), log=lambda _: None)
  builder = tfds.builder_from_directory(tfds_longvid.prepared_dir(str(dataset / "tfds")))
  decoded = builder.as_data_source()
  raw = builder.as_data_source(deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
  seen = 0
  for split in ("good", "mixed"):
    for i in range(len(decoded[split])):
      header, media = tfds_longvid.parse_record(raw[split][i])
      assert (header, media) == tfds_longvid.to_header(decoded[split][i])
      seen += 1
      if header["id"] == "m5":
        assert (header["start"], header["end"]) == (0.1, 2.7)      # float64 exactly, not float32's 0.100000001
  assert seen == 8


def _protobuf_features(serialized):
  """The reference: protobuf's own parser (upb) on the same bytes; float lists, no part of our features, as
  empty."""
  from tensorflow_datasets.proto import tf_example_pb2
  out = {}
  for key, feature in tf_example_pb2.Example.FromString(serialized).features.feature.items():
    kind = feature.WhichOneof("kind")
    out[key] = list(getattr(feature, kind).value) if kind in ("bytes_list", "int64_list") else []
  return out


def _varint_bytes(value):
  out = bytearray()
  while value >= 0x80:
    out.append(value & 0x7F | 0x80)
    value >>= 7
  return bytes(out + bytes([value]))


def test_the_record_parser_reads_what_protobuf_reads():
  from tensorflow_datasets.proto import tf_example_pb2
  example = tf_example_pb2.Example()
  feature = example.features.feature
  feature["id"].bytes_list.value.append("ünï-".encode() * 40)                   # length varint of 2 bytes
  feature["index"].int64_list.value.extend([300, 2**40, -5, 0])                 # multi-byte and negative
  feature["media"].bytes_list.value.extend([os.urandom(70_000), b"", os.urandom(130)])
  feature["score"].float_list.value.extend([0.5, 2.0])                          # not ours: no values
  feature["empty"].bytes_list.SetInParent()
  feature["unset"].SetInParent()                                                # a Feature with no list
  serialized = example.SerializeToString()
  assert tfds_longvid._example_features(serialized) == _protobuf_features(serialized)
  # Valid wire forms protobuf's serializer does not write: an int64 list not packed, a value before its key.
  unpacked = bytes([0x1A, 5, 0x08, 0x7B, 0x08, 0xAC, 0x02])                    # int64_list: 123, 300 one by one
  entry = bytes([0x12, len(unpacked)]) + unpacked + b"\x0a\x05count"
  body = example.features.SerializeToString() + b"\x0a" + bytes([len(entry)]) + entry
  handmade = b"\x0a" + _varint_bytes(len(body)) + body                       # Example.features, one more entry
  assert tfds_longvid._example_features(handmade) == _protobuf_features(handmade)
  assert _protobuf_features(handmade)["count"] == [123, 300]
  with pytest.raises(ValueError, match="not a tf.train.Example"):
    tfds_longvid._example_features(b"\x12\x00")


def test_the_source_reads_what_tfds_data_source_serves_from_splits_of_several_files(dataset):
  import tensorflow_datasets as tfds
  config = tfds_longvid.LongVidConfig(name="data", annotation_yaml="data.yaml")
  builder = tfds_longvid.LongVid(data_dir=str(dataset / "tfds"), config=config, file_format="array_record",
                                 log=lambda _: None)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(dataset), num_shards=3))
  assert len(builder.info.splits["good"].filepaths) == 3
  decoded = tfds.builder_from_directory(builder.data_dir).as_data_source()     # what tfds.data_source serves
  # (split, position in it) of each record the strategies choose: mixed keeps annotation lines 0, 5 and 8.
  for strategies, want in (({}, [("good", i) for i in range(5)] + [("mixed", 0), ("mixed", 1)]),
                           ({"good": "end:3", "mixed": "end:3"}, [("good", i) for i in (2, 3, 4)] + [("mixed", 2)])):
    source = tfds_longvid.LongVidSource(str(dataset / "tfds"), strategies)
    assert [source[i] for i in range(len(source))] == [tfds_longvid.to_header(decoded[split][i]) for split, i in want]
