"""Sequence-parallel attention behind `attention(impl="ring" | "all_gather")`.

Both run under one `jax.shard_map` over the ambient mesh (`with jax.set_mesh(mesh)`), with the in/out specs
derived from the logical axis rules (the flax rules in context, else hico_jax.sharding.LOGICAL_RULES):

  q, out (B, T, N, H)   ("act_batch", "act_len", "act_heads", "act_head_dim")
  k, v   (B, S, K, H)   ("act_batch", "act_kv_len", "act_kv_heads", "act_head_dim")
  segment ids, slots    their first two names

Dimensions that the mapped mesh axes do not divide:
  batch  keeps the longest prefix of its mesh axes that divides B, the rest replicate it (batch 1 on
         data=2 is computed twice; correct, and the only sensible layout for that batch).
  heads  are sharded only if the axes divide both N and K (so each device keeps whole GQA groups), else
         replicated. head_dim is never sharded.
  length raises ValueError naming the shapes: replicating the sequence would silently cost O(L²) memory
         per device, and the data pipeline pads lengths to a multiple of the sequence axis anyway.

ring        K/V blocks travel around the sequence axis with `ppermute`, together with their slots and
            segment ids; each device merges its queries' block results by an fp32 online softmax. Each
            device's queries and keys are cut into two chunks (causal case) so that the pairs a causal
            mask hides entirely are skipped with `lax.cond`: with the pipeline's zig-zag order that is
            half of every step's work. The custom VJP recomputes each block from q, the visiting K/V and
            the final output and log-sum-exp, and sends dK/dV (fp32) around the ring with K/V, so that
            after a full circle every device holds the gradient of its own K/V.
all_gather  K/V (with slots and segment ids) gathered over the sequence axis, one local attention per
            device (MaxText's default context parallelism); ordinary autodiff.

With one device on the sequence axis both collapse to the plain per-device kernel, called directly on the
full K/V (and differentiated by its own VJP), so a seq=1 ring costs what the kernel costs.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from hico_jax import sharding
from hico_jax.ops import attention_blocks as blocks

Q_AXES = ("act_batch", "act_len", "act_heads", "act_head_dim")
KV_AXES = ("act_batch", "act_kv_len", "act_kv_heads", "act_head_dim")


@dataclasses.dataclass(frozen=True)
class Layout:
  """Mesh axes per dimension of the attention inputs, after the divisibility fallbacks above."""
  mesh_shape: dict
  batch: tuple[str, ...]
  q_len: tuple[str, ...]
  kv_len: tuple[str, ...]
  heads: tuple[str, ...]

  def size(self, axes):
    return math.prod(self.mesh_shape[a] for a in axes)

  def spec(self, *dims):
    return P(*(None if not axes else axes[0] if len(axes) == 1 else axes for axes in dims))

  @property
  def q_spec(self):
    return self.spec(self.batch, self.q_len, self.heads, ())

  @property
  def kv_spec(self):
    return self.spec(self.batch, self.kv_len, self.heads, ())


def layout(q_shape, kv_shape, impl: str) -> Layout:
  """Reads the ambient mesh and the logical rules; see the module docstring for the fallbacks."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    raise ValueError(f"attention impl={impl!r} shards over a device mesh: call it under "
                     f"`with jax.set_mesh(mesh)` (hico_jax.sharding.make_mesh)")
  shape = dict(mesh.shape)
  axes = sharding.ambient_axes   # rules may name axes this mesh lacks: they are left out
  (batch, q_len, num_heads, _), (_, kv_len, num_kv_heads, _) = q_shape, kv_shape
  size = sharding.ambient_size

  batch_axes = axes(Q_AXES[0], divides=batch)
  heads = axes(Q_AXES[2])
  if heads != axes(KV_AXES[2]) or num_heads % size(heads) or num_kv_heads % size(heads):
    heads = ()
  q_axes, kv_axes = axes(Q_AXES[1]), axes(KV_AXES[1])
  if q_len % size(q_axes) or kv_len % size(kv_axes):
    raise ValueError(
        f"attention impl={impl!r}: the sequence axis {q_axes or kv_axes} of size {size(q_axes or kv_axes)} "
        f"must divide the query length {q_len} and the key length {kv_len} (q {tuple(q_shape)}, "
        f"k {tuple(kv_shape)}); pad the sequence, or use impl='xla' for decode")
  if impl == "ring" and q_axes != kv_axes:
    raise ValueError(f"impl='ring' needs queries and keys on the same sequence axes, but the rules put "
                     f"act_len on {q_axes} and act_kv_len on {kv_axes}")
  return Layout(shape, batch_axes, q_axes, kv_axes, heads)


