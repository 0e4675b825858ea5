"""The jitted train step: micro-batch accumulation, frozen modules, non-finite guard, AdamW update.

The loss is the mean cross-entropy over every supervised token of the global batch: each micro-batch
contributes its sum and its token count, and only the totals are divided, so k micro-batches give exactly
the gradient of one k-times batch (and on a mesh the sums are global before the division).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from hico_jax.data import IMAGENET_MEAN, IMAGENET_STD, order
from hico_jax.models.hico import HiCo



def normalize_frames(frames_uint8):
  """uint8 (..., 3) resized frames -> float32 normalised, on device (4x fewer bytes cross the host link);
  the same arithmetic as hico_jax.data.video.normalize."""
  mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
  std = jnp.asarray(IMAGENET_STD, jnp.float32)
  return (frames_uint8.astype(jnp.float32) / 255.0 - mean) / std


def init_state(params, optimizer) -> dict:
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params),
          "skipped_updates": jnp.zeros((), jnp.int32)}


def make_train_step(model: HiCo, optimizer: optax.GradientTransformation, frozen, *, accumulation_steps: int = 1,
                    schedules: dict | None = None, seq_shards: int = 1):
  """step(state, batch) -> (state, metrics). batch: input_ids, targets, segment_ids, positions (B, L) and
  frames (B, F, S, S, 3) uint8; with images also tiles (B, N, S, S, 3) uint8 and visual_index (B, L).
  `frozen` is a tree of bools like params. With `seq_shards` > 1 the rows arrive zig-zagged
  (hico_jax.data.pipeline) and the model is told each token's original index."""

  def micro_sums(params, micro):
    # Frozen leaves are constants to autodiff: XLA then drops their weight-gradient matmuls.
    params = jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params, frozen)
    # A stage of still images only has rows of no frames (data.frame_budget 0): no video to encode.
    video = normalize_frames(micro["frames"])[:, None] if micro["frames"].shape[1] else None
    slots = None
    # Rows with images carry their tiles and each placeholder's index into the row's visual tokens (video
    # tokens, then tile tokens), an index that moves with its token when rows are zig-zagged.
    images = normalize_frames(micro["tiles"]) if "tiles" in micro else None
    visual_index = micro.get("visual_index")
    if seq_shards > 1:
      rows, length = micro["input_ids"].shape
      slots = jnp.broadcast_to(jnp.asarray(order.zigzag_slots(length, seq_shards)), (rows, length))
    total, count = model.apply({"params": params}, micro["input_ids"], micro["targets"], video,
                               segment_ids=micro["segment_ids"], positions=micro["positions"], slots=slots,
                               images=images, visual_index=visual_index, method=HiCo.loss_sums)
    return total, count

  grad_of_sum = jax.value_and_grad(micro_sums, has_aux=True)

  def split(batch):
    rows = batch["input_ids"].shape[0]
    if rows % accumulation_steps:
      raise ValueError(f"batch of {rows} rows does not split into {accumulation_steps} micro-batches")
    return jax.tree.map(lambda x: x.reshape(accumulation_steps, rows // accumulation_steps, *x.shape[1:]), batch)

  def step(state, batch):
    params = state["params"]
    zeros = jax.tree.map(jnp.zeros_like, params)

    def accumulate(carry, micro):
      total, count, grads = carry
      (micro_total, micro_count), micro_grads = grad_of_sum(params, micro)
      return (total + micro_total, count + micro_count, jax.tree.map(jnp.add, grads, micro_grads)), None

    batch = {k: v for k, v in batch.items()
             if k in ("input_ids", "targets", "segment_ids", "positions", "frames", "tiles", "visual_index")}
    (total, count, grads), _ = jax.lax.scan(accumulate, (jnp.zeros(()), jnp.zeros(()), zeros), split(batch))
    denominator = jnp.maximum(count, 1.0)
    loss = total / denominator
    grads = jax.tree.map(lambda g: g / denominator, grads)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)

    # A non-finite loss or gradient skips the update (params and moments unchanged) and is counted.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = {"step": state["step"] + 1, "params": keep(new_params, params),
                 "opt_state": keep(opt_state, state["opt_state"]),
                 "skipped_updates": state["skipped_updates"] + (~finite).astype(jnp.int32)}
    metrics = {"loss": loss, "grad_norm": grad_norm, "num_tokens": count, "finite": finite}
    for group, schedule in (schedules or {}).items():
      metrics[f"lr/{group}"] = schedule(state["step"])
    return new_state, metrics

  return step
