"""Progressive visual dropout: the video-level half of HiCo (spec: videochat_flash.md §4, `flash_rank_drop`).

After decoder layer l for each l in `layers` ("4" means after 4 layers have run), stage k keeps
int(N·ratios[k+1]) of the sample's int(N·ratios[k]) current visual tokens, N being the sample's visual tokens
at the input. A stage selects either uniformly (torch's CPU integer linspace, reproduced exactly) or by text
guidance (the next layer's attention from the query rows to the visual tokens, averaged over heads and rows).

Two forms with one semantics; both act on a `DropState` of per-token (B, L) arrays:
  masked     the row keeps its length. A dropped token's segment id becomes the negative of its sample's, so
             no other token sees it while it still sees itself (no empty softmax row, any attention kernel,
             the ring included). Later positions in the sample shift down by the tokens dropped before them
             (the reference's renumbering), and pre-shifted targets move to the token that now precedes their
             label. Works for packed rows, padding and any token order (`slots`: sequence parallelism).
  compacted  the same state gathered into a shorter row of a static length (`compacted_lengths`, from the
             visual-token counts of the batch's bucket), so later layers really do less work.

Where we differ from the reference on purpose: batches, packing and padding work (it asserts batch 1); ties
in the text-guided top-k go to the earlier token (torch leaves them unspecified); the training query rule
"i−1 where labels[i] is supervised and labels[i−1] is not" is applied for i ≥ 1 within each sample (the
reference's i = 0 wraps round to the row's last label, which only bites padded rows); and the training rule
reads at most `query_rows` query rows per packed row (the first ones), where the reference averages all of
them. Every supervised '\n', <|im_start|> and <|im_end|> opens a run, so a turn brings about two: the default
64 covers some thirty turns a row; raise it for longer chats (the cost is 64 query rows against L keys).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hico_jax.config_dicts import dataclass_from_dict
from hico_jax.ops.attention_blocks import attention_mask
from hico_jax.tokens import IGNORE_INDEX

TYPES = ("uniform", "attention", "uniform0_attention", "uniform1_attention")


@dataclasses.dataclass(frozen=True)
class VisualDropoutConfig:
  type: str = "uniform0_attention"
  layers: tuple[int, ...] = (4, 18)
  ratios: tuple[float, ...] = (1.0, 0.75, 0.25)
  query_rows: int = 64      # text-guided selection reads at most this many query rows per packed row

  @classmethod
  def from_dict(cls, fields: dict[str, Any]) -> "VisualDropoutConfig":
    fields = dict(fields)
    for name in ("layers", "ratios"):
      if name in fields:
        fields[name] = tuple(fields[name])
    return dataclass_from_dict(cls, fields, "visual_dropout")

  def check(self, num_layers: int):
    if self.type not in TYPES:
      raise ValueError(f"visual_dropout.type={self.type!r} is not one of {TYPES}")
    if len(self.ratios) != len(self.layers) + 1:
      raise ValueError(f"visual_dropout needs one ratio more than layers (the first is the input's), got "
                       f"layers={list(self.layers)} and ratios={list(self.ratios)}")
    if list(self.layers) != sorted(set(self.layers)) or not all(0 < l < num_layers for l in self.layers):
      raise ValueError(f"visual_dropout.layers={list(self.layers)} must increase strictly within "
                       f"1..{num_layers - 1} (a drop after l layers needs layer l to exist)")
    if not all(0 < r <= 1 for r in self.ratios) or list(self.ratios) != sorted(self.ratios, reverse=True):
      raise ValueError(f"visual_dropout.ratios={list(self.ratios)} must be in (0, 1] and non-increasing")
    if self.query_rows < 1:
      raise ValueError(f"visual_dropout.query_rows={self.query_rows} must be >= 1")

  def stage_bounds(self, num_layers: int) -> list[tuple[int, int]]:
    """[start, stop) layer ranges between drops: layers (4, 18) of 28 -> [(0, 4), (4, 18), (18, 28)]."""
    edges = [0, *self.layers, num_layers]
    return list(zip(edges[:-1], edges[1:]))

  def selection(self, stage: int) -> str:
    """'uniform' or 'attention' for drop `stage` (0 = the first drop), as the reference names the types."""
    uniform_stages = {"uniform": len(self.layers), "attention": 0, "uniform0_attention": 1,
                      "uniform1_attention": 2}[self.type]
    return "uniform" if stage < uniform_stages else "attention"


def uniform_indices(cur: int, keep: int) -> np.ndarray:
  """`torch.linspace(0, cur - 1, keep, dtype=torch.long)` on CPU, exactly: torch steps in float64 from both
  ends (the first half counts up from 0, the second half down from cur − 1) and truncates. A plain
  floor(i · step) differs in about 3% of (cur, keep) pairs."""
  if not 1 <= keep <= cur:
    raise ValueError(f"need 1 <= keep <= cur, got cur={cur}, keep={keep}")
  if keep == 1:
    return np.zeros(1, np.int64)
  step = (cur - 1) / (keep - 1)
  i = np.arange(keep)
  up = np.trunc(i * step)
  down = np.trunc((cur - 1) - step * (keep - 1 - i))
  return np.where(i < keep // 2, up, down).astype(np.int64)


def stage_counts(num_visual: int, ratios: Sequence[float], stage: int) -> tuple[int, int]:
  """(cur, keep) of a sample with `num_visual` visual tokens at drop `stage`: Python's int(N · ratio)."""
  return int(num_visual * ratios[stage]), int(num_visual * ratios[stage + 1])