def sharded_attention(q, k, v, *, q_segment_ids, kv_segment_ids, q_slots, kv_slots, causal, impl,
                      block_impl):
  """attention(impl="ring" | "all_gather"); arguments as in hico_jax.ops.attention.attention."""
  lay = layout(q.shape, k.shape, impl)
  if block_impl == "cudnn" and jax.default_backend() != "gpu":
    raise ValueError(f"block_impl='cudnn' needs an NVIDIA GPU; the backend is {jax.default_backend()!r}")
  ring_size = lay.size(lay.q_len)
  natural = ring_size == 1 and lay.size(lay.kv_len) == 1
  if not natural:
    # Sharded rows need explicit positions and segments: a shard cannot tell its offset otherwise.
    batch, q_len, kv_len = q.shape[0], q.shape[1], k.shape[1]
    if kv_slots is None:
      kv_slots = jnp.broadcast_to(jnp.arange(kv_len, dtype=jnp.int32), (batch, kv_len))
    if q_slots is None:
      q_slots = kv_slots[:, kv_len - q_len:]
    if q_segment_ids is None:
      q_segment_ids = jnp.ones((batch, q_len), jnp.int32)
      kv_segment_ids = jnp.ones((batch, kv_len), jnp.int32)
  rows = (q_segment_ids, kv_segment_ids, q_slots, kv_slots)
  q_row, kv_row = lay.spec(lay.batch, lay.q_len), lay.spec(lay.batch, lay.kv_len)
  row_specs = tuple(None if r is None else spec for r, spec in zip(rows, (q_row, kv_row, q_row, kv_row)))

  def local(q, k, v, rows):
    if impl == "all_gather" and lay.size(lay.kv_len) > 1:
      gather = lambda x: jax.lax.all_gather(x, lay.kv_len, axis=1, tiled=True)
      k, v = gather(k), gather(v)
      rows = (rows[0], gather(rows[1]), rows[2], gather(rows[3]))
    if ring_size == 1 or impl == "all_gather":
      return _local_attention(q, k, v, rows, causal, block_impl, lay.size(lay.kv_len))
    return ring_attention(q, k, v, rows, axes=lay.q_len, ring_size=ring_size, causal=causal,
                          block_impl=block_impl)

  # Pallas calls (splash) cannot state how their outputs vary over the mesh, so shard_map's type check is
  # off for them; the other kernels keep it.
  return jax.shard_map(local, in_specs=(lay.q_spec, lay.kv_spec, lay.kv_spec, row_specs),
                       out_specs=lay.q_spec, check_vma=block_impl != "splash")(q, k, v, rows)


