"""Qwen2 / Qwen2.5 decoder in Flax linen, weight-compatible with transformers' Qwen2ForCausalLM.

RMSNorm in float32, rotate-half RoPE with configurable theta, grouped-query attention with q/k/v bias, SwiGLU
MLP, tied or untied head. Layers are one `nn.scan` (compile time independent of depth) wrapped in `nn.remat`
with the policy the config names. Every parameter carries logical axis names and every large activation a
logical constraint; `hico_jax.sharding` maps both onto the mesh.

Packed rows: `segment_ids` (B, L) separate samples (0 = padding) and `positions` restart per sample.
Decoding: a preallocated KV cache (`init_cache`) that the forward pass fills at `cache["index"]`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from hico_jax.models.layers import Projection, constrain, dataclass_from_dict, normal_init
from hico_jax.ops import attention as attention_ops
from hico_jax.ops import rope

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

def _is_fused_attention_forward(prim, *_, **__):
  """The cuDNN flash-attention forward primitive lives inside jax, out of reach of checkpoint_name; saving
  its outputs (attention output and softmax statistics) spares the backward pass from re-running it."""
  return prim.name.startswith("dot_product_attention_fwd")


# What the backward pass may keep instead of recomputing, per decoder layer. "dots" keeps every projection
# output (q, k, v, o, gate, up, down): most memory, least recompute; "dots_attn" also keeps the fused
# attention's outputs, so nothing but elementwise work is recomputed. "qkv_attn" keeps the attention inputs
# and output, recomputing the MLP. "attn" keeps only the attention outputs. "full" keeps only the layer input.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_attn": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        lambda prim, *a, **k: _is_fused_attention_forward(prim) or
        jax.checkpoint_policies.save_only_these_names("attention_out")(prim, *a, **k)),
    "qkv_attn": jax.checkpoint_policies.save_only_these_names("query", "key", "value", "attention_out"),
    # Only the fused attention's outputs: for the vision tower at 448 px, where attention is a third of the
    # FLOPs and saving every projection would not fit.
    "attn": lambda prim, *a, **k: _is_fused_attention_forward(prim) or
            jax.checkpoint_policies.save_only_these_names("attention_out")(prim, *a, **k),
}


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
  attention_impl: str = "xla"

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

  @nn.compact
  def __call__(self, x, meta, kv_cache):
    cfg = self.config
    d, h = cfg.hidden_size, cfg.head_dim

    def project_in(heads, heads_name, name):
      return Projection("bld,dnh->blnh", (d, heads, h), ("embed", heads_name, "head_dim"),
                        (heads_name, "head_dim"), cfg.compute_dtype, cfg.weight_dtype, name=name)(x)

    q = project_in(cfg.num_heads, "heads", "q_proj")
    k = project_in(cfg.num_kv_heads, "kv_heads", "k_proj")
    v = project_in(cfg.num_kv_heads, "kv_heads", "v_proj")
    q = rope.apply_rope(q, meta["cos"], meta["sin"])
    k = rope.apply_rope(k, meta["cos"], meta["sin"])
    q = checkpoint_name(constrain(q, ("act_batch", "act_len", "act_heads", "act_head_dim")), "query")
    k = checkpoint_name(constrain(k, ("act_batch", "act_len", "act_kv_heads", "act_head_dim")), "key")
    v = checkpoint_name(constrain(v, ("act_batch", "act_len", "act_kv_heads", "act_head_dim")), "value")

    q_slots, kv_segment_ids = None, meta["segment_ids"]
    if kv_cache is not None:
      index = meta["cache_index"]
      k = jax.lax.dynamic_update_slice(kv_cache["k"], k.astype(kv_cache["k"].dtype), (0, index, 0, 0))
      v = jax.lax.dynamic_update_slice(kv_cache["v"], v.astype(kv_cache["v"].dtype), (0, index, 0, 0))
      kv_cache = {"k": k, "v": v}
      q_slots, kv_segment_ids = meta["q_slots"], meta["kv_segment_ids"]

    out = attention_ops.attention(
        q, k, v, q_segment_ids=meta["segment_ids"], kv_segment_ids=kv_segment_ids, q_slots=q_slots,
        impl=cfg.attention_impl)
    out = checkpoint_name(constrain(out, ("act_batch", "act_len", "act_heads", "act_head_dim")),
                          "attention_out")
    out = Projection("blnh,nhd->bld", (cfg.num_heads, h, d), ("heads", "head_dim", "embed"), None,
                     cfg.compute_dtype, cfg.weight_dtype, name="o_proj")(out)
    return out, kv_cache


class MLP(nn.Module):
  config: Qwen2Config

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    dense = lambda features, names, name: nn.Dense(
        features, use_bias=False, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
        kernel_init=normal_init(names), name=name)
    gate = dense(cfg.intermediate_size, ("embed", "mlp"), "gate_proj")(x)
    up = dense(cfg.intermediate_size, ("embed", "mlp"), "up_proj")(x)
    hidden = constrain(nn.silu(gate) * up, ("act_batch", "act_len", "act_mlp"))
    return dense(cfg.hidden_size, ("mlp", "embed"), "down_proj")(hidden)


class DecoderLayer(nn.Module):
  config: Qwen2Config

  @nn.compact
  def __call__(self, x, meta, kv_cache):
    cfg = self.config
    norm = lambda name: RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype, cfg.weight_dtype, name=name)
    h, kv_cache = Attention(cfg, name="self_attn")(norm("input_layernorm")(x), meta, kv_cache)
    x = x + h
    x = x + MLP(cfg, name="mlp")(norm("post_attention_layernorm")(x))
    return constrain(x, ("act_batch", "act_len", "act_emb")), kv_cache


def positions_from_segments(segment_ids):
  """Per-token positions that restart at 0 wherever the segment id changes along the row."""
  length = segment_ids.shape[1]
  index = jnp.arange(length)[None, :]
  starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                            segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  start_index = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
  return index - start_index


def init_cache(config: Qwen2Config, batch: int, max_length: int, dtype=None) -> dict:
  """An empty KV cache: per-layer K/V, the segment id of every slot (0 = empty) and the next write index."""
  dtype = dtype or config.compute_dtype
  shape = (config.num_layers, batch, max_length, config.num_kv_heads, config.head_dim)
  return {"layers": {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)},
          "segment_ids": jnp.zeros((batch, max_length), jnp.int32),
          "index": jnp.zeros((), jnp.int32)}


class Qwen2ForCausalLM(nn.Module):
  """`__call__` returns (logits, aux): logits (B, L, V) in the compute dtype; aux["hidden"] is the final
  normed hidden state and aux["cache"] the updated KV cache (None without one)."""
  config: Qwen2Config

  def setup(self):
    cfg = self.config
    self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.compute_dtype,
                                 param_dtype=cfg.weight_dtype, embedding_init=normal_init(("vocab", "embed")))
    layer = DecoderLayer
    if REMAT_POLICIES[cfg.remat_policy] is not None:
      # prevent_cse=False is safe (and faster) under scan, which already stops XLA from merging recomputes.
      layer = nn.remat(DecoderLayer, prevent_cse=False, policy=REMAT_POLICIES[cfg.remat_policy])
    self.layers = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True},
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
               return_logits=True):
    """input_ids (B, L) or embeddings (B, L, D); segment_ids (B, L), 0 = padding; positions (B, L).

    Without a cache, positions default to restarting at every segment. With a cache the caller passes
    positions (generation knows each row's prompt length); new tokens are written at cache["index"].
    """
    if embeddings is None:
      embeddings = self.embed(input_ids)
    batch, length = embeddings.shape[:2]
    if positions is None:
      if cache is not None:
        raise ValueError("decoding with a KV cache needs explicit positions (B, L)")
      positions = (jnp.broadcast_to(jnp.arange(length), (batch, length)) if segment_ids is None
                   else positions_from_segments(segment_ids))
    cos, sin = rope.rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta)
    meta = {"cos": cos, "sin": sin, "segment_ids": segment_ids}

    layer_cache = None
    if cache is not None:
      if segment_ids is None:
        segment_ids = jnp.ones((batch, length), jnp.int32)
      index = cache["index"]
      kv_segment_ids = jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids.astype(jnp.int32),
                                                    (0, index))
      meta.update(segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, cache_index=index,
                  q_slots=jnp.broadcast_to(index + jnp.arange(length), (batch, length)))
      layer_cache = cache["layers"]

    hidden, layer_cache = self.layers(embeddings, meta, layer_cache)
    hidden = self.norm(hidden)
    new_cache = None
    if cache is not None:
      new_cache = {"layers": layer_cache, "segment_ids": meta["kv_segment_ids"], "index": index + length}
    logits = self.logits(hidden) if return_logits else None
    return logits, {"hidden": hidden, "cache": new_cache}
