"""Attention kernels, a leaf that both the entry point (ops/attention.py) and the ring (ops/ring_attention.py)
import: the mask rule, the dense XLA and cuDNN attention of one device, and the per-block kernels of ring
attention (one query chunk against one key/value chunk).

`forward` returns the block's normalised output and its log-sum-exp, both fp32, so that blocks merge by an
online softmax. `backward` takes the FINAL output and log-sum-exp of the whole row (every block merged) and
returns this block's exact share of dq, dk, dv: with the global statistics, P = exp(s - lse) is the true
attention weight and dS = P * (dO·V - rowsum(dO * O)), the flash-attention backward, so no block needs to
know about the others. (Differentiating a block's own (out, lse) would need the cotangent of lse, which the
fused kernels' VJPs drop: jax.nn.dot_product_attention stops the residual's gradient.)

Kernels (`impl`):
  xla     explicit mask math in fp32: the reference, runs everywhere.
  cudnn   cuDNN fused attention (NVIDIA GPUs), mask as a bias. Uses jax's private cuDNN primitives, because
          the public jax.nn API rounds the residual to the output dtype (bf16 lse moves merge weights by
          percents) and cannot run the backward from given statistics.
  splash  TPU splash attention (interpret mode on CPU, for tests). Its masks are static, so each block is
          classified at run time: fully visible (FullMask), the diagonal of identical increasing slots
          (CausalMask), or neither, which falls back to the xla kernel; segment ids go in as SegmentIds.

Shapes: q (b, t, n, h); k, v (b, s, kh, h); rows = (q_segment_ids (b, t), kv_segment_ids (b, s),
q_slots (b, t), kv_slots (b, s)); lse (b, t, n); `scale` multiplies q·k.
"""

from __future__ import annotations

from einops import rearrange
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
import numpy as np


# Log-sum-exp of a row that sees nothing in a block: exp(EMPTY_LSE - anything real) is exactly 0, and two
# empty rows still merge to a finite value.
EMPTY_LSE = float(np.finfo(np.float32).min)


# The name remat policies save the attention output by (models/layers.py REMAT_POLICIES). The cuDNN kernel
# gets no name: its forward primitive is what the policies save there (output and softmax statistics), and a
# name on the same output as well made the backward pass keep it twice (9.5 GB for the vision tower at 256
# frames).
OUTPUT_NAME = "attention_out"


def dense_attention(q, k, v, q_segment_ids, kv_segment_ids, q_slots, kv_slots, causal, impl):
  """One device's whole attention with impl "xla" or "cudnn" (the entry point's kernels, and the ring's for a
  device that holds every key); cuDNN where its kernel applies, XLA otherwise."""
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
  q_len, head_dim = q.shape[1], q.shape[3]
  kv_len, num_kv_heads = k.shape[1], k.shape[2]
  # Group the query heads by the K/V head they share, instead of repeating K/V for each in memory.
  q = rearrange(q, "b t (k g) h -> b t k g h", k=num_kv_heads)
  logits = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32)
  logits = logits * (head_dim ** -0.5)
  if causal or q_segment_ids is not None:
    mask = attention_mask(q_len, kv_len, q_segment_ids, kv_segment_ids, q_slots, causal, kv_slots)
    # A finite minimum rather than -inf, so that even a row with nothing visible stays finite.
    logits = jnp.where(mask[:, None, None, :, :], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskh->btkgh", probs, v, preferred_element_type=jnp.float32)
  return rearrange(out, "b t k g h -> b t (k g) h").astype(q.dtype)


def cudnn_attention(q, k, v, q_segment_ids=None, kv_segment_ids=None, causal=True, mask=None):
  """cuDNN flash attention. `mask` (B or 1, T, S), if given, replaces the segment mask."""
  if q_segment_ids is not None:
    # cuDNN takes no segment ids; a boolean mask broadcast over heads carries the packing and padding.
    mask = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
  if mask is not None:
    mask = mask[:, None, :, :]
  out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation="cudnn")
  return out.astype(q.dtype)


def block_mask(rows, causal):
  """(b, t, s) bool: same segment id, and (if causal) key slot <= query slot: the entry point's rule."""
  q_seg, kv_seg, q_slots, kv_slots = rows
  return attention_mask(q_slots.shape[1], kv_slots.shape[1], q_seg, kv_seg, q_slots, causal, kv_slots)


