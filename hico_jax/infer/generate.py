"""Generation: one prefill over the prompt, then a decode loop over a preallocated KV cache.

Everything has static shapes under one jit: the cache holds prompt + max_new_tokens slots, and a
`lax.while_loop` stops early once every row has produced an eos id. Prompts may be left- or right-padded
(attention_mask 0 on padding): padding gets segment id 0, so no real token ever attends to it, and each
row's positions count only its real tokens, so a padded row decodes exactly as it would alone.

The prefill never forms an (L x L) matrix: rows are moved to right padding first (real tokens, then
padding), so causality alone keeps real tokens off the padding, and the prompt attends to itself through the
model's kernel without a mask (cuDNN's flash attention on GPUs, splash on TPUs, the chunked online softmax
elsewhere) while its keys and values go into the cache. Decoding reads the cache one query at a time.

A prompt that starts with an earlier prompt (a chat's next turn: the same system turn, video and history, then
new text) can reuse that prompt's cache (`PromptCache`, from `generate(..., return_cache=True)`): only the new
tokens run, against the cached keys and values, instead of a prefill over the whole video again.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hico_jax.models import qwen2, visual_dropout


def sample_token(logits, rng, temperature: float, top_p: float):
  """(B, V) logits -> (B,) ids: argmax when temperature == 0, else temperature + nucleus (top-p) sampling."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is < top_p.
    keep = (cumulative - jax.nn.softmax(sorted_logits, axis=-1)) < top_p
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits >= threshold, logits, -jnp.inf)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class PromptCache:
  """The KV cache generation left after a prompt, for a later prompt that starts with the same tokens.

  Its slots [0, length) hold the prompt's real tokens in order; padding and the generated tokens come after
  them, and a continuation overwrites or masks those."""
  cache: tuple            # qwen2.init_cache's stage dicts, on the device
  ids: np.ndarray         # the prompt's ids in the caller's form (a video placeholder unexpanded), no padding
  length: int             # the prompt's real tokens in the cache (a video's visual tokens counted)


# A continuation that does not fit in the cached prompt's cache gets one this many slots longer at a time, so
# that the turns of a conversation share one cache shape (and one compiled program) until it fills.
CACHE_GROWTH = 1024


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "eos_ids", "pad_id", "temperature",
                                             "top_p", "compact_lengths", "cache_growth"))
def _generate(model, params, input_ids, attention_mask, embeddings, visual_mask, rng, prefix=None, *,
              max_new_tokens, eos_ids, pad_id, temperature, top_p, compact_lengths, cache_growth=0):
  batch, prompt_len = attention_mask.shape
  mask = attention_mask.astype(jnp.int32)
  if prefix is None:
    lengths = jnp.sum(mask, axis=1)                                   # real tokens per row
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    # With compacted visual dropout the later stages hold fewer prompt tokens, so their caches are shorter.
    num_drops = len(model.dropout.layers) if model.dropout else 0
    stage_lengths = [prompt_len, *(compact_lengths or [prompt_len] * num_drops)]
    cache = qwen2.init_cache(model.config, batch, [n + max_new_tokens for n in stage_lengths], model.dropout)
    _, aux = model.apply(params, input_ids, embeddings=embeddings, segment_ids=mask, positions=positions,
                         cache=cache, return_logits=False, visual_mask=visual_mask,
                         compact_lengths=compact_lengths, prefill=True, right_padded=True)
  else:
    # The new tokens (right-padded) go in after the cached prompt's `prefix` real tokens and attend to them and
    # to each other through the cache: what a prefill of the whole prompt would have put there.
    old_cache, prefix_len = prefix
    cache = _extend_cache(old_cache, prefix_len, cache_growth)
    lengths = prefix_len + jnp.sum(mask, axis=1)
    positions = prefix_len + jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    _, aux = model.apply(params, input_ids, embeddings=embeddings, segment_ids=mask, positions=positions,
                         cache=cache, return_logits=False)
  live = aux.get("segment_ids", mask) > 0                             # after dropout, in its (compacted) rows
  last_real = live.shape[1] - 1 - jnp.argmax(live[:, ::-1], axis=1)  # works for left and right padding
  last_hidden = jnp.take_along_axis(aux["hidden"], last_real[:, None, None], axis=1)   # (B, 1, D)
  logits = model.apply(params, last_hidden, method=qwen2.Qwen2ForCausalLM.logits)[:, 0]
  rng, step_rng = jax.random.split(rng)
  first = sample_token(logits, step_rng, temperature, top_p)
  eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)

  def cond(state):
    step, _, _, done, _, _ = state
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(state):
    step, cache, token, done, out, rng = state
    out = out.at[:, step].set(jnp.where(done, pad_id, token))
    done = done | jnp.isin(token, eos)
    logits, aux = model.apply(params, token[:, None], segment_ids=jnp.ones((batch, 1), jnp.int32),
                              positions=(lengths + step)[:, None], cache=cache)
    rng, step_rng = jax.random.split(rng)
    return step + 1, aux["cache"], sample_token(logits[:, 0], step_rng, temperature, top_p), done, out, rng

  out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32)
  state = (jnp.zeros((), jnp.int32), aux["cache"], first, jnp.zeros((batch,), bool), out, rng)
  _, cache, _, _, out, _ = jax.lax.while_loop(cond, body, state)
  return out, cache