def _local_attention(q, k, v, rows, causal, block_impl, kv_shards):
  """One device's attention of its queries to all of `k`, `v` (B, S, K, H)."""
  q_seg, kv_seg, q_slots, kv_slots = rows
  natural = q_slots is None and kv_slots is None and q.shape[1] == k.shape[1]
  if block_impl != "splash":
    return blocks.dense_attention(q, k, v, q_seg, kv_seg, q_slots, kv_slots, causal, block_impl)
  if q_seg is None:
    q_seg = jnp.ones(q.shape[:2], jnp.int32)
    kv_seg = jnp.ones(k.shape[:2], jnp.int32)
  if natural:
    return blocks.splash_attention(q, k, v, q_seg, kv_seg, causal, q.shape[-1] ** -0.5)
  if kv_slots is None:
    kv_slots = jnp.broadcast_to(jnp.arange(k.shape[1], dtype=jnp.int32), k.shape[:2])
  if q_slots is None:
    q_slots = kv_slots[:, k.shape[1] - q.shape[1]:]
  # Splash masks are static: cut the keys back into the shards they came from (two chunks each) so that
  # every (query chunk, key chunk) pair is fully visible, a diagonal, or skipped.
  return ring_attention(q, k, v, (q_seg, kv_seg, q_slots, kv_slots), axes=(), ring_size=1, causal=causal,
                        block_impl="splash", kv_chunks=2 * kv_shards if causal else 1)


def ring_attention(q, k, v, rows, *, axes, ring_size, causal, block_impl, kv_chunks=None):
  """Per-device ring attention (inside shard_map): q (b, t, n, h) against every device's k, v (b, s, kh, h)
  passed around `axes` (ring_size devices). rows = (q_segment_ids, kv_segment_ids, q_slots, kv_slots)."""
  q_chunks = 2 if causal else 1
  kv_chunks = kv_chunks or q_chunks
  config = dict(axes=axes, ring_size=ring_size, causal=causal, block_impl=block_impl,
                q_chunks=q_chunks if q.shape[1] % q_chunks == 0 else 1,
                kv_chunks=kv_chunks if k.shape[1] % kv_chunks == 0 else 1,
                scale=q.shape[-1] ** -0.5)

  @jax.custom_vjp
  def run(q, k, v, rows):
    return _ring_forward(q, k, v, rows, **config)[0]

  def run_fwd(q, k, v, rows):
    out, lse = _ring_forward(q, k, v, rows, **config)
    return out, (q, k, v, rows, out, lse)

  def run_bwd(res, dout):
    q, k, v, rows, out, lse = res
    dq, dk, dv = _ring_backward(q, k, v, rows, out, lse, dout, **config)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None

  run.defvjp(run_fwd, run_bwd)
  return run(q, k, v, rows)


def _split(x, n):
  return jnp.split(x, n, axis=1) if n > 1 else [x]


def _shift(tree, axes, ring_size):
  """Every device's blocks to the next device on the ring."""
  perm = [(i, (i + 1) % ring_size) for i in range(ring_size)]
  return jax.tree.map(lambda x: jax.lax.ppermute(x, axes, perm), tree)


def _zeros(like, shape=None, value=0.0):
  """fp32 constant that varies over the same mesh axes as `like` (full_like keeps that type): shard_map's
  check_vma wants the scan and cond carries to keep one type."""
  return jnp.full_like(like, value, jnp.float32, shape=shape)


def _pairs(q_side, kv_side, config):
  """(a, c, rows of the pair) for every query chunk a and key chunk c."""
  q_seg, q_slots = (_split(x, config["q_chunks"]) for x in q_side)
  kv_seg, kv_slots = (_split(x, config["kv_chunks"]) for x in kv_side)
  for a in range(config["q_chunks"]):
    for c in range(config["kv_chunks"]):
      yield a, c, (q_seg[a], kv_seg[c], q_slots[a], kv_slots[c])