def compacted_lengths(config: VisualDropoutConfig, length: int, visual_counts: Sequence[Sequence[int]]):
  """Static row lengths after each drop for rows of `length` tokens whose samples have these visual-token
  counts (one list per row): the longest row after each drop, so that every row fits."""
  lengths, dropped = [], [0] * len(visual_counts)
  for stage in range(len(config.layers)):
    for row, counts in enumerate(visual_counts):
      dropped[row] += sum(int(np.subtract(*stage_counts(n, config.ratios, stage))) for n in counts)
    lengths.append(int(length - min(dropped)))
  return tuple(lengths)


class DropState(NamedTuple):
  """Per-token (B, L) arrays in the row's current token order.

  segment_ids  > 0 sample, 0 padding, < 0 dropped (minus its sample's id)
  positions    RoPE positions, renumbered after each drop
  visual       the sample's current (not yet dropped) visual tokens
  num_visual   N: the visual tokens the token's sample had at the input
  targets      pre-shifted targets (label of the next token), or None at inference
  slots        each token's index in the original row order (None: the order is the original one)
  """
  segment_ids: jax.Array
  positions: jax.Array
  visual: jax.Array
  num_visual: jax.Array
  targets: jax.Array | None
  slots: jax.Array | None


def initial_state(visual, segment_ids, positions, targets=None, slots=None) -> DropState:
  segment_ids = segment_ids.astype(jnp.int32)
  visual = visual & (segment_ids > 0)
  in_order = lambda x: _to_original(x, slots)
  num_visual = _from_original(_segment_total(in_order(visual), in_order(segment_ids)), slots)
  return DropState(segment_ids, positions.astype(jnp.int32), visual, num_visual, targets, slots)


# ----------------------------------------------------------------------------------------------------------
# Selection: which current visual tokens stage k keeps ((B, L) bool, True only on visual tokens).

def uniform_keep(state: DropState, ratios: Sequence[float], stage: int):
  """Keeps the tokens whose rank among the sample's current visual tokens is in uniform_indices(cur, keep)."""
  seg = _to_original(state.segment_ids, state.slots)
  rank = _from_original(_count_before(_to_original(state.visual, state.slots), seg), state.slots)
  cur = _python_int_product(state.num_visual, ratios[stage])
  keep = _python_int_product(state.num_visual, ratios[stage + 1])
  # float64 like torch (float32 would round i·step differently for long videos).
  with jax.enable_x64(True):
    cur, keep, r = (x.astype(jnp.float64) for x in (cur, keep, rank))
    step = (cur - 1) / jnp.maximum(keep - 1, 1)
    # torch's index i lands on rank r only for i within a step of r / step: test the neighbours exactly.
    guess = jnp.floor(r / jnp.maximum(step, 1))
    hit = jnp.zeros(r.shape, bool)
    for delta in (-1.0, 0.0, 1.0, 2.0):
      i = guess + delta
      # The barrier keeps XLA from fusing the product into a fused multiply-add, which rounds once instead
      # of twice and would differ from torch exactly where it matters (products that land on integers).
      up = jnp.trunc(jax.lax.optimization_barrier(i * step))
      down = jnp.trunc((cur - 1) - jax.lax.optimization_barrier(step * (keep - 1 - i)))
      value = jnp.where(keep == 1, 0.0, jnp.where(i < jnp.floor(keep / 2), up, down))
      hit = hit | ((value == r) & (i >= 0) & (i < keep))
  return state.visual & hit


