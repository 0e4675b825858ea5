"""The Grain input pipeline end to end on a real TFDS build of synthetic videos: host sharding, epochs, packing,
skipping bad records, iterator state, zig-zag and the transfer to a device mesh.

Samples are recognised in the packed rows by their content: each record is decoded once on its own (the
reference), and a packed segment is identified by its token ids *and* the frames that the row holds for it,
so a sample whose frames went to the wrong place, or a record seen twice, does not match.
"""

import collections
import dataclasses
import hashlib
import json
import os

import numpy as np
import pytest
from absl import flags

from hico_jax import VIDEO_TOKEN_ID
from hico_jax.data import annotations, pipeline, synthetic, tfds_longvid
from hico_jax.data import tokenizer as tk

# mp_prefetch workers read an absl flag; unparsed flags raise there (grain#1355, libraries.md §5).
flags.FLAGS.mark_as_parsed()

IGNORE = -100
TOKENS_PER_FRAME = 16
TOKEN_BUDGET, FRAME_BUDGET, IMAGE_SIZE = 512, 16, 64


# ---------------------------------------------------------------------------------------------------------------
# Fixtures: one synthetic set (with bad annotations), its TFDS build, the tokenizer; all built once per module.

@pytest.fixture(scope="module")
def built(tmp_path_factory):
  root = tmp_path_factory.mktemp("pipeline")
  dataset = synthetic.make_dataset(root / "synthetic", num_videos=36, seed=0, size=IMAGE_SIZE,
                                   duration_range=(4.0, 8.0), fps_range=(4, 12), corrupt=4)
  report = tfds_longvid.build(os.fspath(dataset), str(root / "tfds"), log=lambda _: None)
  tk.build_qwen2_tokenizer_json(root / "tokenizer")
  return {"root": root, "dataset": dataset, "report": report, "shards": str(root / "tfds"),
          "tokenizer": str(root / "tokenizer")}


def _config(built, shard_dir=None, **overrides):
  # dynamic_fps1 with 4..8 frames: 4-8 s videos bring 4 or 8 frames (64 or 128 visual tokens), so rows are
  # closed sometimes by the frame budget (4 clips of 4) and sometimes by the token budget (~180 tokens each).
  fields = dict(shards=shard_dir or built["shards"], tokenizer_dir=built["tokenizer"], image_size=IMAGE_SIZE,
                token_budget=TOKEN_BUDGET, frame_budget=FRAME_BUDGET, max_samples_per_row=8,
                sampling="dynamic_fps1", min_frames=4, max_frames=8, num_packing_bins=4, seed=0, num_epochs=1)
  fields.update(overrides)
  return pipeline.DataConfig.from_dict(fields)


def _reference(config):
  """Every record of the dataset decoded on its own: {sample key: record index}, and the samples."""
  source = pipeline.open_source(config)
  decode = pipeline.DecodeSample(config)
  keys, samples = {}, {}
  for i in range(len(source)):
    sample = decode.map(source[i])
    if sample["skip"]:
      continue
    key = _key(sample["input_ids"], sample["frames"])
    assert key not in keys, f"records {keys.get(key)} and {i} decode identically: the key cannot tell them apart"
    keys[key], samples[i] = i, sample
  return keys, samples


def _key(input_ids, frames):
  return hashlib.sha1(np.ascontiguousarray(input_ids, np.int32).tobytes()
                      + np.ascontiguousarray(frames, np.uint8).tobytes()).hexdigest()


def _segments(row):
  """The samples of one packed row (of a batch, no leading batch axis), in order: dicts of the segment's
  input_ids, targets, positions and its frames, which are the row's next (placeholders / 16) frames."""
  out, offset = [], 0
  for s in range(1, int(row["segment_ids"].max(initial=0)) + 1):
    mask = row["segment_ids"] == s
    ids = row["input_ids"][mask]
    n = int(np.sum(ids == VIDEO_TOKEN_ID)) // TOKENS_PER_FRAME
    out.append({"input_ids": ids, "targets": row["targets"][mask], "positions": row["positions"][mask],
                "frames": row["frames"][offset:offset + n], "mask": mask})
    offset += n
  return out


