"""The train step on rows mixing images and videos: the loss it takes is the loss of each sample alone summed
(packing cross-talk would change it), and zig-zagging the rows for sequence parallelism changes nothing."""

import numpy as np
import optax
import jax
import pytest

from hico_jax import VIDEO_TOKEN_ID, presets
from hico_jax.data import image as image_io, image_samples, order, pipeline
from hico_jax.models import hico
from hico_jax.train import step as train_step
from tests.random_params import random_hico_params

SIZE, VOCAB = 128, 320      # 8x8 patches a tile: 64 tokens, the merge a no-op for tiles and 4:1 for clips


@pytest.fixture(scope="module")
def tiny():
  config = hico.HiCoConfig.from_dict({
      "vit": dict(image_size=SIZE, width=64, depth=1, num_heads=1, mlp_dim=128, dtype="float32"),
      "llm": dict(presets.llm("tiny", dtype="float32", vocab_size=VOCAB, num_layers=1)), "encode_chunk": 4})
  return config, random_hico_params(config, seed=11)


def _sample(rng, prefix, visual, suffix, tiles=None, orders=()):
  ids = np.concatenate([rng.integers(1, VOCAB, prefix), np.full(visual, VIDEO_TOKEN_ID),
                        rng.integers(1, VOCAB, suffix)]).astype(np.int32)
  targets = np.concatenate([ids[1:], [-100]]).astype(np.int32)
  targets[:prefix + visual - 1] = -100
  return {"input_ids": ids, "targets": targets, "image_order": image_samples.image_order(ids, list(orders)),
          "tiles": tiles if tiles is not None else np.zeros((0, SIZE, SIZE, 3), np.uint8)}


def _rows(rng):
  """Row 0: an anyres image (2x1 grid, 3 tiles), then a 4-frame video. Row 1: two padded images, then text."""
  picture = (rng.integers(0, 256, (SIZE, 2 * SIZE, 3))).astype(np.uint8)
  tiles, grid = image_io.anyres_tiles(image_io.as_pil(picture), SIZE)
  image = _sample(rng, 5, 192, 7, tiles, [image_io.anyres_token_order(grid)])
  video = _sample(rng, 4, 64, 6)
  frames = rng.integers(0, 256, (4, SIZE, SIZE, 3), dtype=np.uint8)
  pair_tiles = rng.integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
  pair = _sample(rng, 3, 128, 5, pair_tiles, [np.arange(64), 64 + np.arange(64)])
  text = _sample(rng, 9, 0, 4)
  return [[(image, None), (video, frames)], [(pair, None), (text, None)]]


def _pack(rows, length=288, frame_budget=8, tile_budget=4):
  """Packed rows as Grain's packer leaves them (zeros after the samples), then FinishBatch."""
  batch = {k: np.zeros((len(rows), length), np.int32) for k in ("input_ids", "targets", "image_order",
                                                                "input_ids_segment_ids", "input_ids_positions")}
  batch["frames"] = np.zeros((len(rows), frame_budget, SIZE, SIZE, 3), np.uint8)
  batch["tiles"] = np.zeros((len(rows), tile_budget, SIZE, SIZE, 3), np.uint8)
  batch["num_skipped"] = np.zeros((len(rows), 1), np.int32)
  for r, samples in enumerate(rows):
    at = frame_at = tile_at = 0
    for s, (sample, frames) in enumerate(samples):
      n = len(sample["input_ids"])
      for key in ("input_ids", "targets", "image_order"):
        batch[key][r, at:at + n] = sample[key]
      batch["input_ids_segment_ids"][r, at:at + n] = s + 1
      batch["input_ids_positions"][r, at:at + n] = np.arange(n)
      batch["tiles"][r, tile_at:tile_at + len(sample["tiles"])] = sample["tiles"]
      tile_at += len(sample["tiles"])
      if frames is not None:
        batch["frames"][r, frame_at:frame_at + len(frames)] = frames
        frame_at += len(frames)
      at += n
  return batch


def _alone_loss_sums(config, params, sample, frames):
  model = hico.HiCo(config)
  ids, targets = sample["input_ids"][None], sample["targets"][None]
  video = images = index = None
  if frames is not None:
    video = train_step.normalize_frames(frames)[None, None]
  if len(sample["tiles"]):
    images = train_step.normalize_frames(sample["tiles"])[None]
    index = np.maximum(sample["image_order"], 0)[None]
  apply = jax.jit(lambda p, i, t, v, im, ix: model.apply({"params": p}, i, t, v, images=im, visual_index=ix,
                                                         method=hico.HiCo.loss_sums))
  return apply(params, ids, targets, video, images, index)


def _assert_step_loss_is_the_samples_alone(config, params, rows, batch, seq_shards):
  """The train step's loss and token count on the packed batch equal the sums of each sample run alone."""
  step = train_step.make_train_step(hico.HiCo(config), optax.sgd(0.0), jax.tree.map(lambda _: False, params),
                                    seq_shards=seq_shards)
  _, metrics = jax.jit(step)(train_step.init_state(params, optax.sgd(0.0)),
                             {k: v for k, v in batch.items() if k != "num_skipped"})
  total = count = 0.0
  for samples in rows:
    for sample, frames in samples:
      t, c = _alone_loss_sums(config, params, sample, frames)
      total, count = total + float(t), count + float(c)
  assert float(metrics["num_tokens"]) == count
  np.testing.assert_allclose(float(metrics["loss"]), total / count, rtol=1e-5)


# One shard is ~20 s on 2 cores: slow; two shards run the same rows through the sequence-parallel step.
@pytest.mark.parametrize("seq_shards", [pytest.param(1, marks=pytest.mark.slow), 2])
def test_mixed_rows_take_the_summed_loss_of_their_samples_alone(tiny, seq_shards):
  config, params = tiny
  rows = _rows(np.random.default_rng(0))
  batch = pipeline._finish_batch(_pack(rows), seq_shards, tokens_per_frame=16)
  if seq_shards > 1:       # the index moved with its tokens
    np.testing.assert_array_equal(order.unzigzag(batch["visual_index"], seq_shards),
                                  pipeline._finish_batch(_pack(rows), 1, tokens_per_frame=16)["visual_index"])
  _assert_step_loss_is_the_samples_alone(config, params, rows, batch, seq_shards)


def test_rows_of_pictures_alone_take_no_frames_and_the_summed_loss_of_their_samples(tiny):
  """A stage of pictures only (data.frame_budget 0, the embedded default's stage 1): rows carry no frames, the
  step encodes no video, and the tiles' tokens are the row's only visual tokens."""
  config, params = tiny
  rows = [[(sample, None) for sample, frames in samples if frames is None] for samples in _rows(np.random.default_rng(1))]
  batch = pipeline._finish_batch(_pack(rows, frame_budget=0), 1, tokens_per_frame=16)
  assert batch["frames"].shape[1] == 0
  _assert_step_loss_is_the_samples_alone(config, params, rows, batch, seq_shards=1)