def query_rows(state: DropState):
  """(B, L) bool: the rows whose attention guides the selection.

  Inference (no targets): each sample's last current token (the reference: the last prompt token).
  Training: every current token whose target is supervised while the previous current token's is not (the
  reference: i − 1 wherever labels[i] != -100 and labels[i − 1] == -100)."""
  slots = state.slots
  seg = _to_original(state.segment_ids, slots)
  live = seg > 0
  index = jnp.arange(seg.shape[1])[None, :]
  if state.targets is None:
    # Last live token of its sample: the next live token (if any) belongs to another sample.
    next_live = _next_index(live)
    next_seg = jnp.take_along_axis(jnp.pad(seg, ((0, 0), (0, 1))), next_live, axis=1)
    return _from_original(live & (next_seg != seg), slots)
  targets = _to_original(state.targets, slots)
  prev_live = jax.lax.cummax(jnp.where(live, index, -1), axis=1)
  prev_live = jnp.concatenate([jnp.full_like(prev_live[:, :1], -1), prev_live[:, :-1]], axis=1)
  prev_target = jnp.take_along_axis(targets, jnp.maximum(prev_live, 0), axis=1)
  prev_seg = jnp.take_along_axis(seg, jnp.maximum(prev_live, 0), axis=1)
  first = (prev_live < 0) | (prev_seg != seg)
  return _from_original(live & (targets >= 0) & ~first & (prev_target < 0), slots)


