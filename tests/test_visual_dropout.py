"""Progressive visual dropout: torch's linspace rule reproduced on device in any token order; ratios of 1 change
nothing; the masked form (what packing and sequence parallelism use) equals the compacted form (what saves the
FLOPs), packed and padded, at inference and in training with targets moving with the tokens; generation through
a cache that holds only the kept tokens equals re-running the whole sequence; training with dropout on an
8-device mesh runs and learns. The transcription of the reference's flash_rank_drop in torch lives in
test_visual_dropout_reference.py.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from hico_jax import VIDEO_TOKEN_ID, presets, sharding
from hico_jax.data import pipeline
from hico_jax.infer import generate as gen
from hico_jax.models import qwen2, visual_dropout as vd
from hico_jax.models.hico import HiCoConfig
from hico_jax.ops import loss as loss_ops
from hico_jax.train import train_state
from tests.greedy_reference import rerun_greedy

VOCAB = 320
CARD = vd.VisualDropoutConfig(type="uniform0_attention", layers=(1, 2), ratios=(1.0, 0.75, 0.25))


def _llm_config(layers=3):
  return qwen2.Qwen2Config.from_dict(dict(presets.llm("tiny", vocab_size=VOCAB, dtype="float32",
                                                      remat_policy="none"), num_layers=layers))


@functools.lru_cache(maxsize=None)
def _params(layers=3):
  config = _llm_config(layers)
  return nn.unbox(qwen2.Qwen2ForCausalLM(config).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))


def _packed_rows(seed=0):
  """Two rows of 96 tokens. Row 0 packs two samples (16 and 24 visual tokens) and padding; row 1 holds one sample
  of 40 visual tokens, then padding. Targets: each sample supervises a '\\n' right after its video and an answer."""
  rng = np.random.default_rng(seed)
  length = 96
  ids = rng.integers(1, VOCAB, (2, length)).astype(np.int32)
  segment_ids = np.zeros((2, length), np.int32)
  visual = np.zeros((2, length), bool)
  targets = np.full((2, length), -100, np.int32)
  layout = {0: [(0, 34, 3, 16), (34, 70, 2, 24)], 1: [(0, 60, 5, 40)]}     # (start, stop, prefix, visual)
  for row, samples in layout.items():
    for number, (start, stop, prefix, count) in enumerate(samples, 1):
      segment_ids[row, start:stop] = number
      visual[row, start + prefix:start + prefix + count] = True
      after = start + prefix + count
      # labels: the token right after the video and the last 6 tokens are supervised; targets are shifted.
      labels = np.full(stop - start, -100)
      labels[after - start] = ids[row, after]
      labels[-6:] = ids[row, stop - 6:stop]
      targets[row, start:stop - 1] = labels[1:]
  counts = [[s[3] for s in samples] for samples in layout.values()]
  return ids, segment_ids, visual, targets, counts


# ----------------------------------------------------------------------------------------------------------
# Selection rules

def test_uniform_keep_on_device_equals_torch_linspace_for_many_counts_in_any_token_order():
  rng = np.random.default_rng(0)
  rows, length = 48, 2200
  counts = np.concatenate([rng.integers(1, 80, 24), rng.integers(80, 2100, 24)])
  ratios = (0.9, 0.37)                                        # cur = int(0.9 N), keep = int(0.37 N)
  visual = np.zeros((rows, length), bool)
  for row, n in enumerate(counts):
    visual[row, 7:7 + n] = True
  segment_ids = np.ones((rows, length), np.int32)
  positions = np.broadcast_to(np.arange(length), (rows, length))

  def kept_ranks(slots):
    order = (lambda x: x) if slots is None else (lambda x: pipeline.zigzag(x, 4))
    state = vd.initial_state(jnp.asarray(order(visual)), jnp.asarray(segment_ids), jnp.asarray(positions),
                             slots=None if slots is None else jnp.asarray(order(slots)))
    # Stage 0 of ratios (0.9, 0.37): the first cur visual tokens are the current ones.
    keep = jax.jit(vd.uniform_keep, static_argnums=(1, 2))(state, ratios, 0)
    keep = np.asarray(keep)
    return keep if slots is None else pipeline.unzigzag(keep, 4)

  slots = np.broadcast_to(np.arange(length), (rows, length))
  for keep in (kept_ranks(None), kept_ranks(slots)):
    for row, n in enumerate(counts):
      cur, k = int(n * ratios[0]), int(n * ratios[1])
      expected = np.zeros(length, bool)
      if k:
        expected[7 + vd.uniform_indices(cur, k)] = True
      np.testing.assert_array_equal(keep[row], expected, err_msg=f"N={n}, cur={cur}, keep={k}")


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match=r"one ratio more than layers"):
    vd.VisualDropoutConfig(layers=(4, 18), ratios=(1.0, 0.5)).check(28)
  with pytest.raises(ValueError, match=r"layers=\[18, 4\] must increase"):
    vd.VisualDropoutConfig(layers=(18, 4)).check(28)
  with pytest.raises(ValueError, match=r"within 1..27"):
    vd.VisualDropoutConfig(layers=(4, 28)).check(28)
  with pytest.raises(ValueError, match=r"type='topk'"):
    vd.VisualDropoutConfig(type="topk").check(28)
  with pytest.raises(ValueError, match=r"non-increasing"):
    vd.VisualDropoutConfig(ratios=(1.0, 0.25, 0.75)).check(28)


# ----------------------------------------------------------------------------------------------------------
# Forms

def test_ratios_of_one_give_the_logits_of_the_model_without_dropout():
  ids, segment_ids, visual, targets, _ = _packed_rows()
  config = _llm_config()
  keep_all = vd.VisualDropoutConfig(type="uniform0_attention", layers=(1, 2), ratios=(1.0, 1.0, 1.0))
  plain, _ = qwen2.Qwen2ForCausalLM(config).apply(_params(), ids, segment_ids=segment_ids)
  model = qwen2.Qwen2ForCausalLM(config, dropout=keep_all)
  masked, aux = model.apply(_params(), ids, segment_ids=segment_ids, visual_mask=visual, targets=targets)
  np.testing.assert_array_equal(np.asarray(aux["segment_ids"]), segment_ids)
  np.testing.assert_array_equal(np.asarray(aux["targets"]), targets)
  np.testing.assert_allclose(masked, plain, atol=1e-6, rtol=0)
  compacted, _ = model.apply(_params(), ids, segment_ids=segment_ids, visual_mask=visual,
                             compact_lengths=vd.compacted_lengths(keep_all, 96, [[16, 24], [40]]))
  np.testing.assert_allclose(compacted, plain, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dropout", [CARD, vd.VisualDropoutConfig(type="attention", layers=(1, 2),
                                                                  ratios=(1.0, 0.5, 0.3))], ids=["card", "attention"])
@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_masked_form_equals_compacted_form_on_packed_and_padded_rows(dropout, training):
  ids, segment_ids, visual, targets, counts = _packed_rows()
  model = qwen2.Qwen2ForCausalLM(_llm_config(), dropout=dropout)
  targets = targets if training else None
  run = functools.partial(model.apply, _params(), ids, segment_ids=segment_ids, visual_mask=visual,
                          targets=targets, return_logits=False)
  _, masked = run()
  lengths = vd.compacted_lengths(dropout, 96, counts)
  _, compacted = run(compact_lengths=lengths)

  kept = np.asarray(masked["segment_ids"]) >= 0
  # What the masked form kept is what the compacted rows hold, in order: the same number per sample ...
  for row, samples in enumerate(counts):
    for number, n in enumerate(samples, 1):
      live = np.asarray(masked["segment_ids"][row]) == number
      visual_left = np.sum(live & visual[row])
      assert visual_left == int(n * dropout.ratios[-1]), (row, number)
  # ... and the same hidden states, positions and targets token for token.
  order = np.argsort(~kept, axis=1, kind="stable")[:, :lengths[-1]]
  take = lambda x: np.take_along_axis(np.asarray(x), order if x.ndim == 2 else order[..., None], axis=1)
  live = np.asarray(compacted["segment_ids"]) > 0
  np.testing.assert_array_equal(np.where(live, take(masked["segment_ids"]), 0), compacted["segment_ids"])
  np.testing.assert_array_equal(np.where(live, take(masked["positions"]), 0),
                                np.where(live, compacted["positions"], 0))
  np.testing.assert_allclose(np.where(live[..., None], take(masked["hidden"]), 0),
                             np.where(live[..., None], compacted["hidden"], 0), atol=1e-5, rtol=0)
  # Positions restart per sample and count only what is left: 0, 1, 2, ... along each compacted sample.
  expected_positions = qwen2.positions_from_segments(jnp.asarray(compacted["segment_ids"]))
  np.testing.assert_array_equal(np.where(live, compacted["positions"], 0), np.where(live, expected_positions, 0))
  if training:
    np.testing.assert_array_equal(np.where(live, take(masked["targets"]), -100), compacted["targets"])
    head = _params()["params"]["embed_tokens"]["embedding"].T
    sums = lambda aux: loss_ops.linear_cross_entropy(aux["hidden"], head, jnp.maximum(aux["targets"], 0),
                                                     aux["targets"] >= 0, 64)
    (masked_total, masked_count), (compact_total, compact_count) = sums(masked), sums(compacted)
    # Every supervised label survives: the '\n' after a video moves to the last visual token kept.
    assert int(masked_count) == int(compact_count) == int(np.sum(targets >= 0))
    np.testing.assert_allclose(masked_total, compact_total, rtol=1e-5)


def test_dropped_video_end_hands_its_newline_target_to_the_last_visual_token_kept():
  ids, segment_ids, visual, targets, _ = _packed_rows()
  model = qwen2.Qwen2ForCausalLM(_llm_config(), dropout=CARD)
  _, aux = model.apply(_params(), ids, segment_ids=segment_ids, visual_mask=visual, targets=targets,
                       return_logits=False)
  seg, moved = np.asarray(aux["segment_ids"]), np.asarray(aux["targets"])
  for row, start, end in ((0, 3, 19), (0, 36, 60), (1, 5, 45)):              # each sample's visual span
    last_kept = start + np.nonzero(seg[row, start:end] > 0)[0][-1]
    assert moved[row, last_kept] == ids[row, end], (row, start)              # the label of the '\n' after it
    assert np.all(moved[row, start:end][np.arange(start, end) != last_kept] == -100)


# ----------------------------------------------------------------------------------------------------------
# Generation

@pytest.mark.slow   # ~21 s on 2 cores; test_long_prefill's dropout case (the same check, padded batch) stays
def test_cached_generation_with_dropout_equals_rerunning_the_whole_sequence_each_step():
  config = _llm_config()
  model = qwen2.Qwen2ForCausalLM(config, dropout=CARD)
  rng = np.random.default_rng(3)
  ids = rng.integers(1, VOCAB, (2, 40)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, :6] = 0                                       # left padding: row 1 is shorter
  visual = np.zeros_like(ids, bool)
  visual[0, 4:36] = True                                # 32 visual tokens
  visual[1, 9:33] = True                                # 24
  new = 6
  # The reference: one forward over prompt + tokens so far, right-padded to one length (one compile).
  params = _params()
  rerun = jax.jit(lambda tokens, vis, seg, targets: model.apply(params, tokens, visual_mask=vis, segment_ids=seg,
                                                                targets=targets)[0])
  expected = rerun_greedy(rerun, ids, mask, visual, new)
  for compact in (True, False):
    ours = gen.generate(model, _params(), np.where(mask > 0, ids, 0), mask, max_new_tokens=new,
                        visual_mask=jnp.asarray(visual), compact=compact)
    np.testing.assert_array_equal(ours, expected, err_msg=f"compact={compact}")
  # The drops matter here: without them row 1's last prompt token predicts something else.
  real = mask[1] > 0
  prompt_len = int(real.sum())
  tokens, vis = ids[1][real][None], visual[1][real][None]
  targets = np.full((1, prompt_len), -100, np.int32)
  targets[0, -1] = 1
  plain, _ = qwen2.Qwen2ForCausalLM(config).apply(params, tokens)
  dropped = rerun(tokens, vis, np.ones((1, prompt_len), np.int32), targets)
  assert np.abs(plain[0, -1] - dropped[0, prompt_len - 1]).max() > 1e-3


# ----------------------------------------------------------------------------------------------------------
# Training

@pytest.mark.slow   # ~30 s on 2 cores; the training rule's masked = compacted tests above stay in the default suite
def test_training_steps_with_dropout_on_an_8_device_mesh_reduce_the_loss_on_a_fixed_batch():
  compute = dict(dtype="float32", param_dtype="float32", remat_policy="none")
  config = HiCoConfig.from_dict({"vit": dict(presets.VIT_PRESETS["tiny"], image_size=64, **compute),
                                 "llm": dict(presets.llm("tiny", vocab_size=VOCAB, **compute)),
                                 "encode_chunk": 8, "visual_dropout": dict(type="uniform0_attention",
                                                                           layers=[1], ratios=[1.0, 0.5])})
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
  rows, length = 8, 96
  rng = np.random.default_rng(0)
  ids = rng.integers(0, VOCAB, (rows, length)).astype(np.int32)
  ids[:, 4:68] = VIDEO_TOKEN_ID
  targets = np.full((rows, length), -100, np.int32)
  targets[:, 67:length - 1] = ids[:, 68:]
  batch = {"input_ids": ids, "targets": targets, "segment_ids": np.ones((rows, length), np.int32),
           "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy(),
           "frames": rng.integers(0, 256, (rows, 4, 64, 64, 3), dtype=np.uint8), "num_skipped": np.int32(0)}
  optim_config = ml_collections.ConfigDict(dict(
      optimizer="adamw", lr=3e-3, schedule_type="constant", warmup_ratio=0.0, total_steps=10, b1=0.9, b2=0.999,
      eps=1e-8, weight_decay=0.0, grad_clip=1.0, schedule=((".*", 1.0),)))
  built = train_state.build_train_step(config, optim_config, mesh)    # as the trainer builds it
  state, step = built.state, built.train_step
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    global_batch = pipeline.to_global(batch, mesh)
    losses = []
    for _ in range(6):
      state, metrics = step(state, global_batch)
      losses.append(float(metrics["loss"]))
  assert all(np.diff(losses) < 0) and losses[-1] < losses[0] - 0.3, losses
  # Every supervised target still counts after half the visual tokens are gone.
  assert float(metrics["num_tokens"]) == np.sum(targets >= 0)


@pytest.mark.slow   # ~21 s on 2 cores; masked = compacted on packed and padded rows stays in the default suite
def test_compacted_rows_without_segment_ids_equal_the_masked_form_though_rows_drop_different_counts():
  """Unpacked rows run without any attention mask once compacted (the tail padding is hidden by causality);
  the row that drops fewer tokens pads the other at its end."""
  rng = np.random.default_rng(5)
  ids = rng.integers(1, VOCAB, (2, 64)).astype(np.int32)
  visual = np.zeros_like(ids, bool)
  visual[0, 4:52], visual[1, 10:26] = True, True                  # 48 and 16 visual tokens
  model = qwen2.Qwen2ForCausalLM(_llm_config(), dropout=CARD)
  _, masked = model.apply(_params(), ids, segment_ids=np.ones_like(ids), visual_mask=visual, return_logits=False)
  lengths = vd.compacted_lengths(CARD, 64, [[48], [16]])
  _, compacted = model.apply(_params(), ids, visual_mask=visual, compact_lengths=lengths, return_logits=False)
  live = np.asarray(compacted["segment_ids"]) > 0
  assert live[0].sum() == 64 - 36 and live[1].sum() == 64 - 12 and not live[0, -1]
  kept = np.asarray(masked["segment_ids"]) > 0
  order = np.argsort(~kept, axis=1, kind="stable")[:, :lengths[-1]]
  expected = np.take_along_axis(np.asarray(masked["hidden"]), order[..., None], axis=1)
  np.testing.assert_allclose(np.where(live[..., None], expected, 0), np.where(live[..., None], compacted["hidden"], 0),
                             atol=1e-5, rtol=0)
