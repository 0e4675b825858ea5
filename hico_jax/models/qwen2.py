"""Qwen2 / Qwen2.5 decoder in Flax linen, weight-compatible with transformers' Qwen2ForCausalLM.

RMSNorm in float32, rotate-half RoPE (configurable theta, YaRN), grouped-query attention with q/k/v bias, SwiGLU
MLP, tied or untied head. The layers' parameters are stacked along a leading axis and run as a `lax.scan`
(compile time independent of depth) under `jax.checkpoint` with the policy the config names; progressive
visual dropout (hico_jax.models.visual_dropout) splits the stack into stages between drops. Every parameter
carries logical axis names and every large activation a logical constraint; `hico_jax.sharding` maps both
onto the mesh.

Packed rows: `segment_ids` (B, L) separate samples (0 = padding) and `positions` restart per sample.
Decoding: a preallocated KV cache (`init_cache`, one part per stage) that the forward pass fills.

Inference may hold the layers' parameters one buffer per layer instead (`unstack_layers`); decoding then runs
them as an unrolled loop. A layer of the stacked form inside a scan is a slice that XLA copies out before every
matmul, which costs as much as reading the weights: decoding a 7B model on an H200 took 11.7 ms a token stacked
and 5.2 per layer (docs/benchmarks.md). Training keeps the stacked form (the checkpoint layout).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from hico_jax.config_dicts import dataclass_from_dict
from hico_jax.models import visual_dropout
from hico_jax.models.layers import (ATTENTION_INPUT_NAMES, DTYPES, MLP_HIDDEN_NAME, REMAT_POLICIES, Projection,
                                    constrain, normal_init)
from hico_jax.models.visual_dropout import VisualDropoutConfig
from hico_jax.ops import attention as attention_ops
from hico_jax.ops import rope

@dataclasses.dataclass(frozen=True)
class Qwen2Config:
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 1e6
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 32768
  dtype: str = "bfloat16"          # compute
  param_dtype: str = "float32"     # master weights
  remat_policy: str = "full"
  attention_impl: str = "xla"      # xla | cudnn | ring | all_gather (hico_jax.ops.attention)
  attention_block_impl: str = "xla"   # ring / all_gather per-block kernel: xla | cudnn | splash
  # None: plain RoPE. YaRN (rope.YarnScaling, or its config.json dict) stretches it past the trained context.
  rope_scaling: rope.YarnScaling | None = None

  def __post_init__(self):
    # A dict arrives from config.json, a ConfigDict or a saved run config; jit needs the config hashable,
    # and a bad factor should fail here, not at the first trace.
    if self.rope_scaling is not None and not isinstance(self.rope_scaling, rope.YarnScaling):
      if not hasattr(self.rope_scaling, "keys"):
        raise ValueError(f"rope_scaling must be None, a YarnScaling or a dict, got {self.rope_scaling!r}")
      try:
        scaling = rope.YarnScaling.from_dict(self.rope_scaling, self.max_position_embeddings)
      except ValueError as e:
        raise ValueError(f"rope_scaling: {e}") from None
      object.__setattr__(self, "rope_scaling", scaling)

  @classmethod
  def from_dict(cls, fields: dict[str, Any]) -> "Qwen2Config":
    config = dataclass_from_dict(cls, fields, "Qwen2")
    config.check()
    return config

  def check(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy={self.remat_policy!r} is not one of {sorted(REMAT_POLICIES)}")
    if self.attention_impl not in attention_ops.IMPLEMENTATIONS:
      raise ValueError(f"attention_impl={self.attention_impl!r} is not one of {attention_ops.IMPLEMENTATIONS}")
    if self.attention_block_impl not in attention_ops.BLOCK_IMPLEMENTATIONS:
      raise ValueError(f"attention_block_impl={self.attention_block_impl!r} is not one of "
                       f"{attention_ops.BLOCK_IMPLEMENTATIONS}")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in DTYPES:
        raise ValueError(f"{name}={getattr(self, name)!r} is not one of {sorted(DTYPES)}")

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  @property
  def weight_dtype(self):
    return DTYPES[self.param_dtype]


class RMSNorm(nn.Module):
  """Normalises in float32, casts back, then scales: transformers' order, which matters in bf16."""
  eps: float
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return scale.astype(self.dtype) * normed.astype(self.dtype)