def _rows(batches):
  for batch in batches:
    for r in range(batch["input_ids"].shape[0]):
      yield {k: v[r] for k, v in batch.items() if k != "num_skipped"}


def _sample_order(batches, keys):
  """Record indices of the samples in the order the batches bring them."""
  order = []
  for row in _rows(batches):
    for seg in _segments(row):
      key = _key(seg["input_ids"], seg["frames"])
      assert key in keys, "a packed segment matches no record decoded on its own (tokens or frames misplaced)"
      order.append(keys[key])
  return order


@pytest.fixture(scope="module")
def reference(built):
  return _reference(_config(built))


@pytest.fixture(scope="module")
def epoch(built):
  """One epoch of the default config, one row per batch."""
  return list(pipeline.make_dataset(_config(built), batch_size=1))


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_batches_equal(got, want):
  assert len(got) == len(want)
  for g, w in zip(got, want):
    assert g.keys() == w.keys()
    for k in w:
      np.testing.assert_array_equal(g[k], w[k], err_msg=k)


# ---------------------------------------------------------------------------------------------------------------
# Hosts and epochs

def test_builder_skips_the_detectable_bad_annotations(built):
  skipped = {record_id for _, record_id, _ in built["report"].skipped_ids}
  # The malformed line has no id to read; the builder names it by its position.
  expected = {c["id"] if c["kind"] != "malformed_json" else f"corrupt:{c['line'] - 1}"
              for c in built["dataset"].corrupt}
  assert skipped == expected and len(expected) == 4
  assert sum(built["report"].taken.values()) == 36


def test_two_hosts_see_disjoint_halves_that_cover_the_epoch_once(built, reference):
  keys, samples = reference
  config = _config(built)
  seen = [_sample_order(pipeline.make_dataset(config, batch_size=1, process_index=p, process_count=2), keys)
          for p in range(2)]
  for host in seen:
    assert len(host) == len(set(host)), "a host saw a record twice in one epoch"
  assert not set(seen[0]) & set(seen[1]), "the two hosts share records"
  assert sorted(seen[0] + seen[1]) == sorted(samples) == list(range(36))
  assert [len(h) for h in seen] == [18, 18]


def test_each_epoch_has_a_new_order_of_the_same_records_and_the_seed_fixes_it(built, reference):
  keys, samples = reference
  config = _config(built, num_epochs=2)
  batches = list(pipeline.make_dataset(config, batch_size=1))
  order = _sample_order(batches, keys)
  assert collections.Counter(order) == {i: 2 for i in samples}
  # Packing bins can take a few samples of the next epoch, so each epoch's order is read off the first and
  # second sightings of every record.
  first_seen, second_seen = {}, {}
  for position, i in enumerate(order):
    (second_seen if i in first_seen else first_seen)[i] = position
  epoch1 = sorted(first_seen, key=first_seen.get)
  epoch2 = sorted(second_seen, key=second_seen.get)
  assert sorted(epoch1) == sorted(epoch2)
  assert sum(a == b for a, b in zip(epoch1, epoch2)) < len(epoch1) // 4, (epoch1, epoch2)

  _assert_batches_equal(list(pipeline.make_dataset(config, batch_size=1)), batches)     # same seed: bit-identical
  other = _sample_order(pipeline.make_dataset(dataclasses.replace(config, seed=1), batch_size=1), keys)
  assert other != order


# ---------------------------------------------------------------------------------------------------------------
# Packing

