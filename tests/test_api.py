"""The public API (from_pretrained, __call__, generate, save_pretrained) against transformers."""

import numpy as np
import pytest
import torch
import transformers

import hico_jax
from hico_jax.models import qwen2
from tests.hf_reference import make_hf_qwen2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  path = tmp_path_factory.mktemp("api_qwen2")
  return path, make_hf_qwen2(path, heads=4, kv_heads=1, theta=1e6, tied=True, seed=7)


def test_logits_and_greedy_generation_match_transformers(checkpoint):
  path, hf_model = checkpoint
  model = hico_jax.from_pretrained(str(path))
  # The layout decoding is fast in (one buffer per layer), which the comparisons below then run through.
  assert qwen2.layers_are_unstacked(model.params["layers"])
  ids = np.random.default_rng(0).integers(0, 320, (2, 40))
  logits = model(ids)
  assert logits.dtype == np.float32 and logits.shape == (2, 40, 320)
  with torch.no_grad():
    expected = hf_model(torch.tensor(ids)).logits.numpy()
    expected_ids = hf_model.generate(torch.tensor(ids), max_new_tokens=16, min_new_tokens=16, do_sample=False,
                                     pad_token_id=0)[:, 40:].numpy()
  np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)
  np.testing.assert_array_equal(model.generate(ids, max_new_tokens=16, eos_ids=[]), expected_ids)


def test_save_pretrained_loads_back_in_transformers(checkpoint, tmp_path):
  path, hf_model = checkpoint
  hico_jax.from_pretrained(str(path)).save_pretrained(str(tmp_path))
  reloaded = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path, local_files_only=True,
                                                           attn_implementation="eager").eval()
  ids = torch.tensor(np.random.default_rng(1).integers(0, 320, (1, 24)))
  with torch.no_grad():
    np.testing.assert_array_equal(reloaded(ids).logits.numpy(), hf_model(ids).logits.numpy())


def test_bad_inputs_are_refused_with_the_reason(checkpoint, tmp_path):
  path, _ = checkpoint
  model = hico_jax.from_pretrained(str(path))
  with pytest.raises(ValueError, match="takes no video"):
    model(np.zeros((1, 4), int), video=np.zeros((1, 4, 224, 224, 3), np.float32))
  with pytest.raises(ValueError, match="video placeholder -200"):
    model(np.array([[1, hico_jax.VIDEO_TOKEN_ID, 2]]))
  with pytest.raises(ValueError, match=r"\[0, 320\)"):
    model(np.array([[1, 320]]))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    hico_jax.from_pretrained(str(tmp_path / "missing"))