class Attention(nn.Module):
  config: Qwen2Config

  def setup(self):
    cfg = self.config
    d, h = cfg.hidden_size, cfg.head_dim

    def project_in(heads, heads_name):
      return Projection("bld,dnh->blnh", (d, heads, h), ("embed", heads_name, "head_dim"),
                        (heads_name, "head_dim"), cfg.compute_dtype, cfg.weight_dtype)

    self.q_proj = project_in(cfg.num_heads, "heads")
    self.k_proj = project_in(cfg.num_kv_heads, "kv_heads")
    self.v_proj = project_in(cfg.num_kv_heads, "kv_heads")
    self.o_proj = Projection("blnh,nhd->bld", (cfg.num_heads, h, d), ("heads", "head_dim", "embed"), None,
                             cfg.compute_dtype, cfg.weight_dtype)

  def query_key(self, x, cos, sin):
    """RoPE'd queries (B, L, N, H) and keys (B, L, K, H) of the normed input x."""
    return rope.apply_rope(self.q_proj(x), cos, sin), rope.apply_rope(self.k_proj(x), cos, sin)

  def __call__(self, x, meta, kv_cache):
    q, k = self.query_key(x, meta["cos"], meta["sin"])
    v = self.v_proj(x)
    query, key, value = ATTENTION_INPUT_NAMES
    q = checkpoint_name(constrain(q, ("act_batch", "act_len", "act_heads", "act_head_dim")), query)
    k = checkpoint_name(constrain(k, ("act_batch", "act_len", "act_kv_heads", "act_head_dim")), key)
    v = checkpoint_name(constrain(v, ("act_batch", "act_len", "act_kv_heads", "act_head_dim")), value)

    q_slots, kv_slots, kv_segment_ids = meta["slots"], meta["slots"], meta["segment_ids"]
    keys, values = k, v
    if kv_cache is not None and "layer" in kv_cache:
      # Decode: kv_cache holds the whole stage's stacked K/V; only this step's slots are written, in place.
      layer, index = kv_cache["layer"], meta["cache_index"]
      write = lambda stack, new: jax.lax.dynamic_update_slice(stack, new[None].astype(stack.dtype),
                                                              (layer, 0, index, 0, 0))
      kv_cache = {"k": write(kv_cache["k"], k), "v": write(kv_cache["v"], v), "layer": layer}
      keys, values = (jax.lax.dynamic_index_in_dim(kv_cache[name], layer, keepdims=False) for name in "kv")
      q_slots, kv_slots, kv_segment_ids = meta["q_slots"], None, meta["kv_segment_ids"]
    elif kv_cache is not None:
      index = meta["cache_index"]
      keys = jax.lax.dynamic_update_slice(kv_cache["k"], k.astype(kv_cache["k"].dtype), (0, index, 0, 0))
      values = jax.lax.dynamic_update_slice(kv_cache["v"], v.astype(kv_cache["v"].dtype), (0, index, 0, 0))
      kv_cache = {"k": keys, "v": values}
      if meta["prefill"]:
        # The prompt fills an empty cache, so it attends to its own keys alone, through the configured kernel
        # (cuDNN's, splash's, the chunked or the ring): never scores against the whole cache, whose (L x L)
        # float32 matrix is what a long prompt cannot hold.
        keys, values = k, v
      else:
        q_slots, kv_slots, kv_segment_ids = meta["q_slots"], None, meta["kv_segment_ids"]

    out = attention_ops.attention(
        q, keys, values, q_segment_ids=meta["segment_ids"], kv_segment_ids=kv_segment_ids, q_slots=q_slots,
        kv_slots=kv_slots, impl=self.config.attention_impl, block_impl=self.config.attention_block_impl)
    out = constrain(out, ("act_batch", "act_len", "act_heads", "act_head_dim"))
    return self.o_proj(out), kv_cache


class MLP(nn.Module):
  config: Qwen2Config

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    dense = lambda features, names, name: nn.Dense(
        features, use_bias=False, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
        kernel_init=normal_init(names), name=name)
    gate = checkpoint_name(dense(cfg.intermediate_size, ("embed", "mlp"), "gate_proj")(x), MLP_HIDDEN_NAME)
    up = checkpoint_name(dense(cfg.intermediate_size, ("embed", "mlp"), "up_proj")(x), MLP_HIDDEN_NAME)
    hidden = constrain(nn.silu(gate) * up, ("act_batch", "act_len", "act_mlp"))
    return dense(cfg.hidden_size, ("mlp", "embed"), "down_proj")(hidden)


