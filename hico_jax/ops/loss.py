"""Cross-entropy over supervised tokens, fused with the output head and computed in chunks of tokens.

At 16k tokens a 152k vocabulary makes 10 GB of float32 logits, and as much again for their gradient. Here
no more than one chunk's logits exist at a time, and the head is never recomputed: while the forward pass
has a chunk's logits in hand it also forms that chunk's gradient (softmax − one-hot) and pushes it through
the head, so the backward pass only scales the stored gradients. Three head matmuls per chunk, like the
unfused form, and none of its memory.

Most positions of a video row supervise nothing (16·F visual tokens, the prompt), so each row's supervised
positions are first moved to its front, in order, and a chunk in which no row has one is skipped: the head
costs what the answers need, not what the row holds.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from hico_jax.tokens import IGNORE_INDEX


def token_cross_entropy(logits, labels):
  """Per-token -log p(label), float32. logits (..., V) any float dtype; labels (...) int."""
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  label_logit = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
  return log_z - label_logit


def linear_cross_entropy(hidden, kernel, labels, weights, chunk_size: int = 4096, supervised_first: bool = True):
  """(Σ weight·CE, Σ weight) of logits = hidden @ kernel, without materialising all logits.

  hidden (B, L, D) and kernel (D, V) in the compute dtype; labels, weights (B, L). The caller divides the
  two sums, after summing them across the whole mesh, to get the mean over supervised tokens. Gradients
  flow to hidden and kernel (not to labels or weights). Positions of weight 0 contribute nothing whatever
  their hidden state holds. supervised_first=False keeps every position where it is (chunks with nothing
  supervised are still skipped): for rows split over the mesh's seq axis, where moving positions would
  gather the whole hidden state onto every device.
  """
  weights = weights.astype(jnp.float32)
  total = _fused_loss(hidden, kernel, labels, weights, min(chunk_size, hidden.shape[1]), supervised_first)
  return total, jnp.sum(weights)


def _permute_rows(x, order):
  """x (B, L, ...) with each row's positions taken in `order` (B, L)."""
  return jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), axis=1)


def _chunks(x, chunk_size):
  """(B, L, ...) -> (C, B, c, ...), zero-padding L up to a multiple of c."""
  pad = (-x.shape[1]) % chunk_size
  if pad:
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
  x = x.reshape(x.shape[0], -1, chunk_size, *x.shape[2:])
  return jnp.moveaxis(x, 1, 0)


