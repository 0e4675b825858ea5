"""The fused chunked cross-entropy against plain autodiff of the textbook formula."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from hico_jax.ops import loss


def _reference(hidden, kernel, labels, weights):
  logits = hidden.astype(jnp.float32) @ kernel.astype(jnp.float32)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
  return jnp.sum(nll * weights) / jnp.sum(weights)


@pytest.mark.parametrize("length,chunk", [(40, 16), (32, 32), (50, 7)])
def test_fused_loss_value_and_grads_match_autodiff(length, chunk):
  rng = np.random.default_rng(length)
  hidden = jnp.asarray(rng.normal(size=(2, length, 24)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(24, 97)) * 0.3, jnp.float32)
  labels = jnp.asarray(rng.integers(0, 97, (2, length)))
  weights = jnp.asarray(rng.random((2, length)) > 0.3, jnp.float32)

  def fused(h, k):
    total, count = loss.linear_cross_entropy(h, k, labels, weights, chunk)
    return total / count

  value, (dh, dk) = jax.jit(jax.value_and_grad(fused, argnums=(0, 1)))(hidden, kernel)
  ref_value, (ref_dh, ref_dk) = jax.value_and_grad(_reference, argnums=(0, 1))(hidden, kernel, labels, weights)
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  np.testing.assert_allclose(dh, ref_dh, atol=1e-6)
  np.testing.assert_allclose(dk, ref_dk, atol=1e-6)
  # Unsupervised tokens get exactly zero gradient.
  assert np.all(np.asarray(dh)[np.asarray(weights) == 0] == 0)


@pytest.mark.parametrize("text_row", [True, False], ids=["with_text_row", "video_rows_only"])
@pytest.mark.parametrize("supervised_first", [True, False])
def test_sparse_supervision_in_many_chunks_matches_autodiff_and_ignores_unsupervised_states(supervised_first,
                                                                                            text_row):
  """Video rows: a few supervised answers among many unsupervised positions, a row with none and (with
  `text_row`) a row with all. The fused loss moves each row's answers to its front (or not) and visits only
  the chunks that hold one: without the text row, empty chunks lie between and after the visited ones.
  Whatever the unsupervised positions hold (NaN here) must not reach the loss or any gradient. Under jit, as
  in training: there the number of chunks to visit is a traced value and the loop a while loop."""
  rng = np.random.default_rng(7)
  batch, length, dim, vocab = 4, 96, 16, 53
  hidden = rng.normal(size=(batch, length, dim)).astype(np.float32)
  kernel = jnp.asarray(rng.normal(size=(dim, vocab)) * 0.3, jnp.float32)
  labels = jnp.asarray(rng.integers(0, vocab, (batch, length)))
  weights = np.zeros((batch, length), np.float32)
  weights[0, [5, 40, 41, 90]] = 1.0            # scattered answers
  weights[1, 60:75] = 1.0                      # one answer span late in the row
  if text_row:
    weights[3, :] = 1.0                        # every position (a text-only row)
  poisoned = np.where(weights[..., None] > 0, hidden, np.nan)

  def fused(h, k):
    total, count = loss.linear_cross_entropy(h, k, labels, jnp.asarray(weights), 8, supervised_first)
    return total / count

  value, (dh, dk) = jax.jit(jax.value_and_grad(fused, argnums=(0, 1)))(jnp.asarray(poisoned), kernel)
  ref_value, (ref_dh, ref_dk) = jax.value_and_grad(_reference, argnums=(0, 1))(
      jnp.asarray(hidden), kernel, labels, jnp.asarray(weights))
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  np.testing.assert_allclose(dh, ref_dh, atol=1e-6)
  np.testing.assert_allclose(dk, ref_dk, atol=1e-6)


def test_token_cross_entropy_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 11))
  labels = rng.integers(0, 11, 3)
  expected = np.log(np.exp(logits).sum(-1)) - logits[np.arange(3), labels]
  np.testing.assert_allclose(loss.token_cross_entropy(jnp.asarray(logits), jnp.asarray(labels)), expected, rtol=1e-6)