@pytest.mark.parametrize("packing", ["first_fit", "best_fit"])
def test_packed_rows_respect_budgets_segments_and_frame_order(built, reference, epoch, packing):
  keys, samples = reference
  batches = epoch if packing == "first_fit" else list(
      pipeline.make_dataset(_config(built, packing=packing), batch_size=1))
  closed_by = collections.Counter()
  seen = []
  for row in _rows(batches):
    assert row["input_ids"].shape == (TOKEN_BUDGET,) and row["frames"].shape == (FRAME_BUDGET, 64, 64, 3)
    seg_ids = row["segment_ids"]
    used = int(np.sum(seg_ids > 0))
    # Segments are 1, 2, ..., k in one contiguous run each, then padding (segment 0) to the end.
    runs = [s for i, s in enumerate(seg_ids) if i == 0 or s != seg_ids[i - 1]]
    assert runs == list(range(1, len(runs) + 1)) or runs == list(range(1, len(runs))) + [0], runs
    assert np.all(seg_ids[used:] == 0)
    pad = seg_ids == 0
    assert np.all(row["targets"][pad] == IGNORE) and np.all(row["positions"][pad] == 0)
    assert np.all(row["input_ids"][pad] == 0)

    segments = _segments(row)
    num_frames = sum(len(s["frames"]) for s in segments)
    assert np.sum(row["input_ids"] == VIDEO_TOKEN_ID) == TOKENS_PER_FRAME * num_frames
    assert num_frames <= FRAME_BUDGET and used <= TOKEN_BUDGET
    assert not np.any(row["frames"][num_frames:]), "frames past the row's samples are not zero padding"
    assert np.all(row["frames"][:num_frames].reshape(num_frames, -1).max(axis=1) > 0)
    for seg in segments:
      n = len(seg["input_ids"])
      np.testing.assert_array_equal(seg["positions"], np.arange(n))
      # Next-token targets within the sample only: the last token predicts nothing.
      assert seg["targets"][-1] == IGNORE
      shifted = seg["input_ids"][1:]
      assert np.all((seg["targets"][:-1] == shifted) | (seg["targets"][:-1] == IGNORE))
      assert np.any(seg["targets"] >= 0), "a sample with nothing to predict"
      assert not np.any(seg["targets"] == VIDEO_TOKEN_ID)
      index = keys[_key(seg["input_ids"], seg["frames"])]
      np.testing.assert_array_equal(seg["targets"], samples[index]["targets"])
      seen.append(index)
    # Would one more sample of the smallest kind have fitted? Then the row was closed by the other budget.
    closed_by["frames" if num_frames + 4 > FRAME_BUDGET else "tokens"] += 1
  assert sorted(seen) == sorted(samples)
  assert closed_by["frames"] and closed_by["tokens"], f"the data exercise only one budget: {closed_by}"


# ---------------------------------------------------------------------------------------------------------------
# Zig-zag

def test_zigzag_puts_chunks_i_and_2n_minus_1_minus_i_on_shard_i():
  x = np.arange(8).reshape(1, 8)                    # 4 chunks of 2 for 2 shards
  np.testing.assert_array_equal(pipeline.zigzag(x, 2), [[0, 1, 6, 7, 2, 3, 4, 5]])   # chunks 0, 3, 1, 2
  x = np.arange(12).reshape(1, 12)                  # 6 chunks of 2 for 3 shards: 0, 5, 1, 4, 2, 3
  np.testing.assert_array_equal(pipeline.zigzag(x, 3), [[0, 1, 10, 11, 2, 3, 8, 9, 4, 5, 6, 7]])


@pytest.mark.parametrize("num_shards", [1, 2, 3, 4, 8])
def test_unzigzag_inverts_zigzag(num_shards):
  x = np.random.default_rng(num_shards).integers(0, 1000, size=(3, 2 * num_shards * 5, 2))
  z = pipeline.zigzag(x, num_shards)
  np.testing.assert_array_equal(pipeline.unzigzag(z, num_shards), x)
  if num_shards > 1:
    assert not np.array_equal(z, x)


