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

from hico_jax.ops.chunked_attention import chunked_attention

IMPLEMENTATIONS = ("xla", "cudnn", "chunked", "splash", "ring", "all_gather")
BLOCK_IMPLEMENTATIONS = ("xla", "cudnn", "splash")

# The name remat policies save the attention output by (models/qwen2.py REMAT_POLICIES). The cuDNN kernel
# gets no name: its forward primitive is what the policies save there (output and softmax statistics), and a
# name on the same output as well made the backward pass keep it twice (9.5 GB for the vision tower at 256
# frames).
OUTPUT_NAME = "attention_out"


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
    from hico_jax.ops import ring_attention  # pylint: disable=import-outside-toplevel  # it imports us
    return checkpoint_name(ring_attention.sharded_attention(
        q, k, v, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, q_slots=q_slots,
        kv_slots=kv_slots, causal=causal, impl=impl, block_impl=block_impl), OUTPUT_NAME)
  if impl == "chunked" and q_slots is None and kv_slots is None:
    return checkpoint_name(chunked_attention(q, k, v, q_segment_ids, kv_segment_ids, causal=causal), OUTPUT_NAME)
  if impl == "splash" and q_slots is None and kv_slots is None and q.shape[1] == k.shape[1]:
    from hico_jax.ops import attention_blocks  # pylint: disable=import-outside-toplevel  # it imports us
    if q_segment_ids is None:
      q_segment_ids = kv_segment_ids = jnp.ones(q.shape[:2], jnp.int32)
    return checkpoint_name(attention_blocks.splash_attention(
        q, k, v, q_segment_ids, kv_segment_ids, causal, q.shape[-1] ** -0.5), OUTPUT_NAME)
  if impl == "cudnn" and q_slots is None and kv_slots is None and q.shape[1] == k.shape[1]:
    return cudnn_attention(q, k, v, q_segment_ids, kv_segment_ids, causal)
  if impl == "cudnn" and kv_slots is not None:
    # Permuted positions: cuDNN's built-in causal mask compares array indices, so causality rides in the
    # explicit mask instead (correct, but without the kernel's causal tile skipping).
    mask = attention_mask(q.shape[1], k.shape[1], q_segment_ids, kv_segment_ids, q_slots, causal, kv_slots)
    return cudnn_attention(q, k, v, None, None, False, mask=mask)
  return checkpoint_name(xla_attention(q, k, v, q_segment_ids, kv_segment_ids, q_slots, causal, kv_slots),
                         OUTPUT_NAME)


def attention_mask(q_len, kv_len, q_segment_ids=None, kv_segment_ids=None, q_slots=None, causal=True,
                   kv_slots=None):
  """Boolean (B or 1, T, S) mask: True where a query may attend to a key."""
  if kv_slots is None:
    kv_slots = jnp.arange(kv_len)[None, :]
  if q_slots is None:
    q_slots = kv_slots[:, kv_len - q_len:]
  if causal:
    mask = kv_slots[:, None, :] <= q_slots[:, :, None]
  else:
    mask = jnp.ones((1, q_len, kv_len), bool)
  if q_segment_ids is not None:
    mask = mask & (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])
  return mask


def xla_attention(q, k, v, q_segment_ids=None, kv_segment_ids=None, q_slots=None, causal=True,
                  kv_slots=None):
  batch, q_len, num_heads, head_dim = q.shape
  kv_len, num_kv_heads = k.shape[1], k.shape[2]
  groups = num_heads // num_kv_heads
  # Group the query heads by the K/V head they share, instead of repeating K/V `groups` times in memory.
  q = q.reshape(batch, q_len, num_kv_heads, groups, head_dim)
  logits = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32)
  logits = logits * (head_dim ** -0.5)
  if causal or q_segment_ids is not None:
    mask = attention_mask(q_len, kv_len, q_segment_ids, kv_segment_ids, q_slots, causal, kv_slots)
    # A finite minimum rather than -inf, so that even a row with nothing visible stays finite.
    logits = jnp.where(mask[:, None, None, :, :], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskh->btkgh", probs, v, preferred_element_type=jnp.float32)
  return out.reshape(batch, q_len, num_heads, head_dim).astype(q.dtype)


def cudnn_attention(q, k, v, q_segment_ids=None, kv_segment_ids=None, causal=True, mask=None):
  """cuDNN flash attention. `mask` (B or 1, T, S), if given, replaces the segment mask."""
  if q_segment_ids is not None:
    # cuDNN takes no segment ids; a boolean mask broadcast over heads carries the packing and padding.
    mask = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
  if mask is not None:
    mask = mask[:, None, :, :]
  out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation="cudnn")
  return out.astype(q.dtype)
