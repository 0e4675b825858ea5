"""Generation through the KV cache against transformers' greedy `generate`."""

import numpy as np
import pytest
import torch

from hico_jax.convert import qwen2_hf
from hico_jax.infer import generate as gen
from hico_jax.models import qwen2
from tests.hf_reference import make_hf_qwen2


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  path = tmp_path_factory.mktemp("qwen2_gen")
  hf_model = make_hf_qwen2(path, heads=4, kv_heads=2, theta=1e6, seed=3)
  config, params, _ = qwen2_hf.load(path, params_dtype=np.float32, dtype="float32", remat_policy="none")
  return hf_model, qwen2.Qwen2ForCausalLM(config), {"params": params}


def _hf_greedy(hf_model, ids, mask=None, n=32):
  with torch.no_grad():
    out = hf_model.generate(torch.tensor(ids), attention_mask=None if mask is None else torch.tensor(mask),
                            max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
  return out[:, ids.shape[1]:].numpy()


def test_greedy_32_tokens_match_transformers_left_padded_batch(models):
  hf_model, model, params = models
  rng = np.random.default_rng(0)
  ids = rng.integers(1, 320, (3, 20))
  mask = np.ones_like(ids)
  mask[1, :7] = 0                      # left padding, as transformers expects for batched generation
  mask[2, :3] = 0
  ids = np.where(mask == 1, ids, 0)
  ours = gen.generate(model, params, ids, mask, max_new_tokens=32)
  np.testing.assert_array_equal(ours, _hf_greedy(hf_model, ids, mask))


def test_right_padded_rows_generate_as_if_alone(models):
  hf_model, model, params = models
  rng = np.random.default_rng(1)
  a, b = rng.integers(1, 320, 16), rng.integers(1, 320, 9)
  ids = np.zeros((2, 16), np.int64)
  ids[0], ids[1, :9] = a, b
  mask = (np.arange(16)[None] < np.array([[16], [9]])).astype(np.int64)
  ours = gen.generate(model, params, ids, mask, max_new_tokens=32)
  np.testing.assert_array_equal(ours[0], _hf_greedy(hf_model, a[None])[0])
  np.testing.assert_array_equal(ours[1], _hf_greedy(hf_model, b[None])[0])


def test_generation_stops_at_eos_and_pads_after_it(models):
  hf_model, model, params = models
  ids = np.random.default_rng(2).integers(1, 320, (1, 12))
  reference = _hf_greedy(hf_model, ids)[0]
  eos = int(reference[5])
  first = int(np.argmax(reference == eos))               # eos may already appear before index 5
  ours = gen.generate(model, params, ids, max_new_tokens=32, eos_ids=[eos], pad_id=-1)[0]
  np.testing.assert_array_equal(ours[:first + 1], reference[:first + 1])
  assert np.all(ours[first + 1:] == -1)


def test_top_p_sampling_only_draws_from_the_nucleus():
  logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]] * 2000, np.float32))
  import jax
  draws = np.asarray(gen.sample_token(jax.numpy.asarray(logits), jax.random.key(0), 1.0, 0.7))
  # Nucleus at 0.7: {0.5, 0.3}; renormalised 0.625 / 0.375.
  assert set(np.unique(draws)) == {0, 1}
  assert abs(np.mean(draws == 0) - 0.625) < 0.04
  greedy = np.asarray(gen.sample_token(jax.numpy.asarray(logits), jax.random.key(0), 0.0, 1.0))
  assert np.all(greedy == 0)


# 4: the continuation (21 cached + 16 new + 32 to come) outgrows the first cache (24 + 4 slots) and gets a
# longer one; 60: it fits in the first cache's 84 slots, overwriting the first answer's.
@pytest.mark.parametrize("first_new_tokens", [4, 60])
def test_a_continuation_of_a_cached_prompt_generates_what_transformers_does_for_the_whole_prompt(
    models, first_new_tokens):
  hf_model, model, params = models
  rng = np.random.default_rng(5)
  first, later = rng.integers(1, 320, (1, 21)), rng.integers(1, 320, (1, 11))
  padded = np.concatenate([np.zeros((1, 3), np.int64), first], axis=1)     # left-padded, as chat pads
  mask = (np.arange(24)[None] >= 3).astype(np.int64)
  _, cache = gen.generate(model, params, padded, mask, max_new_tokens=first_new_tokens, return_cache=True)
  assert cache.length == 21 and cache.ids.tolist() == first[0].tolist()
  slots = cache.cache[0]["segment_ids"].shape[1]

  # Only the 11 new tokens go in (left-padded to 16); the 21 cached ones are not run again.
  later_padded = np.concatenate([np.zeros((1, 5), np.int64), later], axis=1)
  later_mask = (np.arange(16)[None] >= 5).astype(np.int64)
  ours, after = gen.generate(model, params, later_padded, later_mask, max_new_tokens=32, prefix=cache,
                             return_cache=True)
  whole = np.concatenate([first, later], axis=1)
  np.testing.assert_array_equal(ours, _hf_greedy(hf_model, whole))
  assert after.length == 32 and after.ids.tolist() == whole[0].tolist()
  grown = after.cache[0]["segment_ids"].shape[1]
  assert grown == (slots if first_new_tokens == 60 else gen.CACHE_GROWTH)


def test_a_prompt_cache_is_refused_for_batches_and_visual_dropout(models):
  _, model, params = models
  with pytest.raises(ValueError, match="one row of a model without visual dropout"):
    gen.generate(model, params, np.ones((2, 5), np.int64), max_new_tokens=2, return_cache=True)