def maybe_visible(rows, causal):
  """Scalar bool, False only when no (query, key) pair of the block can be visible: cheap O(t + s) range
  tests on segment ids and slots, so fully masked blocks (half of a causal ring) are skipped uncomputed."""
  q_seg, kv_seg, q_slots, kv_slots = rows
  overlap = (q_seg.max(1) >= kv_seg.min(1)) & (q_seg.min(1) <= kv_seg.max(1))
  if causal:
    overlap &= kv_slots.min(1) <= q_slots.max(1)
  return jnp.any(overlap)


def forward(impl, q, k, v, rows, causal, scale):
  return _KERNELS[impl][0](q, k, v, rows, causal, scale)


def backward(impl, q, k, v, rows, causal, scale, out, lse, dout):
  """dq, dk, dv (fp32) of this block, from the row's final `out` (b, t, n, h) and `lse` (b, t, n)."""
  return _KERNELS[impl][1](q, k, v, rows, causal, scale, out, lse, dout)


def _group(x, kv_heads):
  """(b, t, n, ...) -> (b, t, kv_heads, n // kv_heads, ...): query heads grouped by their K/V head, instead
  of repeating K/V in memory."""
  return rearrange(x, "b t (k g) ... -> b t k g ...", k=kv_heads)


# --- xla ------------------------------------------------------------------------------------------------

def _xla_logits(q, k, scale):
  qg = _group(q, k.shape[2]).astype(jnp.float32)
  return jnp.einsum("btkgh,bskh->bkgts", qg, k.astype(jnp.float32)) * scale  # (b, kh, g, t, s)


def _xla_forward(q, k, v, rows, causal, scale):
  b, t, n, h = q.shape
  mask = block_mask(rows, causal)[:, None, None]
  logits = jnp.where(mask, _xla_logits(q, k, scale), -jnp.inf)
  row_max = logits.max(-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)  # an empty row: every weight below is 0
  weights = jnp.exp(logits - row_max)
  total = weights.sum(-1)
  out = jnp.einsum("bkgts,bskh->btkgh", weights, v.astype(jnp.float32))
  out = out / jnp.moveaxis(jnp.where(total > 0, total, 1.0), 3, 1)[..., None]
  lse = jnp.where(total > 0, row_max[..., 0] + jnp.log(jnp.where(total > 0, total, 1.0)), EMPTY_LSE)
  return out.reshape(b, t, n, h), jnp.moveaxis(lse, 3, 1).reshape(b, t, n)


def _xla_backward(q, k, v, rows, causal, scale, out, lse, dout):
  b, t, n, h = q.shape
  kv_heads = k.shape[2]
  mask = block_mask(rows, causal)[:, None, None]
  lse = jnp.moveaxis(_group(lse, kv_heads), 1, 3)  # (b, kh, g, t)
  probs = jnp.where(mask, jnp.exp(_xla_logits(q, k, scale) - lse[..., None]), 0.0)
  dout_g = _group(dout, kv_heads).astype(jnp.float32)
  delta = jnp.moveaxis(jnp.sum(dout_g * _group(out, kv_heads).astype(jnp.float32), -1), 1, 3)
  dv = jnp.einsum("bkgts,btkgh->bskh", probs, dout_g)
  dprobs = jnp.einsum("btkgh,bskh->bkgts", dout_g, v.astype(jnp.float32))
  dlogits = probs * (dprobs - delta[..., None]) * scale
  dq = jnp.einsum("bkgts,bskh->btkgh", dlogits, k.astype(jnp.float32)).reshape(b, t, n, h)
  dk = jnp.einsum("bkgts,btkgh->bskh", dlogits, _group(q, kv_heads).astype(jnp.float32))
  return dq, dk, dv


# --- cudnn ----------------------------------------------------------------------------------------------

def _cudnn_private():
  try:
    from jax._src.cudnn import fused_attention_stablehlo as fa  # pylint: disable=import-outside-toplevel
    return fa
  except ImportError as e:
    raise ValueError(f"block_impl='cudnn' in a ring needs jax's cuDNN attention module (jax "
                     f"{jax.__version__}: {e}); use impl='all_gather' or block_impl='xla'") from e


def _cudnn_bias(fa, mask, dtype):
  return fa.combine_bias_and_mask(None, mask[:, None], dtype)  # (b, 1, t, s), large negative where masked