def _ring_forward(q, k, v, rows, **config):
  q_seg, kv_seg, q_slots, kv_slots = rows
  causal, impl, scale = config["causal"], config["block_impl"], config["scale"]
  qs = _split(q, config["q_chunks"])
  outs = [_zeros(x) for x in qs]
  lses = [_zeros(x, x.shape[:3], blocks.EMPTY_LSE) for x in qs]

  def visit(kv, acc):
    k, v, kv_seg, kv_slots = kv
    ks, vs = _split(k, config["kv_chunks"]), _split(v, config["kv_chunks"])
    outs, lses = list(acc[0]), list(acc[1])
    for a, c, pair in _pairs((q_seg, q_slots), (kv_seg, kv_slots), config):
      def compute(out, lse, a=a, c=c, pair=pair):
        return _merge(out, lse, *blocks.forward(impl, qs[a], ks[c], vs[c], pair, causal, scale))
      outs[a], lses[a] = jax.lax.cond(blocks.maybe_visible(pair, causal), compute, lambda o, l: (o, l),
                                      outs[a], lses[a])
    return outs, lses

  kv, acc = (k, v, kv_seg, kv_slots), (outs, lses)
  if config["ring_size"] > 1:
    def step(carry, _):
      kv, acc = carry
      # Sent before this step's compute, which does not depend on it, so the transfer overlaps.
      incoming = _shift(kv, config["axes"], config["ring_size"])
      return (incoming, visit(kv, acc)), None
    (kv, acc), _ = jax.lax.scan(step, (kv, acc), None, length=config["ring_size"] - 1)
  outs, lses = visit(kv, acc)
  return jnp.concatenate(outs, axis=1).astype(q.dtype), jnp.concatenate(lses, axis=1)


def _merge(out, lse, block_out, block_lse):
  """Online softmax: both outputs are normalised over their own keys; weights exp(lse_b - lse_total)."""
  total = jnp.logaddexp(lse, block_lse)
  return (out * jnp.exp(lse - total)[..., None] + block_out * jnp.exp(block_lse - total)[..., None],
          total)


def _ring_backward(q, k, v, rows, out, lse, dout, **config):
  q_seg, kv_seg, q_slots, kv_slots = rows
  causal, impl, scale = config["causal"], config["block_impl"], config["scale"]
  qs, os, ls, ds = (_split(x, config["q_chunks"]) for x in (q, out, lse, dout))
  dqs = [_zeros(x) for x in qs]

  def visit(kv, dkv, dqs):
    k, v, kv_seg, kv_slots = kv
    ks, vs = _split(k, config["kv_chunks"]), _split(v, config["kv_chunks"])
    dks, dvs = _split(dkv[0], config["kv_chunks"]), _split(dkv[1], config["kv_chunks"])
    dqs = list(dqs)
    for a, c, pair in _pairs((q_seg, q_slots), (kv_seg, kv_slots), config):
      def compute(dq, dk, dv, a=a, c=c, pair=pair):
        grads = blocks.backward(impl, qs[a], ks[c], vs[c], pair, causal, scale, os[a], ls[a], ds[a])
        return dq + grads[0], dk + grads[1], dv + grads[2]
      dqs[a], dks[c], dvs[c] = jax.lax.cond(blocks.maybe_visible(pair, causal), compute,
                                            lambda *g: g, dqs[a], dks[c], dvs[c])
    return (jnp.concatenate(dks, axis=1), jnp.concatenate(dvs, axis=1)), dqs

  kv, dkv = (k, v, kv_seg, kv_slots), (_zeros(k), _zeros(v))
  if config["ring_size"] > 1:
    def step(carry, _):
      kv, dkv, dqs = carry
      incoming = _shift(kv, config["axes"], config["ring_size"])
      dkv, dqs = visit(kv, dkv, dqs)
      # dK/dV follow their block: after the last step's shift every block's gradient is back home.
      return (incoming, _shift(dkv, config["axes"], config["ring_size"]), dqs), None
    (kv, dkv, dqs), _ = jax.lax.scan(step, (kv, dkv, dqs), None, length=config["ring_size"] - 1)
  dkv, dqs = visit(kv, dkv, dqs)
  if config["ring_size"] > 1:
    dkv = _shift(dkv, config["axes"], config["ring_size"])
  return jnp.concatenate(dqs, axis=1), dkv[0], dkv[1]