def attention_scores(q, k, state: DropState, max_rows: int):
  """(B, L) float32: each token's attention from its sample's query rows, averaged over heads and rows.

  q (B, L, N, H) and k (B, L, K, H) are the next layer's, from its input norm with RoPE at the current
  positions. Only the first `max_rows` query rows of each packed row are read, which keeps this cheap (M
  rows against L keys, not L against L)."""
  batch, length, num_heads, head_dim = q.shape
  num_kv = k.shape[2]
  is_query = query_rows(state)
  rows = min(max_rows, length)
  order = jnp.argsort(~is_query, axis=1, stable=True)[:, :rows]                     # (B, M) query tokens first
  valid = jnp.take_along_axis(is_query, order, axis=1)
  q_rows = jnp.take_along_axis(q, order[:, :, None, None], axis=1)
  q_rows = q_rows.reshape(batch, rows, num_kv, num_heads // num_kv, head_dim)
  logits = jnp.einsum("bmkgh,blkh->bkgml", q_rows, k, preferred_element_type=jnp.float32) * head_dim ** -0.5
  slots = state.slots if state.slots is not None else jnp.broadcast_to(jnp.arange(length), (batch, length))
  q_seg = jnp.take_along_axis(state.segment_ids, order, axis=1)
  q_slot = jnp.take_along_axis(slots, order, axis=1)
  visible = attention_mask(rows, length, q_seg, state.segment_ids, q_slot, True, slots) & valid[:, :, None]
  logits = jnp.where(visible[:, None, None], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1) * valid[:, None, None, :, None]
  per_row = jnp.mean(probs, axis=(1, 2))                                             # (B, M, L)
  same_sample = valid[:, :, None] & (q_seg[:, :, None] == jnp.abs(state.segment_ids)[:, None, :])
  count = jnp.sum(same_sample, axis=1)
  return jnp.sum(per_row * same_sample, axis=1) / jnp.maximum(count, 1)


def attention_keep(scores, state: DropState, ratios: Sequence[float], stage: int):
  """Keeps each sample's top int(N · ratio) current visual tokens by score; ties go to the earlier token."""
  batch, length = scores.shape
  slots = state.slots if state.slots is not None else jnp.broadcast_to(jnp.arange(length), (batch, length))
  group = jnp.where(state.visual, jnp.abs(state.segment_ids), jnp.iinfo(jnp.int32).max)
  index = jnp.broadcast_to(jnp.arange(length), (batch, length))
  # Sort by (sample, score descending, original slot): a token's place inside its sample's run is its rank.
  group_s, _, _, index_s = jax.lax.sort((group, -scores, slots, index), dimension=1, num_keys=3)
  starts = jnp.concatenate([jnp.ones_like(group_s[:, :1], bool), group_s[:, 1:] != group_s[:, :-1]], axis=1)
  rank_s = index - jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
  rank = jnp.zeros_like(rank_s).at[jnp.arange(batch)[:, None], index_s].set(rank_s)
  return state.visual & (rank < _python_int_product(state.num_visual, ratios[stage + 1]))


# ----------------------------------------------------------------------------------------------------------
# Applying a selection.

def apply_masked(state: DropState, keep) -> DropState:
  """The masked form: drop the current visual tokens not in `keep`, renumber positions, move targets."""
  slots = state.slots
  seg, dropping = _to_original(state.segment_ids, slots), _to_original(state.visual & ~keep, slots)
  new_seg = jnp.where(dropping, -jnp.abs(seg), seg)
  positions = state.positions - _from_original(_count_before(dropping, seg), slots)
  targets = state.targets
  if targets is not None:
    # A kept token now precedes the next kept token, so it predicts that token's label, which sat as the
    # target of the last token before it (the last of the dropped run, or the kept token itself).
    targets = _to_original(targets, slots)
    current = seg >= 0
    length = seg.shape[1]
    index = jnp.arange(length + 1)[None, :]
    survivor = jnp.pad(current & ~dropping, ((0, 0), (0, 1)), constant_values=True)
    next_survivor = _next_index(survivor[:, :length])
    prev_current = jax.lax.cummax(jnp.where(jnp.pad(current, ((0, 0), (0, 1))), index, -1), axis=1)
    source = jnp.take_along_axis(jnp.pad(prev_current[:, :-1], ((0, 0), (1, 0)), constant_values=-1),
                                 next_survivor, axis=1)
    moved = jnp.take_along_axis(targets, jnp.clip(source, 0, length - 1), axis=1)
    targets = _from_original(jnp.where(current & ~dropping, moved, IGNORE_INDEX), slots)
  return DropState(_from_original(new_seg, slots), positions, state.visual & keep, state.num_visual, targets,
                   slots)


def compact(hidden, state: DropState, length: int):
  """The compacted form of a masked state: the tokens not dropped, in order, in rows of `length` tokens;
  the rest of a row is padding (segment 0). hidden (B, L, D) -> (B, length, D)."""
  if state.slots is not None:
    raise ValueError("the compacted form needs rows in their original order; use the masked form with slots")
  order = jnp.argsort(state.segment_ids < 0, axis=1, stable=True)[:, :length]
  take = lambda x: jnp.take_along_axis(x, order, axis=1)
  segment_ids = take(state.segment_ids)
  segment_ids = jnp.where(segment_ids < 0, 0, segment_ids)
  targets = None if state.targets is None else jnp.where(segment_ids > 0, take(state.targets), IGNORE_INDEX)
  return (jnp.take_along_axis(hidden, order[:, :, None], axis=1),
          DropState(segment_ids, take(state.positions), take(state.visual) & (segment_ids > 0),
                    take(state.num_visual), targets, None))


# ----------------------------------------------------------------------------------------------------------
# Helpers over (B, L) rows in original order, where each sample is one contiguous run.

def _to_original(x, slots):
  if slots is None:
    return x
  return jnp.zeros_like(x).at[jnp.arange(x.shape[0])[:, None], slots].set(x)


def _from_original(x, slots):
  return x if slots is None else jnp.take_along_axis(x, slots, axis=1)


def _sample_starts(segment_ids):
  sample = jnp.abs(segment_ids)
  return jnp.concatenate([jnp.ones_like(sample[:, :1], bool), sample[:, 1:] != sample[:, :-1]], axis=1)


def _count_before(flags, segment_ids):
  """How many flagged tokens of the same sample come before each token."""
  flags = flags.astype(jnp.int32)
  exclusive = jnp.cumsum(flags, axis=1) - flags
  return exclusive - jax.lax.cummax(jnp.where(_sample_starts(segment_ids), exclusive, 0), axis=1)


def _segment_total(flags, segment_ids):
  """The number of flagged tokens in each token's sample."""
  flags = flags.astype(jnp.int32)
  inclusive = jnp.cumsum(flags, axis=1)
  start = jax.lax.cummax(jnp.where(_sample_starts(segment_ids), inclusive - flags, 0), axis=1)
  ends = jnp.concatenate([_sample_starts(segment_ids)[:, 1:], jnp.ones_like(flags[:, :1], bool)], axis=1)
  end = jax.lax.cummin(jnp.where(ends, inclusive, jnp.iinfo(jnp.int32).max), axis=1, reverse=True)
  return end - start


def _next_index(flags):
  """For each token, the index of the next flagged token after it (the row length if none)."""
  length = flags.shape[1]
  index = jnp.arange(length)[None, :]
  following = jnp.concatenate([flags[:, 1:], jnp.zeros_like(flags[:, :1])], axis=1)
  return jax.lax.cummin(jnp.where(following, index + 1, length), axis=1, reverse=True)


def _python_int_product(counts, ratio: float):
  """int(N · ratio) as Python computes it (float64), for int32 counts."""
  with jax.enable_x64(True):
    return jnp.trunc(counts.astype(jnp.float64) * ratio).astype(jnp.int32)