def _cudnn_forward(q, k, v, rows, causal, scale):
  fa = _cudnn_private()
  mask = block_mask(rows, causal)
  # The module's own entry point keeps cuDNN's softmax statistics in fp32 (jax.nn casts them to bf16).
  out, stats = fa.dot_product_attention(q, k, v, None, mask[:, None], scale=scale, qkv_layout="BTNH",
                                        return_residual=True)
  lse = jnp.swapaxes(stats, 1, 2).astype(jnp.float32)  # cuDNN returns (b, n, t), natural-log lse
  row_seen = jnp.any(mask, axis=-1)[:, :, None]  # fused kernels may leave NaN in rows that see nothing
  out = jnp.where(row_seen[..., None], out.astype(jnp.float32), 0.0)
  return out, jnp.where(row_seen, lse, EMPTY_LSE)


def _cudnn_backward(q, k, v, rows, causal, scale, out, lse, dout):
  fa = _cudnn_private()
  bias = _cudnn_bias(fa, block_mask(rows, causal), q.dtype)
  empty = jnp.zeros(0, q.dtype)
  # (has_bias, has_dbias): the bias is a constant mask, so no bias gradient (jax 0.11 decides the same way;
  # 0.10's should_export_dbias helper is gone there).
  variadic_args = (True, False)
  # The backward primitive recomputes P from the statistics it is given and rowsum(dO * O) from the output
  # it is given: handing it the row's final lse and output makes it return this block's exact share.
  grads = fa._dot_product_attention_bwd_p_wrapper.bind(  # pylint: disable=protected-access
      q, k, v, bias, empty, empty, empty, empty, empty, empty,
      jnp.swapaxes(lse, 1, 2).astype(jnp.float32), out.astype(q.dtype), dout.astype(q.dtype),
      scale=scale, seed=42, dropout_rate=0.0, variadic_args=variadic_args, mask_type=fa.MaskType.NO_MASK,
      layout=fa.AttentionLayout.BTNH.value, sliding_window_length=None)
  return tuple(g.astype(jnp.float32) for g in grads[:3])


# --- splash ---------------------------------------------------------------------------------------------

def _splash_module():
  # Imported on use: Pallas and its TPU kernels are heavy, and only the splash path needs them.
  from jax.experimental.pallas.ops.tpu import splash_attention  # pylint: disable=import-outside-toplevel
  return splash_attention


def _splash_interpret():
  backend = jax.default_backend()
  if backend not in ("tpu", "cpu"):
    raise ValueError(f"block_impl='splash' is a TPU kernel (interpret mode on CPU for tests); backend is "
                     f"{backend!r}: use block_impl='cudnn' or 'xla'")
  return backend != "tpu"


def _splash_block_sizes(t, s):
  sa = _splash_module()
  bq, bkv = min(512, t), min(512, s)
  if t % bq or s % bkv or bq % 128 or bkv % 128:
    raise ValueError(f"block_impl='splash' needs query and key chunks of a multiple of 128 tokens (of 512 "
                     f"when longer than 512); got {t} queries x {s} keys (a causal ring cuts each device's "
                     f"sequence into two chunks)")
  return sa.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                       block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)


def splash_kernel(kind, t, s, groups, save_residuals):
  """A multi-query splash kernel for one K/V head and `groups` query heads; kind 'full' or 'causal'. Built
  per trace, not cached: the kernel holds its mask tables as arrays, which would leak across traces."""
  sa = _splash_module()
  head_mask = sa.CausalMask((t, s)) if kind == "causal" else sa.FullMask((t, s))
  return sa.make_splash_mqa_single_device(
      sa.MultiHeadMask([head_mask] * groups), block_sizes=_splash_block_sizes(t, s),
      save_residuals=save_residuals, interpret=_splash_interpret())