def _loss_and_grads(hidden, kernel, labels, weights, chunk_size):
  """The loss sum and its gradients, chunk by chunk, visiting only the chunks where something is supervised."""
  batch, length, dim = hidden.shape

  def chunk_loss_and_grads(h, y, w):
    # Unsupervised positions (a chunk's tail) are zeroed, so no value of theirs reaches a sum or a gradient.
    h = jnp.where((w > 0)[..., None], h, jnp.zeros((), h.dtype))
    logits = jnp.einsum("bld,dv->blv", h, kernel, preferred_element_type=jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    label_logit = jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
    total = jnp.sum((log_z - label_logit) * w)
    # d(Σ w·CE)/d logits = w · (softmax − one-hot)
    probs = jnp.exp(logits - log_z[..., None])
    is_label = jnp.arange(logits.shape[-1]) == y[..., None]   # fused by XLA, never a one-hot array
    logits_grad = (jnp.where(is_label, probs - 1.0, probs) * w[..., None]).astype(h.dtype)
    hidden_grad = jnp.einsum("blv,dv->bld", logits_grad, kernel, preferred_element_type=jnp.float32)
    kernel_grad = jnp.einsum("bld,blv->dv", h, logits_grad, preferred_element_type=jnp.float32)
    return total, hidden_grad.astype(h.dtype), kernel_grad

  chunks = [_chunks(x, chunk_size) for x in (hidden, labels, weights)]      # each (C, B, c, ...)
  # The loop runs over the chunks that hold a supervised position, in order, and no others: an empty chunk
  # costs nothing, not even the zeros of a (D, V) gradient to add (with supervised positions first in every
  # row, all chunks past the longest row's answers are empty).
  nonempty = jnp.any(chunks[2] > 0, axis=(1, 2))
  visit = jnp.argsort(~nonempty, stable=True)

  def body(i, carry):
    total, kernel_grad, hidden_grad = carry
    index = visit[i]
    h, y, w = (jax.lax.dynamic_index_in_dim(x, index, keepdims=False) for x in chunks)
    chunk_total, chunk_hidden_grad, chunk_kernel_grad = chunk_loss_and_grads(h, y, w)
    hidden_grad = jax.lax.dynamic_update_index_in_dim(hidden_grad, chunk_hidden_grad, index, 0)
    return total + chunk_total, kernel_grad + chunk_kernel_grad, hidden_grad

  init = (jnp.zeros((), jnp.float32), jnp.zeros(kernel.shape, jnp.float32), jnp.zeros_like(chunks[0]))
  total, kernel_grad, hidden_grad = jax.lax.fori_loop(0, jnp.sum(nonempty), body, init)
  hidden_grad = jnp.moveaxis(hidden_grad, 0, 1).reshape(batch, -1, dim)[:, :length]
  return total, (hidden_grad, kernel_grad.astype(kernel.dtype))


def _supervised_first(hidden, labels, weights):
  """Each row's supervised positions moved to its front, in order (argsort of a bool is stable)."""
  order = jnp.argsort(weights <= 0, axis=1, stable=True)
  return order, _permute_rows(hidden, order), _permute_rows(labels, order), _permute_rows(weights, order)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _fused_loss(hidden, kernel, labels, weights, chunk_size, supervised_first):
  return _fused_loss_fwd(hidden, kernel, labels, weights, chunk_size, supervised_first)[0]


def _fused_loss_fwd(hidden, kernel, labels, weights, chunk_size, supervised_first):
  if not supervised_first:
    total, grads = _loss_and_grads(hidden, kernel, labels, weights, chunk_size)
    return total, (grads, labels, weights)
  order, sorted_hidden, sorted_labels, sorted_weights = _supervised_first(hidden, labels, weights)
  total, (hidden_grad, kernel_grad) = _loss_and_grads(sorted_hidden, kernel, sorted_labels, sorted_weights,
                                                      chunk_size)
  # Back to each row's original order: a gather by the inverse permutation, not a scatter.
  hidden_grad = _permute_rows(hidden_grad, jnp.argsort(order, axis=1))
  return total, ((hidden_grad, kernel_grad), labels, weights)


def _fused_loss_bwd(chunk_size, supervised_first, residuals, total_grad):
  del supervised_first
  (hidden_grad, kernel_grad), labels, weights = residuals
  scale = lambda g: (g.astype(jnp.float32) * total_grad).astype(g.dtype)
  # Integer labels take a float0 cotangent; weights are data, not parameters: no gradient.
  labels_grad = jnp.zeros(labels.shape, jax.dtypes.float0)
  return scale(hidden_grad), scale(kernel_grad), labels_grad, jnp.zeros_like(weights)


_fused_loss.defvjp(_fused_loss_fwd, _fused_loss_bwd)


def next_token_loss(hidden, kernel, labels, segment_ids=None, ignore_index: int = IGNORE_INDEX, chunk_size: int = 4096):
  """(Σ CE, number of supervised tokens) for next-token prediction.

  labels (B, L) are aligned with the inputs (HF convention): position t predicts labels[t + 1]. A target is
  supervised when it is not `ignore_index` and, in packed rows, belongs to the same segment as the position
  predicting it (the first token of a sample is never predicted from the previous sample).
  """
  targets = labels[:, 1:]
  weights = (targets != ignore_index) & (targets >= 0)     # never a placeholder id such as -200
  if segment_ids is not None:
    weights &= (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] != 0)
  return linear_cross_entropy(hidden[:, :-1], kernel, jnp.where(weights, targets, 0), weights, chunk_size)
