"""Progressive visual dropout against an independent PyTorch transcription of the reference
(tests/torch_reference/flash_rank_drop.py: `Qwen2Model_Flash.forward` + `flash_rank_drop`, spec §4), run
on a random tiny transformers Qwen2 (4 layers, GQA 4/2, random biases), fp32 on CPU.

Each case compares the logits of the kept sequence (compacted form directly, masked form through its rows
with segment_ids > 0), the original indices of the kept tokens, and with labels the moved targets and the
loss sums. The "visual tokens" are ordinary token ids flagged in visual_mask: the LLM does not care.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hico_jax.convert import qwen2_hf
from hico_jax.models import qwen2, visual_dropout
from hico_jax.models.visual_dropout import VisualDropoutConfig
from hico_jax.ops import loss as loss_ops
from tests.hf_reference import make_hf_qwen2
from tests.torch_reference import flash_rank_drop as ref

IGNORE = -100
# Stand-ins for the chat template's special tokens inside the tiny 320-token vocabulary.
NL, SPACE_NL, IM_START, IM_END = 198, 199, 300, 301
# A selection whose cut falls within float noise would make any two fp32 implementations disagree. Scores
# here are ~1/L ≈ 1e-2 and fp32 differences ~1e-8, so a gap of 1e-6 at the cut leaves no doubt.
MIN_CUT_MARGIN = 1e-6
# Each form costs an XLA compile of ~3 s on 2 cores; the cases that add no new form-specific path run the
# masked form only (it alone shows which original tokens were kept).
BOTH_FORMS = ("compacted", "masked")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  model_dir = tmp_path_factory.mktemp("qwen2_4l")
  hf_model = make_hf_qwen2(model_dir, layers=4, heads=4, kv_heads=2, seed=7)
  config, params, _ = qwen2_hf.load(model_dir, params_dtype=np.float32, dtype="float32", remat_policy="none")
  return hf_model, config, params


def _text(rng, n):
  """Ordinary text ids: none of the template stand-ins, so labels built from them stay unambiguous."""
  return list(rng.integers(0, 190, n))


def _inference_prompt(seed, num_visual, before=6, after=10):
  rng = np.random.default_rng(seed)
  ids = _text(rng, before) + list(rng.integers(0, 320, num_visual)) + _text(rng, after)
  return np.asarray(ids), before


def _training_chat(seed, num_visual, turns=1):
  """A training sample laid out like §5's qwen_2 template with preprocess_qwen's labels: system and user
  turns masked except \\n, <|im_start|>, <|im_end|>; whole assistant turns supervised. Returns (ids, labels,
  img_pos)."""
  rng = np.random.default_rng(seed)
  ids, supervised = [], []

  def add(tokens, sup):
    ids.extend(tokens)
    supervised.extend([sup or t in (NL, IM_START, IM_END) for t in tokens])

  add([IM_START] + _text(rng, 1) + [NL] + _text(rng, 5) + [IM_END, NL], False)          # system
  add([IM_START] + _text(rng, 1) + [NL], False)                                          # user header
  img_pos = len(ids)
  add(list(rng.integers(0, 320, num_visual)), False)                                     # the video
  for turn in range(turns):
    if turn:
      add([IM_START] + _text(rng, 1) + [NL], False)
    else:
      add([NL] + _text(rng, 8) + [SPACE_NL], False)                                      # time message
    add(_text(rng, 4) + [IM_END, NL], False)                                             # question
    add([IM_START] + _text(rng, 1) + [NL] + _text(rng, 5) + [IM_END, NL], True)         # answer turn
  ids = np.asarray(ids)
  labels = np.where(supervised, ids, IGNORE)
  # The visual tokens are never supervised; a random id that happens to be a template stand-in is not one.
  labels[img_pos:img_pos + num_visual] = IGNORE
  return ids, labels, img_pos


def _run_ours(tiny, dropout, ids, img_pos, num_visual, labels=None, forms=BOTH_FORMS):
  """{form: (logits, aux)} from hico_jax for one sample, and the model."""
  _, config, params = tiny
  length = len(ids)
  visual = np.zeros(length, bool)
  visual[img_pos:img_pos + num_visual] = True
  targets = None if labels is None else jnp.asarray(np.append(labels[1:], IGNORE))[None]
  model = qwen2.Qwen2ForCausalLM(config, dropout=dropout)
  inputs = dict(segment_ids=jnp.ones((1, length), jnp.int32), visual_mask=jnp.asarray(visual)[None],
                targets=targets)
  lengths = {"compacted": visual_dropout.compacted_lengths(dropout, length, [[num_visual]]), "masked": None}
  return {form: jax.jit(functools.partial(model.apply, compact_lengths=lengths[form]))(
      {"params": params}, jnp.asarray(ids)[None], **inputs) for form in forms}, model


def _our_loss_sums(model, params, aux):
  kernel = model.apply({"params": params}, method=qwen2.Qwen2ForCausalLM.head_kernel)
  targets = aux["targets"]
  weights = targets >= 0
  total, count = loss_ops.linear_cross_entropy(aux["hidden"], kernel, jnp.where(weights, targets, 0), weights)
  return float(total), int(count)


def _check_against_reference(tiny, dropout, ids, img_pos, num_visual, labels=None, forms=BOTH_FORMS):
  """Runs both sides and asserts they agree; returns the reference's result for case-specific checks."""
  hf_model = tiny[0]
  expected = ref.flash_forward(hf_model, ids, img_pos=img_pos, num_visual=num_visual,
                               compress_type=dropout.type, layers=dropout.layers, ratios=dropout.ratios,
                               labels=labels)
  for stage in expected.stages:
    if stage.cut_margin is not None:
      assert stage.cut_margin > MIN_CUT_MARGIN, f"near-tie at the cut of stage {stage}: pick another seed"
  ours, model = _run_ours(tiny, dropout, ids, img_pos, num_visual, labels, forms)
  kept_length = len(expected.kept)
  # Ours are pre-shifted: the target of kept token j is the reference's compacted label j + 1.
  shifted = None if labels is None else np.append(expected.labels[1:].numpy(), IGNORE)

  for form, (logits, aux) in ours.items():
    if form == "compacted":
      # The row is exactly the kept sequence, renumbered 0..L'-1.
      assert logits.shape[1] == kept_length
      live = np.ones(kept_length, bool)
      assert np.all(np.asarray(aux["segment_ids"][0]) == 1)
    else:
      # The row keeps its length; the live rows are the reference's tokens.
      live = np.asarray(aux["segment_ids"][0]) > 0
      np.testing.assert_array_equal(np.nonzero(live)[0], expected.kept.numpy())
    np.testing.assert_allclose(np.asarray(logits[0])[live], expected.logits.numpy(), atol=1e-4, rtol=0,
                               err_msg=form)
    np.testing.assert_array_equal(np.asarray(aux["positions"][0])[live], np.arange(kept_length))
    if labels is not None:
      np.testing.assert_array_equal(np.asarray(aux["targets"][0])[live], shifted, err_msg=form)
      ref_total, ref_count = ref.shifted_cross_entropy(expected.logits, expected.labels)
      total, count = _our_loss_sums(model, tiny[2], aux)
      assert count == ref_count
      np.testing.assert_allclose(total, ref_total, rtol=1e-5, err_msg=form)
  return expected