class DecoderLayer(nn.Module):
  config: Qwen2Config

  def setup(self):
    cfg = self.config
    norm = lambda: RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype, cfg.weight_dtype)
    self.input_layernorm = norm()
    self.self_attn = Attention(cfg)
    self.post_attention_layernorm = norm()
    self.mlp = MLP(cfg)

  def attention_query_key(self, x, cos, sin):
    """This layer's attention queries and keys for the input x: what text-guided visual dropout reads."""
    return self.self_attn.query_key(self.input_layernorm(x), cos, sin)

  def __call__(self, x, meta, kv_cache):
    x, kv_cache = self.attend(x, meta, kv_cache)
    return self.feed_forward(x), kv_cache

  def attend(self, x, meta, kv_cache):
    """The attention half: x + attention(norm(x)), and the updated KV cache."""
    h, kv_cache = self.self_attn(self.input_layernorm(x), meta, kv_cache)
    return x + h, kv_cache

  def feed_forward(self, x):
    """The MLP half: x + mlp(norm(x)). Token-wise, so it may run on any slice of the sequence."""
    x = x + self.mlp(self.post_attention_layernorm(x))
    return constrain(x, ("act_batch", "act_len", "act_emb"))


def positions_from_segments(segment_ids):
  """Per-token positions that restart at 0 wherever the segment id changes along the row."""
  length = segment_ids.shape[1]
  index = jnp.arange(length)[None, :]
  starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                            segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  start_index = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
  return index - start_index


# A prefill longer than this runs each layer's MLP this many tokens at a time: its (L, intermediate) gate, up
# and product are 18 GB at 160,000 tokens for a 7B model (Qwen2-7B: 18,944 wide), the largest transient of a
# long prefill, and the MLP is token-wise, so the chunks change nothing but the peak.
PREFILL_MLP_CHUNK = 8192


def init_cache(config: Qwen2Config, batch: int, lengths: int | Sequence[int],
               dropout: VisualDropoutConfig | None = None, dtype=None) -> tuple[dict, ...]:
  """An empty KV cache: one dict per stage of layers between visual drops (one stage without dropout).

  Each stage holds its layers' K/V, the segment id of every slot (0 = empty, < 0 = a dropped token), the next
  write index, and per row the number of tokens dropped before the stage, which decode subtracts from the
  positions (the compacted prefill renumbered them). `lengths` is the slot count, per stage or for all."""
  dtype = dtype or config.compute_dtype
  bounds = _stage_bounds(config, dropout)
  if isinstance(lengths, int):
    lengths = [lengths] * len(bounds)
  if len(lengths) != len(bounds):
    raise ValueError(f"{len(lengths)} cache lengths for {len(bounds)} stages of layers {bounds}")
  caches = []
  for (start, stop), length in zip(bounds, lengths):
    shape = (stop - start, batch, length, config.num_kv_heads, config.head_dim)
    caches.append({"layers": {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)},
                   "segment_ids": jnp.zeros((batch, length), jnp.int32),
                   "index": jnp.zeros((), jnp.int32),
                   "position_offset": jnp.zeros((batch,), jnp.int32)})
  return tuple(caches)


# The key under which unstack_layers keeps layer i's parameters (in place of the stacked tree under "layers").
def layer_key(i: int) -> str:
  return f"layer_{i}"


def layers_are_unstacked(layer_params) -> bool:
  return layer_key(0) in layer_params


def unstack_layers(params: dict, *, free_stacked: bool = False) -> dict:
  """The decoder's params (the tree `Qwen2ForCausalLM` reads: "embed_tokens", "layers", ...) with "layers" as
  one tree per layer ({"layer_0": ..., "layer_1": ...}), each leaf its own buffer. free_stacked: delete each
  stacked leaf once it is split, so the device never holds more than one leaf twice (for params the caller
  owns, as from_pretrained's). Already unstacked params come back as they are."""
  stacked = params["layers"]
  if layers_are_unstacked(stacked):
    return params
  leaves, treedef = jax.tree.flatten(stacked)
  per_leaf = []
  for leaf in leaves:
    per_leaf.append([leaf[i] for i in range(leaf.shape[0])])
    if free_stacked and isinstance(leaf, jax.Array):
      jax.block_until_ready(per_leaf[-1])
      leaf.delete()
  count = len(per_leaf[0])
  layers = {layer_key(i): jax.tree.unflatten(treedef, [parts[i] for parts in per_leaf]) for i in range(count)}
  return {**params, "layers": layers}