def splash_attention(q, k, v, q_segment_ids, kv_segment_ids, causal, scale):
  """Dense splash attention in natural order (query i at key slot i), differentiable by splash's own VJP."""
  sa = _splash_module()
  b, t, n, h = q.shape
  kernel = splash_kernel("causal" if causal else "full", t, k.shape[1], n // k.shape[2], False)
  out = _splash_map(lambda q1, k1, v1, qs, ks: kernel(q1, k1, v1, segment_ids=sa.SegmentIds(qs, ks)),
                    q * scale, k, v, q_segment_ids, kv_segment_ids)
  return out.astype(q.dtype)


def _splash_map(fn, q, k, v, q_seg, kv_seg):
  """Runs fn(q (g, t, h), k (s, h), v (s, h), q_seg (t,), kv_seg (s,)) for every example and K/V head;
  returns fn's query-side outputs as (b, t, n, ...)."""
  qg = jnp.moveaxis(_group(q, k.shape[2]), 1, 3)  # (b, kh, g, t, h)
  per_head = jax.vmap(fn, in_axes=(0, 1, 1, None, None))
  outs = jax.vmap(per_head)(qg, k, v, q_seg, kv_seg)
  return jax.tree.map(_ungroup, outs)


def _ungroup(x):
  """(b, kh, g, t, ...) -> (b, t, n, ...)."""
  return rearrange(x, "b k g t ... -> b t (k g) ...")


def _splash_case(rows, causal):
  """0: fully visible by slots (FullMask); 1: identical increasing slots (CausalMask); 2: anything else."""
  if not causal:
    return jnp.int32(0)
  _, _, q_slots, kv_slots = rows
  full = jnp.all(kv_slots.max(1) <= q_slots.min(1))
  if q_slots.shape != kv_slots.shape:
    return jnp.where(full, 0, 2)
  diagonal = jnp.all(q_slots == kv_slots) & jnp.all(q_slots[:, 1:] > q_slots[:, :-1])
  return jnp.where(full, 0, jnp.where(diagonal, 1, 2))


def _splash_forward(q, k, v, rows, causal, scale):
  sa = _splash_module()
  t, s, groups = q.shape[1], k.shape[1], q.shape[2] // k.shape[2]

  def run(kind):
    kernel = splash_kernel(kind, t, s, groups, True)

    def one(q1, k1, v1, qs, ks):
      out, (lse,) = kernel(q1, k1, v1, segment_ids=sa.SegmentIds(qs, ks))
      return out.astype(jnp.float32), lse.astype(jnp.float32)
    out, lse = _splash_map(one, q * scale, k, v, rows[0], rows[1])
    # Splash masks with a large finite value, so a row that sees nothing gets lse near -2e38 and the mean of
    # the values; mark it empty so the merge cannot mistake it for the row's first block.
    empty = lse < -1e30
    return jnp.where(empty[..., None], 0.0, out), jnp.where(empty, EMPTY_LSE, lse)

  branches = [lambda: run("full"), lambda: run("causal"), lambda: _xla_forward(q, k, v, rows, causal, scale)]
  return jax.lax.switch(_splash_case(rows, causal), branches)


def _splash_backward(q, k, v, rows, causal, scale, out, lse, dout):
  sa = _splash_module()
  t, s, groups = q.shape[1], k.shape[1], q.shape[2] // k.shape[2]

  def run(kind):
    kernel = splash_kernel(kind, t, s, groups, False)
    kw = kernel.kwargs

    def one(q1, k1, v1, qs, ks, o1, lse1, do1):
      segment_ids = sa.SegmentIds(qs, ks)
      # Splash's backward takes its residuals as given: with the row's final output and lse it returns
      # this block's exact share (private API, as for cuDNN).
      res = (q1, k1, v1, segment_ids, None, o1.astype(q1.dtype), lse1, kernel.dq_mask_info,
             kernel.dkv_mask_info)
      grads = sa.splash_attention_kernel._splash_attention_bwd(  # pylint: disable=protected-access
          False, kw["mask_value"], kw["is_mqa"], kw["block_sizes"], None, kw["mask_function"],
          kw["attn_logits_soft_cap"], kw["interpret"], res, do1.astype(q1.dtype))
      return tuple(g.astype(jnp.float32) for g in grads[3:6])

    kv_heads = k.shape[2]
    qg = jnp.moveaxis(_group(q * scale, kv_heads), 1, 3)
    og, lg, dg = (jnp.moveaxis(_group(x, kv_heads), 1, 3) for x in (out, lse, dout))
    per_head = jax.vmap(one, in_axes=(0, 1, 1, None, None, 0, 0, 0), out_axes=(0, 1, 1))
    dq, dk, dv = jax.vmap(per_head, in_axes=(0, 0, 0, 0, 0, 0, 0, 0))(qg, k, v, rows[0], rows[1], og, lg, dg)
    return _ungroup(dq) * scale, dk, dv  # dq was taken w.r.t. the pre-scaled q

  branches = [lambda: run("full"), lambda: run("causal"),
              lambda: _xla_backward(q, k, v, rows, causal, scale, out, lse, dout)]
  return jax.lax.switch(_splash_case(rows, causal), branches)


_KERNELS = {
    "xla": (_xla_forward, _xla_backward),
    "cudnn": (_cudnn_forward, _cudnn_backward),
    "splash": (_splash_forward, _splash_backward),
}