def _kept_visual(result, img_pos, num_visual):
  kept = result.kept.numpy()
  return kept[(kept >= img_pos) & (kept < img_pos + num_visual)] - img_pos


# --------------------------------------------------------------------------------------------------------
# Whole-model parity, one case per selection type.

def test_uniform_drop_keeps_torch_linspace_tokens_and_logits_in_both_forms(tiny):
  ids, img_pos = _inference_prompt(seed=1, num_visual=48)
  dropout = VisualDropoutConfig(type="uniform", layers=(2,), ratios=(1.0, 0.5))
  expected = _check_against_reference(tiny, dropout, ids, img_pos, 48)
  np.testing.assert_array_equal(_kept_visual(expected, img_pos, 48),
                                torch.linspace(0, 47, 24, dtype=torch.long).numpy())


def test_attention_drop_queried_by_last_prompt_token_matches_reference(tiny):
  num_visual = 64
  ids, img_pos = _inference_prompt(seed=2, num_visual=num_visual)
  dropout = VisualDropoutConfig(type="attention", layers=(1, 3), ratios=(1.0, 0.6, 0.3))
  expected = _check_against_reference(tiny, dropout, ids, img_pos, num_visual, forms=("masked",))
  assert [(s.cur, s.keep) for s in expected.stages] == [(64, 38), (38, 19)]
  assert all(s.queries.tolist() == [len(ids) - 1] for s in expected.stages)
  # The attention path must really choose: not the uniform choice, not simply the first tokens.
  kept = _kept_visual(expected, img_pos, num_visual)
  uniform = ref.flash_forward(tiny[0], ids, img_pos=img_pos, num_visual=num_visual, compress_type="uniform",
                              layers=dropout.layers, ratios=dropout.ratios)
  assert set(kept) != set(_kept_visual(uniform, img_pos, num_visual))
  assert set(kept) != set(range(len(kept)))
  assert set(expected.stages[0].kept.numpy() - img_pos) != set(range(38))