def _extend_cache(old_cache, prefix_len, growth: int):
  """old_cache with `growth` more slots, its first prefix_len slots (the cached prompt) kept and the next write
  at prefix_len: the slots after the prefix are overwritten or stay masked (segment id 0)."""
  (old,) = old_cache                    # one stage: prompts are only reused without visual dropout
  layers = {name: jnp.pad(old["layers"][name], ((0, 0), (0, 0), (0, growth), (0, 0), (0, 0))) for name in "kv"}
  segment_ids = jnp.pad(old["segment_ids"], ((0, 0), (0, growth)))
  segment_ids = jnp.where(jnp.arange(segment_ids.shape[1])[None, :] < prefix_len, segment_ids, 0)
  return ({"layers": layers, "segment_ids": segment_ids, "index": jnp.asarray(prefix_len, jnp.int32),
           "position_offset": old["position_offset"]},)


def generate(model: qwen2.Qwen2ForCausalLM, params, input_ids, attention_mask=None, *, max_new_tokens: int = 32,
             eos_ids: Sequence[int] = (), pad_id: int = 0, temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0, embeddings=None, visual_mask=None, compact: bool = True,
             prefix: PromptCache | None = None, return_cache: bool = False, prompt_ids=None):
  """New tokens (B, max_new_tokens) int32; after a row's eos id the rest of the row is `pad_id`.

  params is the full variables dict ({"params": ...}). `embeddings` (B, L, D) replaces the embedding of
  input_ids (the multimodal model passes prompts with visual tokens spliced in). `visual_mask` (B, L) marks
  the visual tokens for a model with visual dropout: the prefill drops them (compacted rows unless
  `compact=False`) and the cache keeps only what survives.

  prefix: a PromptCache of an earlier prompt that this one continues; input_ids are then only the new tokens
  (one row, after the prefix's). return_cache: also return this prompt's PromptCache, (tokens, cache), for
  one row without visual dropout (whose kept tokens depend on the question, so a cache is never reused);
  `prompt_ids` are the ids it records (default: input_ids), in the caller's form.
  """
  input_ids = jnp.asarray(input_ids, jnp.int32)
  if input_ids.ndim != 2:
    raise ValueError(f"input_ids must be (batch, length), got shape {input_ids.shape}")
  if attention_mask is None:
    attention_mask = jnp.ones_like(input_ids)
  attention_mask = jnp.asarray(attention_mask, jnp.int32)
  if attention_mask.shape != input_ids.shape:
    raise ValueError(f"attention_mask shape {attention_mask.shape} != input_ids shape {input_ids.shape}")
  if not bool(jnp.all(jnp.sum(attention_mask, axis=1) > 0)):
    raise ValueError("every row of attention_mask needs at least one real token")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if temperature < 0 or not 0 < top_p <= 1:
    raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got temperature={temperature}, top_p={top_p}")
  if (prefix is not None or return_cache) and (model.dropout is not None or input_ids.shape[0] != 1):
    raise ValueError("a prompt's cache is kept or reused for one row of a model without visual dropout")
  if return_cache:     # what the returned cache holds, read before right_pad reorders the rows
    real = np.asarray(attention_mask[0]) > 0
    recorded = np.asarray(input_ids[0])[real] if prompt_ids is None else np.asarray(prompt_ids)
    length = int(np.sum(real))
    if prefix is not None:
      recorded, length = np.concatenate([prefix.ids, recorded]), prefix.length + length
  input_ids, attention_mask, embeddings, visual_mask = right_pad(
      input_ids, attention_mask, embeddings, visual_mask,
      multiple=1 if prefix is not None else _prefill_multiple(model.config))
  compact_lengths = None
  if visual_mask is not None and model.dropout is not None and compact:
    # One prompt per row: its visual count, read on the host, fixes the compacted lengths statically.
    counts = np.sum(np.asarray(visual_mask) & (np.asarray(attention_mask) > 0), axis=1)
    compact_lengths = visual_dropout.compacted_lengths(model.dropout, input_ids.shape[1],
                                                       [[int(n)] for n in counts])
  prefix_args, growth = None, 0
  if prefix is not None:
    prefix_args = (prefix.cache, jnp.asarray(prefix.length, jnp.int32))
    slots, needed = prefix.cache[0]["segment_ids"].shape[1], prefix.length + input_ids.shape[1] + max_new_tokens
    growth = 0 if needed <= slots else -(-needed // CACHE_GROWTH) * CACHE_GROWTH - slots
  out, cache = _generate(model, params, input_ids, attention_mask, embeddings, visual_mask, jax.random.key(seed),
                         prefix_args, max_new_tokens=int(max_new_tokens), eos_ids=tuple(int(e) for e in eos_ids),
                         pad_id=int(pad_id), temperature=float(temperature), top_p=float(top_p),
                         compact_lengths=compact_lengths, cache_growth=growth)
  out = np.asarray(out)
  if not return_cache:
    return out
  return out, PromptCache(cache=cache, ids=recorded, length=length)


def right_pad(input_ids, attention_mask, embeddings=None, visual_mask=None, *, multiple: int = 1):
  """Each row's real tokens moved to its front, in order, padding after them; the length then padded up to
  a multiple of `multiple` (a kernel's block size). Generation is the same for either padding; right
  padding lets the prefill run causal kernels without a mask."""
  order = jnp.argsort(attention_mask == 0, axis=1, stable=True)
  take = lambda x: None if x is None else jnp.take_along_axis(
      x, order.reshape(order.shape + (1,) * (x.ndim - 2)), axis=1)
  input_ids, attention_mask, embeddings, visual_mask = map(take, (input_ids, attention_mask, embeddings,
                                                                  visual_mask))
  extra = -input_ids.shape[1] % multiple
  if extra:
    pad = lambda x: None if x is None else jnp.pad(x, [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2))
    input_ids, attention_mask, embeddings, visual_mask = map(pad, (input_ids, attention_mask, embeddings,
                                                                   visual_mask))
  return input_ids, attention_mask, embeddings, visual_mask


def _prefill_multiple(config: qwen2.Qwen2Config) -> int:
  # Splash's blocks are 128 tokens, 512 past 512 (ops/attention_blocks.py): the prompt is padded to them.
  return 512 if config.attention_impl == "splash" else 1
