"""One attention entry point; implementations behind `impl`.

  xla         reference: explicit boolean causal + segment mask, fp32 softmax, runs everywhere (and decode).
  cudnn       `jax.nn.dot_product_attention(implementation="cudnn")`: fused flash attention on NVIDIA GPUs.
  chunked     flash attention's online softmax in plain JAX (ops/chunked_attention.py): memory linear in the
              sequence on every backend; forward only, for the prefill of long prompts (CPU, or a GPU/TPU
              without its fused kernel).
  splash      TPU splash attention (Pallas; interpret mode on CPU, for tests).
  ring        sequence parallelism over the mesh's sequence axis: K/V blocks travel around a ring of
              devices, fp32 online-softmax merge, custom VJP (ops/ring_attention.py; per-block kernels in
              ops/attention_blocks.py).
  all_gather  the same shard_map boundary, K/V gathered over the sequence axis, one local attention.

For ring and all_gather, `block_impl` picks the per-device kernel: xla, cudnn (GPU) or splash (TPU).

Shapes: q (B, T, N, H); k, v (B, S, K, H) with N a multiple of K (grouped-query attention). Segment ids are
int32 with 0 marking padding (negative ids mark tokens that only see themselves, e.g. dropped visual
tokens); a query sees a key when both have the same segment id and the key's slot is not after the query's
slot. Real tokens (segment >= 1) thus never see padding, and a padding query still sees itself, so no
softmax row is empty (an empty row is NaN in fused kernels, and NaN * 0 poisons gradients).

Slots are each token's original position in its row, before any load-balancing permutation (the data
pipeline's zig-zag): causality compares slots, not array indices. kv_slots None means arange(S); q_slots None
means the queries are the last T keys (training: S == T; decode: the cache is longer).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from hico_jax.ops import attention_blocks, ring_attention
from hico_jax.ops.attention_blocks import OUTPUT_NAME
from hico_jax.ops.chunked_attention import chunked_attention

IMPLEMENTATIONS = ("xla", "cudnn", "chunked", "splash", "ring", "all_gather")
BLOCK_IMPLEMENTATIONS = ("xla", "cudnn", "splash")


def attention(q, k, v, *, q_segment_ids=None, kv_segment_ids=None, q_slots=None, kv_slots=None,
              impl: str = "xla", causal: bool = True, block_impl: str = "xla"):
  """Grouped-query attention, causal unless told otherwise (the vision tower). Returns (B, T, N, H) in q's
  dtype.

  q_segment_ids (B, T), kv_segment_ids (B, S): None means one unpadded sequence per row.
  q_slots (B, T), kv_slots (B, S): original positions (see the module docstring).
  impl="ring" and "all_gather" shard over the mesh of `with jax.set_mesh(mesh)`; without a mesh, or with
  q_slots (decode against a cache), they run locally: cuDNN's kernel for block_impl="cudnn", XLA's otherwise
  (splash included). block_impl is ignored by the other impls.
  """
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"attention impl {impl!r} is not one of {IMPLEMENTATIONS}")
  if block_impl not in BLOCK_IMPLEMENTATIONS:
    raise ValueError(f"attention block_impl {block_impl!r} is not one of {BLOCK_IMPLEMENTATIONS}")
  num_heads, num_kv_heads = q.shape[2], k.shape[2]
  if num_heads % num_kv_heads:
    raise ValueError(f"query heads ({num_heads}) must be a multiple of key/value heads ({num_kv_heads})")
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("pass both q_segment_ids and kv_segment_ids, or neither")
  decoding = q_slots is not None and kv_slots is None
  if impl in ("ring", "all_gather") and (jax.sharding.get_abstract_mesh().empty or decoding):
    # No mesh (shape evaluation, a single device) or KV-cache decode (queries inside a longer cache): there
    # is nothing to pass round a ring, so the per-device kernel runs on its own.
    impl = "cudnn" if block_impl == "cudnn" else "xla"
  if impl in ("ring", "all_gather"):
    return checkpoint_name(ring_attention.sharded_attention(
        q, k, v, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, q_slots=q_slots,
        kv_slots=kv_slots, causal=causal, impl=impl, block_impl=block_impl), OUTPUT_NAME)
  if impl == "chunked" and q_slots is None and kv_slots is None:
    return checkpoint_name(chunked_attention(q, k, v, q_segment_ids, kv_segment_ids, causal=causal), OUTPUT_NAME)
  if impl == "splash" and q_slots is None and kv_slots is None and q.shape[1] == k.shape[1]:
    if q_segment_ids is None:
      q_segment_ids = kv_segment_ids = jnp.ones(q.shape[:2], jnp.int32)
    return checkpoint_name(attention_blocks.splash_attention(
        q, k, v, q_segment_ids, kv_segment_ids, causal, q.shape[-1] ** -0.5), OUTPUT_NAME)
  return attention_blocks.dense_attention(q, k, v, q_segment_ids, kv_segment_ids, q_slots, kv_slots, causal,
                                         impl if impl == "cudnn" else "xla")
