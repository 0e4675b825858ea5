#!/usr/bin/env python
"""Checks ring attention with cuDNN blocks on one NVIDIA GPU, then times it against plain cuDNN attention.

  python tools/check_ring_gpu.py                 # checks + timing at B=1, L=16384, N=12, K=2, H=128
  python tools/check_ring_gpu.py --skip_timing

Needs jax and flax only (no grain, no ml_collections). Three checks, bf16 inputs, against dense fp32
`attention(impl="xla")` on the same values (outputs and dq, dk, dv; max |diff| / max |reference|):
  ring_seq1          impl="ring", block_impl="cudnn" on a mesh whose sequence axis has one device: the plain
                     kernel with its own VJP, no ring machinery.
  ring_seq1_slots    the same with explicit slots (causality from an explicit mask).
  blockwise_cudnn    the ring's blockwise code (online-softmax merge, custom VJP with the final lse and
                     output handed to cuDNN's backward) over 2 query x 4 key chunks, on one device: what a
                     ring over several GPUs runs per block, minus the ppermute.
Then fwd+bwd times of plain impl="cudnn" and of the seq=1 ring (the target: within 5%), with and without
packed segment ids, and of the blockwise path for scale. Exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hico_jax import sharding
from hico_jax.ops import ring_attention
from hico_jax.ops.attention import attention

TOLERANCE = 2e-2  # bf16 inputs against an fp32 reference, relative to the reference's largest entry


def _inputs(batch, length, heads, kv_heads, head_dim, seed=0, packed=True):
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  q, k, v = normal(batch, length, heads, head_dim), normal(batch, length, kv_heads, head_dim), \
      normal(batch, length, kv_heads, head_dim)
  weights = normal(batch, length, heads, head_dim)
  seg = None
  if packed:  # documents of uneven lengths, padding at the end of the row
    cuts = np.sort(rng.choice(np.arange(1, length - length // 8), 3, replace=False))
    row = np.zeros(length, np.int32)
    for i, (a, b) in enumerate(zip([0, *cuts], [*cuts, length - length // 8])):
      row[a:b] = i + 1
    seg = jnp.asarray(np.broadcast_to(row, (batch, length)))
  return q, k, v, seg, weights


def _value_and_grads(fn, q, k, v, weights):
  def loss(q, k, v):
    out = fn(q, k, v)
    return jnp.sum(out.astype(jnp.float32) * weights), out
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def _check(name, fn, q, k, v, seg, weights, reference):
  cast = lambda x: x.astype(jnp.bfloat16)
  try:
    (_, out), grads = _value_and_grads(fn, cast(q), cast(k), cast(v), weights)(cast(q), cast(k), cast(v))
  except Exception as e:  # pylint: disable=broad-except  # report and go on to the other checks
    print(f"{name:18s} FAILED to run: {type(e).__name__}: {str(e)[:400]}")
    return False
  ok = True
  parts = []
  for label, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), reference):
    diff = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want)))
    scale = float(jnp.max(jnp.abs(want)))
    ok &= diff <= TOLERANCE * scale and bool(jnp.all(jnp.isfinite(got)))
    parts.append(f"{label} {diff:.2e}/{scale:.2e}")
  print(f"{name:18s} {'ok  ' if ok else 'FAIL'} max|diff|/max|ref|: " + ", ".join(parts))
  return ok


def _rows(seg, batch, length):
  slots = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
  seg = jnp.ones((batch, length), jnp.int32) if seg is None else seg
  return seg, slots


def run_checks():
  batch, length, heads, kv_heads, head_dim = 2, 1024, 12, 2, 128
  q, k, v, seg, weights = _inputs(batch, length, heads, kv_heads, head_dim)
  dense = lambda q, k, v: attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, impl="xla")
  (_, out), grads = _value_and_grads(dense, q, k, v, weights)(q, k, v)
  reference = (out, *grads)
  seg_rows, slots = _rows(seg, batch, length)

  ring = lambda **kw: lambda q, k, v: attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, impl="ring",
                                                block_impl="cudnn", **kw)
  blockwise = lambda q, k, v: ring_attention.ring_attention(
      q, k, v, (seg_rows, seg_rows, slots, slots), axes=(), ring_size=1, causal=True, block_impl="cudnn",
      kv_chunks=4)
  ok = _check("ring_seq1", ring(), q, k, v, seg, weights, reference)
  ok &= _check("ring_seq1_slots", ring(q_slots=slots, kv_slots=slots), q, k, v, seg, weights, reference)
  ok &= _check("blockwise_cudnn", blockwise, q, k, v, seg, weights, reference)
  return ok


def _time(step, args, iters):
  jax.block_until_ready(step(*args))  # compile
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(step(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times) * 1e3


def run_timing(iters):
  batch, length, heads, kv_heads, head_dim = 1, 16384, 12, 2, 128  # qwen2_5_1_5b at 16k tokens
  for packed in (False, True):
    q, k, v, seg, weights = _inputs(batch, length, heads, kv_heads, head_dim, packed=packed)
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    seg_rows, slots = _rows(seg, batch, length)
    cases = {
        "plain cudnn": lambda q, k, v: attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, impl="cudnn"),
        "ring seq=1 cudnn": lambda q, k, v: attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg,
                                                      impl="ring", block_impl="cudnn"),
        "blockwise 2x2 cudnn": lambda q, k, v: ring_attention.ring_attention(
            q, k, v, (seg_rows, seg_rows, slots, slots), axes=(), ring_size=1, causal=True,
            block_impl="cudnn"),
    }
    times = {}
    for name, fn in cases.items():
      try:
        times[name] = _time(_value_and_grads(fn, q, k, v, weights), (q, k, v), iters)
      except Exception as e:  # pylint: disable=broad-except
        print(f"{name}: FAILED to run: {type(e).__name__}: {str(e)[:300]}")
    label = "packed segments" if packed else "one sequence"
    for name, ms in times.items():
      ratio = ms / times["plain cudnn"] if "plain cudnn" in times else float("nan")
      print(f"fwd+bwd B={batch} L={length} N={heads} K={kv_heads} H={head_dim} ({label}) {name:20s} "
            f"{ms:8.2f} ms  ({ratio:.3f}x plain)")


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--skip_timing", action="store_true")
  parser.add_argument("--iters", type=int, default=20)
  args = parser.parse_args()
  if jax.default_backend() != "gpu":
    sys.exit(f"check_ring_gpu.py needs an NVIDIA GPU; the jax backend is {jax.default_backend()!r}")
  print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}")
  # A one-device mesh: every axis, the sequence axis included, has size 1.
  mesh = sharding.make_mesh([("data", 1)], devices=jax.devices()[:1])
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    ok = run_checks()
    if not args.skip_timing:
      run_timing(args.iters)
  sys.exit(0 if ok else 1)


if __name__ == "__main__":
  main()
