"""The Qwen2 decoder against transformers' Qwen2ForCausalLM: logits, padding, packing."""

import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp

from hico_jax.convert import qwen2_hf
from hico_jax.models import qwen2
from tests.hf_reference import make_hf_qwen2

CASES = [  # (heads, kv_heads, theta, tied): GQA ratios 1, 2, 4; two thetas; tied and untied
    (4, 4, 10000.0, False),
    (4, 2, 1e6, True),
    (8, 2, 10000.0, False),
    (8, 2, 1e6, True),
]


def _load(model_dir):
  config, params, _ = qwen2_hf.load(model_dir, params_dtype=np.float32, dtype="float32", remat_policy="none")
  return config, params


@pytest.mark.parametrize("heads,kv_heads,theta,tied", CASES)
def test_logits_match_transformers_on_right_padded_batch(tmp_path, heads, kv_heads, theta, tied):
  hf_model = make_hf_qwen2(tmp_path, heads=heads, kv_heads=kv_heads, theta=theta, tied=tied,
                           seed=heads * 10 + kv_heads)
  config, params = _load(tmp_path)
  rng = np.random.default_rng(0)
  batch, length = 2, 272
  ids = rng.integers(0, config.vocab_size, (batch, length))
  mask = np.ones((batch, length), np.int64)
  mask[1, 200:] = 0                                   # row 1 is right-padded
  with torch.no_grad():
    expected = hf_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()

  model = qwen2.Qwen2ForCausalLM(config)
  logits, _ = jax.jit(model.apply)({"params": params}, jnp.asarray(ids), segment_ids=jnp.asarray(mask))
  logits = np.asarray(logits)
  valid = mask.astype(bool)
  np.testing.assert_allclose(logits[valid], expected[valid], atol=1e-4, rtol=0)


def test_two_sequences_packed_in_one_row_match_each_alone(tmp_path):
  hf_model = make_hf_qwen2(tmp_path, heads=4, kv_heads=2)
  config, params = _load(tmp_path)
  model = qwen2.Qwen2ForCausalLM(config)
  rng = np.random.default_rng(1)
  a, b = rng.integers(0, config.vocab_size, 100), rng.integers(0, config.vocab_size, 60)
  packed = np.concatenate([a, b, np.zeros(12, int)])[None]
  segments = np.concatenate([np.full(100, 1), np.full(60, 2), np.zeros(12, int)])[None]
  logits, _ = model.apply({"params": params}, jnp.asarray(packed), segment_ids=jnp.asarray(segments))
  with torch.no_grad():
    alone_a = hf_model(input_ids=torch.tensor(a[None])).logits.numpy()[0]
    alone_b = hf_model(input_ids=torch.tensor(b[None])).logits.numpy()[0]
  np.testing.assert_allclose(np.asarray(logits)[0, :100], alone_a, atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(logits)[0, 100:160], alone_b, atol=1e-4, rtol=0)