def test_uniform0_attention_training_rule_matches_reference_logits_moved_targets_and_loss(tiny):
  num_visual = 56
  ids, labels, img_pos = _training_chat(seed=3, num_visual=num_visual)
  dropout = VisualDropoutConfig(type="uniform0_attention", layers=(1, 2), ratios=(1, 0.75, 0.25))
  expected = _check_against_reference(tiny, dropout, ids, img_pos, num_visual, labels)
  uniform_stage, attention_stage = expected.stages
  assert (uniform_stage.selection, attention_stage.selection) == ("uniform", "attention")
  assert (uniform_stage.cur, uniform_stage.keep, attention_stage.keep) == (56, 42, 14)
  # Several query rows, one of them the last current visual token (the supervised \n follows the video).
  last_visual = img_pos + num_visual - 1
  assert len(attention_stage.queries) >= 4 and last_visual in attention_stage.queries.tolist()
  # The attention stage drops the last visual token, so the \n's label must move to the last kept one:
  # the case a wrong target shift gets wrong.
  assert last_visual not in attention_stage.kept.tolist()
  assert set(attention_stage.kept.numpy() - img_pos) != set(
      uniform_stage.kept.numpy()[torch.linspace(0, 41, 14, dtype=torch.long).numpy()] - img_pos)


def test_uniform1_attention_with_fractional_counts_matches_reference(tiny):
  # N = 50: 0.75·50 = 37.5 -> 37, and 0.58·50 = 28.999999999999996 in float64 -> 28 (Python's int()).
  num_visual = 50
  ids, labels, img_pos = _training_chat(seed=5, num_visual=num_visual)
  dropout = VisualDropoutConfig(type="uniform1_attention", layers=(1, 2, 3), ratios=(1.0, 0.75, 0.58, 0.3))
  expected = _check_against_reference(tiny, dropout, ids, img_pos, num_visual, labels, forms=("masked",))
  assert [(s.selection, s.cur, s.keep) for s in expected.stages] == [
      ("uniform", 50, 37), ("uniform", 37, 28), ("attention", 28, 15)]


def test_training_rule_averages_every_query_row_when_query_rows_covers_them(tiny):
  # Seven turns give 17 query rows, more than the default query_rows=16 reads; with room for all of them
  # the selection must equal the reference's average over every row.
  num_visual = 40
  ids, labels, img_pos = _training_chat(seed=39, num_visual=num_visual, turns=7)
  dropout = VisualDropoutConfig(type="attention", layers=(2,), ratios=(1.0, 0.5), query_rows=32)
  expected = _check_against_reference(tiny, dropout, ids, img_pos, num_visual, labels, forms=("masked",))
  assert len(expected.stages[0].queries) > 16


# --------------------------------------------------------------------------------------------------------
# Uniform selection: torch's CPU integer linspace, exactly.

def _uniform_pairs():
  small = [(cur, keep) for cur in range(1, 151) for keep in range(1, cur + 1)]
  rng = np.random.default_rng(0)
  cur = rng.integers(151, 200_001, 2_000)
  # Log-uniform keeps cover every scale of step = (cur - 1) / (keep - 1) without building 10^8 indices; keeps
  # next to cur (steps just above 1) come from the exhaustive small range.
  keep = np.exp(rng.uniform(0, np.log(cur))).astype(int).clip(1, cur)
  return small + list(zip(cur.tolist(), keep.tolist()))


def test_uniform_indices_equal_torch_linspace_for_all_small_and_random_large_pairs():
  mismatched = [(cur, keep) for cur, keep in _uniform_pairs()
                if not np.array_equal(visual_dropout.uniform_indices(cur, keep),
                                      torch.linspace(0, cur - 1, keep, dtype=torch.long).numpy())]
  assert not mismatched, f"{len(mismatched)} (cur, keep) pairs differ from torch, e.g. {mismatched[:5]}"


@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.58, 0.3])
def test_uniform_keep_in_graph_equals_torch_linspace_for_every_visual_count(ratio):
  # What the model runs is uniform_keep (float64 in the graph), not the numpy helper: one row per visual
  # count N = 1..400 plus long videos, one sample per row, visual span after 3 text tokens.
  counts = list(range(1, 401)) + [4_097, 8_192, 10_240, 32_767]
  short, long = counts[:400], counts[400:]
  for group in (short, long):
    length = max(group) + 3
    visual = np.arange(length)[None, :] - 3 < np.asarray(group)[:, None]
    visual[:, :3] = False
    segment_ids = jnp.ones(visual.shape, jnp.int32)
    state = visual_dropout.initial_state(jnp.asarray(visual), segment_ids, jnp.zeros(visual.shape, jnp.int32))
    keep = np.asarray(jax.jit(lambda s: visual_dropout.uniform_keep(s, (1.0, ratio), 0))(state))
    for row, n in enumerate(group):
      expected = torch.linspace(0, n - 1, int(n * ratio), dtype=torch.long).numpy() + 3
      np.testing.assert_array_equal(np.nonzero(keep[row])[0], expected, err_msg=f"N={n}, ratio={ratio}")