def test_seq_sharded_rows_unzigzag_to_the_unsharded_rows(built, epoch):
  zigzagged = _take(iter(pipeline.make_dataset(_config(built), batch_size=1, seq_shards=2)), 4)
  for z, plain in zip(zigzagged, epoch[:4]):
    for k in ("input_ids", "targets", "segment_ids", "positions"):
      assert not np.array_equal(z[k], plain[k]) or not np.any(plain[k]), k
      np.testing.assert_array_equal(pipeline.unzigzag(z[k], 2), plain[k], err_msg=k)
    np.testing.assert_array_equal(z["frames"], plain["frames"])
    assert z["num_skipped"] == plain["num_skipped"]


def test_seq_shards_must_divide_the_token_budget(built):
  with pytest.raises(ValueError, match="token_budget=510"):
    pipeline.make_dataset(_config(built, token_budget=510), batch_size=1, seq_shards=2)


# ---------------------------------------------------------------------------------------------------------------
# Iterator state

# Two worker processes take ~21 s on 2 cores: slow; in-process reading restores through the same state.
@pytest.mark.parametrize("num_workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_restored_iterator_continues_with_the_identical_batches(built, num_workers):
  config = _config(built, num_workers=num_workers, num_epochs=None)
  dataset = pipeline.make_dataset(config, batch_size=2)
  it = iter(dataset)
  _take(it, 3)
  state = json.loads(json.dumps(it.get_state()))    # what a checkpoint holds is plain JSON
  want = _take(it, 4)
  restored = iter(pipeline.make_dataset(config, batch_size=2))
  restored.set_state(state)
  got = _take(restored, 4)
  _assert_batches_equal(got, want)
  for iterator in (it, restored):
    if hasattr(iterator, "close"):
      iterator.close()


# ---------------------------------------------------------------------------------------------------------------
# Bad input

def _build_dataset(root, name, entries, with_datasets=()):
  """A TFDS build whose YAML lists `with_datasets` (annotations.DatasetSpec) and one dataset `name` of
  (header, media list) entries, written out as annotation lines and media files. Media are not checked while
  building, so bad media reach the pipeline's decoder as they would from a build made with --no_verify."""
  folder = root / name
  (folder / "media").mkdir(parents=True)
  lines = []
  for k, (header, media) in enumerate(entries):
    record = {key: header[key] for key in ("id", "conversations", "start", "end") if key in header}
    if media:
      (folder / "media" / f"{k}.bin").write_bytes(media[0])
      record[header["media_type"]] = f"{k}.bin"
    lines.append(json.dumps(record))
  (folder / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
  listed = [{"json_path": spec.json_path, "data_root": spec.data_root, "sampling_strategy": spec.sampling_strategy}
            for spec in with_datasets] + [{"json_path": f"{name}.jsonl", "data_root": "media"}]
  (folder / "data.yaml").write_text(json.dumps({"datasets": listed}))    # JSON is YAML
  tfds_longvid.build(str(folder / "data.yaml"), str(folder / "tfds"), verify_media=False, log=lambda _: None)
  return str(folder / "tfds")


@pytest.mark.parametrize("vlen", [9, 10, 12])
def test_every_sample_brings_whole_clips_even_where_the_reference_count_is_not(built, tmp_path, vlen):
  """middle sampling with a floor above a video's length takes every frame (the reference's rule), a count
  that need not be whole 4-frame clips; the sample is padded with its last frame, so it never shares a clip
  with the next sample of its row, and its placeholders cover the padded frames."""
  config = _config(built, sampling="middle", num_frames=4, min_frames=64, max_frames=64)
  rng = np.random.default_rng(vlen)
  # Flat frames of distinct grey levels: the codec keeps them apart, and each decoded frame is recognisable.
  levels = rng.permutation(np.arange(20, 240, 10))[:vlen]
  written = np.broadcast_to(levels[:, None, None, None], (vlen, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.uint8)
  path = synthetic.write_video(tmp_path / "odd.mp4", written, fps=4)
  turns = [{"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "Grey."}]
  sample = pipeline.DecodeSample(config).map(
      ({"id": "odd", "dataset": "extra", "media_type": "video", "conversations": turns}, [path.read_bytes()]))
  assert not sample["skip"]
  frames = sample["frames"]
  assert len(frames) == -(-vlen // 4) * 4
  grey = frames.reshape(len(frames), -1).mean(axis=1)
  np.testing.assert_allclose(grey[:vlen], levels, atol=4.9)        # every frame, in order, once (levels 10 apart)
  np.testing.assert_allclose(grey[vlen:], grey[vlen - 1])           # then copies of the last
  assert np.sum(sample["input_ids"] == VIDEO_TOKEN_ID) == TOKENS_PER_FRAME * len(frames)


def test_frame_counts_off_whole_clips_are_config_errors(built):
  for field, value in (("num_frames", 6), ("max_frames", 10), ("frame_budget", 18)):
    with pytest.raises(ValueError, match=rf"data\.{field}={value} must be a multiple of 4"):
      _config(built, sampling="middle", **{"num_frames": 4, field: value})


def test_whole_clips_are_the_vision_towers_clips_given_to_the_data_config(built):
  """The clip length comes from the model (model.vit.clip_frames), never from the data section."""
  fields = dict(shards=built["shards"], tokenizer_dir=built["tokenizer"], frame_budget=24, min_frames=8, max_frames=16)
  assert pipeline.DataConfig.from_dict(fields, clip_frames=8).clip_frames == 8
  with pytest.raises(ValueError, match=r"data\.frame_budget=12 must be a multiple of 8 \(whole clips\)"):
    pipeline.DataConfig.from_dict({**fields, "frame_budget": 12}, clip_frames=8)
  with pytest.raises(ValueError, match=r"data\.clip_frames is the vision tower's: set model\.vit\.clip_frames"):
    pipeline.DataConfig.from_dict({**fields, "clip_frames": 8})


def test_records_failing_at_decode_time_are_skipped_and_counted(built, reference):
  good_keys, good_samples = reference
  videos = built["dataset"].out_dir / "videos"
  video = (videos / "captioning_00000.mp4").read_bytes()
  turns = [{"from": "human", "value": "<image>\nWhat moves?"}, {"from": "gpt", "value": "A circle."}]

  def record(rid, media=video, **header):
    header = {"id": rid, "dataset": "extra", "media_type": "video", "conversations": turns, **header}
    return header, [media] if media is not None else []

  bad = [
      record("truncated_media", media=video[: len(video) // 3]),         # mp4 index (moov) cut off
      record("noise_media", media=np.random.default_rng(0).bytes(4000)),
      record("span_past_the_end", start=100.0, end=120.0),                # no frames in the span
      record("image_record", media_type="image"),                         # data.tile_budget=0: no images
      record("no_image_tag", conversations=[{"from": "human", "value": "What moves?"}, turns[1]]),
  ]
  long_answer = " ".join(["The circle keeps moving."] * 200)            # ~1000 tokens: truncated, not dropped
  good = [
      record("long_answer", conversations=[turns[0], {"from": "gpt", "value": long_answer}]),
      record("text_only", media=None, media_type="text",
             conversations=[{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi."}]),
  ]
  main = annotations.load_dataset_list(os.fspath(built["dataset"]))
  data_dir = _build_dataset(built["root"], "extra", bad + good, with_datasets=main)

  config = _config(built, shard_dir=data_dir)
  keys, samples = _reference(config)
  assert len(samples) == len(good_samples) + len(good)
  # Built without media checks, the synthetic set's truncated videos now also reach the decoder, and fail there.
  failing = len(bad) + sum(c["kind"] == "truncated_video" for c in built["dataset"].corrupt)
  assert len(pipeline.open_source(config)) == len(samples) + failing
  batches = list(pipeline.make_dataset(config, batch_size=1))
  assert sum(int(b["num_skipped"]) for b in batches) == failing
  order = _sample_order(batches, keys)
  assert sorted(order) == sorted(samples), "a good sample was lost or duplicated"
  lengths = {len(seg["input_ids"]) for row in _rows(batches) for seg in _segments(row)}
  assert TOKEN_BUDGET in lengths, "the long conversation did not come through truncated to the budget"


def test_bad_records_at_the_end_of_an_epoch_are_still_counted(built, reference):
  """A bad record last in a finite epoch has no later good sample to carry its count."""
  keys, _ = reference
  good = pipeline.open_source(_config(built))[0]
  bad = [({"id": f"noise{i}", "media_type": "video", "conversations": good[0]["conversations"]},
          [np.random.default_rng(i).bytes(3000)]) for i in range(3)]
  for name, entries, num_good in (("all_bad", bad, 0), ("one_good", [good] + bad, 1)):
    data_dir = _build_dataset(built["root"], name, entries)
    for seed in range(4):       # one good among three bad: most orders end on a bad record
      batches = list(pipeline.make_dataset(_config(built, shard_dir=data_dir, seed=seed), batch_size=1))
      assert sum(int(b["num_skipped"]) for b in batches) == len(bad), (name, seed)
      assert _sample_order(batches, keys) == [0] * num_good     # the good one is record 0 of the main set


# ---------------------------------------------------------------------------------------------------------------
# To the mesh

@pytest.mark.parametrize("mesh_config", [(("data", 2), ("fsdp", 4)), (("data", 2), ("fsdp", 2), ("seq", 2))])
def test_to_global_shards_the_local_batch_over_the_mesh(epoch, mesh_config):
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P
  from hico_jax import sharding
  mesh = sharding.make_mesh(mesh_config)
  local = {k: np.concatenate([b[k] for b in epoch[:8]]) for k in epoch[0] if k != "num_skipped"}
  local["num_skipped"] = np.int32(3)
  out = pipeline.to_global(local, mesh)
  seq = "seq" if dict(mesh_config).get("seq", 1) > 1 else None
  for k in ("input_ids", "targets", "segment_ids", "positions", "frames"):
    array = out[k]
    assert isinstance(array, jax.Array) and array.shape == local[k].shape and array.dtype == local[k].dtype
    spec = P(("data", "fsdp"), seq) if k != "frames" else P(("data", "fsdp"), None, None, None, None)
    assert array.sharding.is_equivalent_to(NamedSharding(mesh, spec), array.ndim), (k, array.sharding)
    np.testing.assert_array_equal(np.asarray(array), local[k])
    rows_per_device = local[k].shape[0] // (mesh.shape["data"] * mesh.shape["fsdp"])
    for shard in array.addressable_shards:
      assert shard.data.shape[0] == rows_per_device
      np.testing.assert_array_equal(np.asarray(shard.data), local[k][shard.index])
  assert "num_skipped" not in out       # a host's own count: the trainer sums it over processes when it logs


def test_skipped_records_are_summed_by_reason_in_one_line_and_listed_in_a_file(tmp_path):
  pipeline.reset_skip_log()
  assert pipeline.skip_summary() == ""
  for i in range(3):
    pipeline._log_skip(f"a/{i}", "ValueError: the plain template takes one human turn")
  pipeline._log_skip("a/0", "ValueError: the plain template takes one human turn")     # a second epoch: once
  pipeline._log_skip("b/7", "VideoDecodeError: truncated")
  line = pipeline.skip_summary(str(tmp_path / "skipped.tsv"))
  assert line.startswith("skipped 4 records: 3 x ValueError: the plain template takes one human turn; "
                         "1 x VideoDecodeError: truncated")
  rows = (tmp_path / "skipped.tsv").read_text().splitlines()
  assert rows == ["a/0\tValueError: the plain template takes one human turn",
                  "a/1\tValueError: the plain template takes one human turn",
                  "a/2\tValueError: the plain template takes one human turn", "b/7\tVideoDecodeError: truncated"]
  pipeline.reset_skip_log()
