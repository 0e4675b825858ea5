"""The benchmark package (hico_jax/bench, behind tools/benchmark.py) without an accelerator: the packed row the
mixed case trains on, laid out as counted by hand; a command line's cases in the order they run; the figures a
result's times give. The cases' timed runs are GPU work (docs/benchmarks.md)."""

import argparse

import numpy as np
import pytest

from hico_jax import presets
from hico_jax.bench import cases, mixed, report, train_step
from hico_jax.models.hico import HiCoConfig
from hico_jax.tokens import IGNORE_INDEX, VIDEO_TOKEN_ID


def test_the_mixed_row_packs_videos_then_images_with_their_tokens_indexed_videos_first():
  config = HiCoConfig.from_dict(dict(presets.hico("tiny")))          # 64 tokens a clip of 4 frames
  row = mixed.packed_row(config, np.random.default_rng(0), videos=2, frames=8, images=1, tiles=3, text_tokens=20)
  # Samples: two videos of 2 clips (128 tokens each), one image of 3 tiles, each with 20 text tokens. A 112 px
  # tile of 16 px patches has 7 x 7 = 49 patches, fewer than 64, so it keeps all 49 (147 for the image).
  lengths = [128 + 20, 128 + 20, 147 + 20]
  ids, segments, targets = row["input_ids"][0], row["segment_ids"][0], row["targets"][0]
  assert ids.shape == (sum(lengths),) and row["frames"].shape == (1, 16, 112, 112, 3)
  assert row["tiles"].shape == (1, 3, 112, 112, 3)
  starts = np.cumsum([0] + lengths[:-1])
  np.testing.assert_array_equal(segments, np.repeat([1, 2, 3], lengths))
  np.testing.assert_array_equal(row["positions"][0], np.concatenate([np.arange(n) for n in lengths]))
  visual = [128, 128, 147]
  expected_index = np.zeros(sum(lengths), np.int32)
  for start, count, first in zip(starts, visual, [0, 128, 256]):
    placeholders = np.arange(start + 8, start + 8 + count)
    assert (ids[placeholders] == VIDEO_TOKEN_ID).all() and (ids[start:start + 8] >= 0).all()
    expected_index[placeholders] = first + np.arange(count)     # video tokens first, then the tiles' tokens
  np.testing.assert_array_equal(row["visual_index"][0], expected_index)
  # Each position's target is the next token of its own sample; none across a sample's end, none for video.
  for position in range(len(ids) - 1):
    if position + 1 in starts:
      assert targets[position] == IGNORE_INDEX
    elif ids[position] == VIDEO_TOKEN_ID:
      assert targets[position] == IGNORE_INDEX
    else:
      assert targets[position] == ids[position + 1]


def test_a_video_only_row_has_no_tiles_and_the_single_row_case_one_segment():
  config = HiCoConfig.from_dict(dict(presets.hico("tiny")))
  row = mixed.packed_row(config, np.random.default_rng(0), videos=1, frames=4, images=0, tiles=5, text_tokens=16)
  assert "tiles" not in row and "visual_index" not in row and row["input_ids"].shape == (1, 64 + 16)
  single = train_step.video_row(config, frames=8, text_tokens=32, rng=np.random.default_rng(0))
  assert single["input_ids"].shape == (1, 128 + 32) and (single["segment_ids"] == 1).all()
  assert (single["input_ids"][0, 8:136] == VIDEO_TOKEN_ID).all() and single["frames"].shape == (1, 8, 112, 112, 3)


def _args(section, **overrides):
  defaults = dict(section=section, warmup=2, iters=5, frameworks=["jax", "torch"], presets=["hico_2b"],
                  frames=[64, 256], remat=["dots_attn"], vit_remat=["full", "attn"], vit_norm="xla", no_options=False,
                  text_tokens=512, loss_chunk=None, encode_chunk=None, vit_block_loop=["auto"], videos_per_row=2,
                  images_per_row=4, tiles_per_image=5, image_size=None, seq_lens=[4096], param_dtype="float32",
                  param_dtype_7b="bfloat16")
  return argparse.Namespace(**{**defaults, **overrides})


def test_a_command_line_expands_to_every_combination_in_order():
  train = cases.expand(_args("train"))
  assert [(c["frames"], c["vit_remat"]) for c in train] == [(64, "full"), (64, "attn"), (256, "full"), (256, "attn")]
  mixed_cases = cases.expand(_args("mixed", frames=[64], vit_remat=["full"]))
  assert [c["images"] for c in mixed_cases] == [0, 4]                  # the video-only row beside the mixed one
  llm = cases.expand(_args("llm", presets=["qwen2_5_1_5b", "qwen2_7b"], remat=["dots_attn", "full"]))
  assert [(c["preset"], c["framework"], c.get("remat"), c.get("param_dtype")) for c in llm] == [
      ("qwen2_5_1_5b", "jax", "dots_attn", "float32"), ("qwen2_5_1_5b", "jax", "full", "float32"),
      ("qwen2_5_1_5b", "torch", None, None), ("qwen2_7b", "jax", "dots_attn", "bfloat16"),
      ("qwen2_7b", "jax", "full", "bfloat16"), ("qwen2_7b", "torch", None, None)]
  assert all(c["section"] == "llm" and c["seq_len"] == 4096 and c["loss_chunk"] == 4096 for c in llm)
  assert all((c["section"], c["framework"]) in cases.RUNNERS for c in train + mixed_cases + llm)


def test_a_result_gives_its_median_rate_and_its_row_in_the_table():
  result = {"section": "train", "framework": "jax", "preset": "hico_2b", "frames": 64, "remat": "dots_attn",
            "vit_remat": "full", "tokens": 1536, "supervised": 511, "times": [2.0, 0.5, 1.0], "peak_gib": 30.0}
  summary = report.summarise(result)
  assert summary["median_s"] == 1.0 and summary["tokens_per_s"] == pytest.approx(1536.0)
  assert summary["tflops_per_s"] == pytest.approx(summary["mfu"] * 989)
  assert report.table([summary]).splitlines()[-1].startswith(
      "| hico_2b | 64 | 1536 | vit full, llm dots_attn | 1.000 | 1,536 |")
  failed = report.summarise({**result, "error": "out of memory"})
  assert "median_s" not in failed and "out of memory" in report.table([failed]).splitlines()[-1]