def stack_layers(params: dict, stack=jnp.stack) -> dict:
  """unstack_layers undone: "layers" as the stacked tree (the training and checkpoint layout); `stack` joins
  the layers' leaves (np.stack to build it on the host)."""
  layers = params["layers"]
  if not layers_are_unstacked(layers):
    return params
  per_layer = [layers[layer_key(i)] for i in range(len(layers))]
  return {**params, "layers": jax.tree.map(lambda *parts: stack(parts), *per_layer)}


def _stage_bounds(config: Qwen2Config, dropout: VisualDropoutConfig | None):
  return [(0, config.num_layers)] if dropout is None else dropout.stage_bounds(config.num_layers)


class Qwen2ForCausalLM(nn.Module):
  """`__call__` returns (logits, aux): logits (B, L, V) in the compute dtype; aux["hidden"] is the final
  normed hidden state and aux["cache"] the updated KV cache (None without one). With visual dropout aux also
  holds the final per-token "segment_ids", "positions" and "targets" (the rows may be shorter: compacted).

  The layers' parameters are one stacked tree (created by `nn.scan`, the checkpoint layout); the forward
  pass runs them as one `lax.scan` per stage of layers between visual drops, under `jax.checkpoint` with the
  configured policy."""
  config: Qwen2Config
  dropout: VisualDropoutConfig | None = None

  def setup(self):
    cfg = self.config
    if self.dropout is not None:
      self.dropout.check(cfg.num_layers)
    self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.compute_dtype,
                                 param_dtype=cfg.weight_dtype, embedding_init=normal_init(("vocab", "embed")))
    self.layers = nn.scan(DecoderLayer, variable_axes={"params": 0}, split_rngs={"params": True},
                          in_axes=(nn.broadcast, 0), length=cfg.num_layers,
                          metadata_params={nn.PARTITION_NAME: "layers"})(cfg)
    self.norm = RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype, cfg.weight_dtype)
    if not cfg.tie_word_embeddings:
      self.lm_head = nn.Dense(cfg.vocab_size, use_bias=False, dtype=cfg.compute_dtype,
                              param_dtype=cfg.weight_dtype, kernel_init=normal_init(("embed", "vocab")))

  def embed(self, input_ids):
    """(B, L) int ids -> (B, L, D) embeddings in the compute dtype."""
    return constrain(self.embed_tokens(input_ids), ("act_batch", "act_len", "act_emb"))

  def head_kernel(self):
    """The output head as a (D, V) matrix in the compute dtype (the embedding, transposed, when tied), for
    the fused loss in hico_jax.ops.loss, which never forms all logits at once."""
    if self.config.tie_word_embeddings:
      return self.embed_tokens.embedding.T.astype(self.config.compute_dtype)
    return self.lm_head.variables["params"]["kernel"].astype(self.config.compute_dtype)

  def logits(self, hidden):
    if self.config.tie_word_embeddings:
      logits = self.embed_tokens.attend(hidden)
    else:
      logits = self.lm_head(hidden)
    return constrain(logits, ("act_batch", "act_len", "act_vocab"))

  def __call__(self, input_ids=None, *, embeddings=None, segment_ids=None, positions=None, cache=None,
               return_logits=True, visual_mask=None, targets=None, slots=None, compact_lengths=None,
               prefill=False, right_padded=False):
    """input_ids (B, L) or embeddings (B, L, D); segment_ids (B, L), 0 = padding; positions (B, L).

    Without a cache, positions default to restarting at every segment. With a cache (`init_cache`) the
    caller passes positions (generation knows each row's prompt length); new tokens are written at each
    stage's index. `prefill`: the cache is empty and these tokens are whole prompts, which then attend to
    themselves through the configured kernel (nothing of size L x L); `right_padded`: every row's real tokens
    come first (segment ids > 0, then padding), so causality alone keeps them off the padding and the
    kernels run without a mask. `slots` (B, L): each token's index in the original row when the data
    pipeline reordered the sequence (zig-zag for sequence parallelism); causality follows slots.

    Visual dropout runs when the model has a dropout config and `visual_mask` (B, L) marks visual tokens:
    `targets` (pre-shifted) select the training query rule and are moved with the tokens; with
    `compact_lengths` (static, `visual_dropout.compacted_lengths`) the rows are compacted, else masked.
    """
    if embeddings is None:
      embeddings = self.embed(input_ids)
    batch, length = embeddings.shape[:2]
    if positions is None:
      if cache is not None:
        raise ValueError("decoding with a KV cache needs explicit positions (B, L)")
      positions = (jnp.broadcast_to(jnp.arange(length), (batch, length)) if segment_ids is None
                   else positions_from_segments(segment_ids))
    if cache is not None and segment_ids is None:
      segment_ids = jnp.ones((batch, length), jnp.int32)
    dropping = self.dropout is not None and visual_mask is not None
    # One unpadded sequence per row needs no attention mask beyond causality, even once compacted: the
    # padding compaction leaves sits at the end of a row, where causal attention already hides it. Passing
    # no segment ids keeps fused kernels off an (L, L) mask, which long prompts could not hold.
    unmasked = segment_ids is None and cache is None and (not dropping or compact_lengths is not None)
    if cache is not None and prefill and right_padded and (not dropping or compact_lengths is not None):
      # Compaction keeps the survivors first, so compacted rows stay right-padded (the masked form does not:
      # its dropped tokens keep their places with negative segment ids).
      unmasked = True
    if dropping:
      if segment_ids is None:
        segment_ids = jnp.ones((batch, length), jnp.int32)
      state = visual_dropout.initial_state(visual_mask, segment_ids, positions, targets, slots)
    if self.is_initializing():
      # Creates the stacked parameters; the stages below read them back.
      self.layers(embeddings, self._meta(segment_ids, positions, slots), None)

    hidden, new_cache, dropped = embeddings, [], jnp.zeros((batch,), jnp.int32)
    for stage, (start, stop) in enumerate(_stage_bounds(self.config, self.dropout)):
      if stage and dropping:
        hidden, state, stage_dropped = self._drop(hidden, state, stage - 1, start, compact_lengths)
        dropped = dropped + stage_dropped
      stage_positions = positions
      if dropping:
        segment_ids, stage_positions, slots = state.segment_ids, state.positions, state.slots
      elif cache is not None:           # decode: the positions the compacted prefill would have given
        stage_positions = positions - cache[stage]["position_offset"][:, None]
      meta = self._meta(None if unmasked else segment_ids, stage_positions, slots)
      stage_cache = None
      if cache is not None:
        stage_cache = cache[stage]
        index, step_length = stage_cache["index"], hidden.shape[1]
        meta.update(
            kv_segment_ids=jax.lax.dynamic_update_slice(stage_cache["segment_ids"], segment_ids, (0, index)),
            cache_index=index, q_slots=jnp.broadcast_to(index + jnp.arange(step_length), (batch, step_length)),
            prefill=prefill)
      hidden, layer_cache = self._run_layers(hidden, meta, None if stage_cache is None else stage_cache["layers"],
                                             start, stop)
      if cache is not None:
        new_cache.append({"layers": layer_cache, "segment_ids": meta["kv_segment_ids"],
                          "index": index + hidden.shape[1],
                          "position_offset": dropped if dropping else stage_cache["position_offset"]})

    hidden = self.norm(hidden)
    aux = {"hidden": hidden, "cache": tuple(new_cache) if cache is not None else None}
    if dropping:
      aux.update(segment_ids=state.segment_ids, positions=state.positions, targets=state.targets)
    logits = self.logits(hidden) if return_logits else None
    return logits, aux

  def _meta(self, segment_ids, positions, slots):
    cos, sin = rope.rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, self.config.rope_scaling)
    return {"cos": cos, "sin": sin, "segment_ids": segment_ids, "slots": slots}

  def _layer_params(self, start, stop):
    """Layers [start, stop): their stacked tree, or a list of per-layer trees when unstacked."""
    params = nn.meta.unbox(self.layers.variables["params"])
    if layers_are_unstacked(params):
      return [params[layer_key(i)] for i in range(start, stop)]
    if (start, stop) == (0, self.config.num_layers):
      return params
    return jax.tree.map(lambda p: p[start:stop], params)

  def _run_layers(self, hidden, meta, layer_cache, start, stop):
    """Layers [start, stop), over their stacked parameters or per-layer ones (`unstack_layers`)."""
    cfg = self.config
    params = self._layer_params(start, stop)
    chunk = PREFILL_MLP_CHUNK if layer_cache is not None and hidden.shape[1] > PREFILL_MLP_CHUNK else 0

    def run_block(params, x, kv_cache):
      block = DecoderLayer(cfg, parent=None)
      if not chunk:
        return block.apply({"params": params}, x, meta, kv_cache)
      x, kv_cache = block.apply({"params": params}, x, meta, kv_cache, method=DecoderLayer.attend)
      return _in_token_chunks(lambda part: block.apply({"params": params}, part, method=DecoderLayer.feed_forward),
                              x, chunk), kv_cache

    if layer_cache is not None and not meta["prefill"]:
      return self._decode_layers(run_block, hidden, params, layer_cache)

    # A forward pass or a prefill: one scan over the layers. Per-layer parameters are picked by the layer's
    # index (a copy of one layer's weights, nothing beside a long prefill's work): unrolled, XLA kept a
    # sequence-long buffer of every layer alive at once (58 GiB against 32 at 10,000 frames on an H200).
    def layer(x, params_and_cache):
      params, kv_cache = params_and_cache
      if per_layer is not None:         # params is the layer's index
        params = jax.lax.switch(params, [lambda p=p: p for p in per_layer])
      return run_block(params, x, kv_cache)

    per_layer = params if isinstance(params, list) else None
    xs = jnp.arange(len(per_layer)) if per_layer is not None else params
    policy = REMAT_POLICIES[cfg.remat_policy]
    if policy is not None:
      # prevent_cse=False is safe (and faster) under scan, which already stops XLA from merging recomputes.
      layer = jax.checkpoint(layer, policy=policy, prevent_cse=False)
    return jax.lax.scan(layer, hidden, (xs, layer_cache))

  def _decode_layers(self, run_block, hidden, params, layer_cache):
    """The layers against a filled KV cache. The stage's stacked cache rides in the carry and each layer
    writes only its new slots into it: as the scan's xs and ys (the prefill's form) every step would copy the
    whole cache, 9 GB for a 7B model at 160,000 tokens, which made decoding 8x slower than reading the weights
    and the cache once. Per-layer parameters run as an unrolled loop, so that each matmul reads its weights
    where they are: a scan's slice of stacked weights is copied out first (11.7 against 5.2 ms a token for a
    7B model on an H200)."""

    def layer(carry, params):
      x, stacked, index = carry
      x, stacked = run_block(params, x, {**stacked, "layer": index})
      return (x, {"k": stacked["k"], "v": stacked["v"]}, index + 1), None

    carry = (hidden, layer_cache, jnp.zeros((), jnp.int32))
    if isinstance(params, list):
      for layer_params in params:
        carry, _ = layer(carry, layer_params)
    else:
      carry, _ = jax.lax.scan(layer, carry, params)
    hidden, layer_cache, _ = carry
    return hidden, layer_cache

  def _drop(self, hidden, state, drop_stage, next_layer, compact_lengths):
    """One visual drop before layer `next_layer` (after that many layers have run)."""
    cfg, dropout = self.config, self.dropout
    if dropout.selection(drop_stage) == "uniform":
      keep = visual_dropout.uniform_keep(state, dropout.ratios, drop_stage)
    else:
      # The next layer's view of the (detached) hidden states at the current positions.
      cos, sin = rope.rope_cos_sin(state.positions, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
      params = nn.meta.unbox(self.layers.variables["params"])
      params = (params[layer_key(next_layer)] if layers_are_unstacked(params)
                else jax.tree.map(lambda p: p[next_layer], params))
      q, k = DecoderLayer(cfg, parent=None).apply({"params": params}, jax.lax.stop_gradient(hidden), cos, sin,
                                                  method=DecoderLayer.attention_query_key)
      scores = visual_dropout.attention_scores(q, k, state, dropout.query_rows)
      keep = visual_dropout.attention_keep(scores, state, dropout.ratios, drop_stage)
    dropped = jnp.sum(state.visual & ~keep, axis=1, dtype=jnp.int32)
    state = visual_dropout.apply_masked(state, keep)
    if compact_lengths is not None:
      hidden, state = visual_dropout.compact(hidden, state, compact_lengths[drop_stage])
    return hidden, state, dropped


def _in_token_chunks(fn, x, chunk):
  """fn (token-wise) over x (B, L, D) `chunk` tokens at a time, one chunk live at once (lax.map)."""
  batch, length = x.shape[:2]
  chunks = -(-length // chunk)
  padded = jnp.pad(x, ((0, 0), (0, chunks * chunk - length), (0, 0)))
  parts = jnp.moveaxis(padded.reshape(batch, chunks, chunk, -1), 1, 0)
  out = jax.lax.map(fn, parts)
  return jnp.moveaxis(out, 0, 1).reshape(batch, chunks * chunk, -1)[:, :length]
