#!/usr/bin/env python
"""The vision tower's two costliest kernels at hico_2b's 256-frame shape, each against the alternatives we
tried for it, on one GPU. The record behind docs/benchmarks.md's "tried and dropped" paragraphs; nothing
here is used by the model.

  python tools/kernel_experiments.py attention   # cuDNN attention, 64 clips x 3,136 tokens, 16 heads of 64
  python tools/kernel_experiments.py fc1         # (200,704 x 1,024) @ (1,024 x 4,096) + bias, exact GELU

`attention`: forward and forward+backward times of jax's cuDNN attention over a grid of query and key
lengths (3,136 is not a multiple of the kernel's 128-token tiles), and three exact ways around the
misalignment, each checked against the plain call: queries split at 3,072, queries padded to 3,200, and
keys split at 3,072 with the two parts merged by their log-sum-exp (cuDNN for the aligned part, XLA for the
64-key tail, jax's private cuDNN primitives for the backward from the merged statistics).

`fc1`: the first MLP projection with its bias and exact GELU as the model compiles it (XLA, cuBLAS, the
vision programs' options), against a Pallas Mosaic-GPU Hopper GEMM (jax's hopper_matmul_mgpu) plain and
with the bias and GELU in its epilogue, writing the activation alone (the forward pass) or with the
pre-activation (the recompute, whose GELU backward needs it).

Prints one JSON line per case; --out appends them to a file.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import time

import jax
import jax.numpy as jnp
from jax import lax

CLIPS, HEADS, HEAD_DIM, CLIP_TOKENS = 64, 16, 64, 3136
WIDTH, MLP_DIM = 1024, 4096


def _time_ms(fn, *args, iters=10, repeats=3) -> float:
  """Best of `repeats` means over `iters` back-to-back calls, after one warm-up call. Not
  hico_jax.bench.timing.time_calls, which waits for each call: at a few milliseconds a kernel, the wait and the
  next launch would be in it."""
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(iters):
      result = fn(*args)
    jax.block_until_ready(result)
    best = min(best, (time.perf_counter() - start) / iters)
  return best * 1e3


def _max_error(a, b) -> float:
  return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))


# --- attention ------------------------------------------------------------------------------------------

SCALE = HEAD_DIM ** -0.5


def cudnn_attention(q, k, v):
  return jax.nn.dot_product_attention(q, k, v, scale=SCALE, implementation="cudnn")


def queries_split(q, k, v, at=3072):
  return jnp.concatenate([cudnn_attention(q[:, :at], k, v), cudnn_attention(q[:, at:], k, v)], axis=1)


def queries_padded(q, k, v, to=3200):
  padded = jnp.pad(q, ((0, 0), (0, to - q.shape[1]), (0, 0), (0, 0)))
  return cudnn_attention(padded, k, v)[:, :q.shape[1]]


def _tail_logits(q, k_tail):
  return jnp.einsum("btnh,bsnh->bnts", q.astype(jnp.float32), k_tail.astype(jnp.float32)) * SCALE


# attention_blocks._cudnn_forward/_cudnn_backward do the same for ring attention, but always with a mask as a
# bias; the mask-free kernel is the one measured here.
@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def keys_split(q, k, v, at=3072):
  return _keys_split_forward(q, k, v, at)[0]


def _keys_split_forward(q, k, v, at):
  from jax._src.cudnn import fused_attention_stablehlo as fa  # pylint: disable=import-outside-toplevel
  head_out, head_lse = fa.dot_product_attention(q, k[:, :at], v[:, :at], scale=SCALE, return_residual=True)
  logits = _tail_logits(q, k[:, at:])
  tail_lse = jax.nn.logsumexp(logits, -1)
  tail_out = jnp.einsum("bnts,bsnh->btnh", jnp.exp(logits - tail_lse[..., None]), v[:, at:].astype(jnp.float32))
  lse = jnp.logaddexp(head_lse.astype(jnp.float32), tail_lse)                       # (b, n, t)
  weight = lambda part_lse: jnp.swapaxes(jnp.exp(part_lse - lse), 1, 2)[..., None]
  out = (weight(head_lse) * head_out.astype(jnp.float32) + weight(tail_lse) * tail_out).astype(q.dtype)
  return out, (q, k, v, out, lse)


def _keys_split_backward(at, residuals, dout):
  from jax._src.cudnn import fused_attention_stablehlo as fa  # pylint: disable=import-outside-toplevel
  q, k, v, out, lse = residuals
  empty = jnp.zeros(0, q.dtype)
  # Given the merged output and statistics, the backward primitive returns the head part's exact share.
  dq_head, dk_head, dv_head = fa._dot_product_attention_bwd_p_wrapper.bind(  # pylint: disable=protected-access
      q, k[:, :at], v[:, :at], empty, empty, empty, empty, empty, empty, empty, lse, out, dout,
      scale=SCALE, seed=42, dropout_rate=0.0, variadic_args=(False, False), mask_type=fa.MaskType.NO_MASK,
      layout=fa.AttentionLayout.BTNH.value, sliding_window_length=None)[:3]
  probs = jnp.exp(_tail_logits(q, k[:, at:]) - lse[..., None])
  dout32 = dout.astype(jnp.float32)
  delta = jnp.swapaxes(jnp.sum(dout32 * out.astype(jnp.float32), -1), 1, 2)
  dv_tail = jnp.einsum("bnts,btnh->bsnh", probs, dout32)
  dlogits = probs * (jnp.einsum("btnh,bsnh->bnts", dout32, v[:, at:].astype(jnp.float32)) - delta[..., None]) * SCALE
  dq = dq_head.astype(jnp.float32) + jnp.einsum("bnts,bsnh->btnh", dlogits, k[:, at:].astype(jnp.float32))
  dk_tail = jnp.einsum("bnts,btnh->bsnh", dlogits, q.astype(jnp.float32))
  join = lambda head, tail: jnp.concatenate([head, tail.astype(head.dtype)], axis=1)
  return dq.astype(q.dtype), join(dk_head, dk_tail), join(dv_head, dv_tail)


keys_split.defvjp(lambda q, k, v, at: _keys_split_forward(q, k, v, at), _keys_split_backward)


def attention_cases():
  def case(name, fn, q_len, kv_len, check):
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q, dout = (jax.random.normal(key, (CLIPS, q_len, HEADS, HEAD_DIM), jnp.bfloat16) for key in keys[::3])
    k, v = (jax.random.normal(key, (CLIPS, kv_len, HEADS, HEAD_DIM), jnp.bfloat16) for key in keys[1:3])
    forward = jax.jit(fn)
    train = jax.jit(lambda q, k, v, dout: jax.vjp(fn, q, k, v)[1](dout))
    forward_ms, train_ms = _time_ms(forward, q, k, v), _time_ms(train, q, k, v, dout)
    flops = 4 * CLIPS * HEADS * q_len * kv_len * HEAD_DIM
    row = dict(section="attention", case=name, q_len=q_len, kv_len=kv_len, forward_ms=round(forward_ms, 3),
               backward_ms=round(train_ms - forward_ms, 3), forward_tflops=round(flops / forward_ms / 1e9, 1))
    if check:
      ref_out = jax.jit(cudnn_attention)(q, k, v)
      ref_grads = jax.jit(lambda q, k, v, dout: jax.vjp(cudnn_attention, q, k, v)[1](dout))(q, k, v, dout)
      row["max_error_out"] = _max_error(forward(q, k, v), ref_out)
      row["max_error_dq_dk_dv"] = [_max_error(a, b) for a, b in zip(train(q, k, v, dout), ref_grads)]
    return row

  for q_len, kv_len in [(3136, 3136), (3072, 3072), (3200, 3200), (3136, 3072), (3072, 3136), (3200, 3136),
                        (3136, 3200)]:
    yield case("cudnn", cudnn_attention, q_len, kv_len, check=False)
  for name, fn in [("queries split at 3072", queries_split), ("queries padded to 3200", queries_padded),
                   ("keys split at 3072, lse merge", keys_split)]:
    yield case(name, fn, CLIP_TOKENS, CLIP_TOKENS, check=True)


# --- fc1: GEMM + bias + exact GELU ----------------------------------------------------------------------

# XLA's (Eigen's) float32 erf, a rational function on [-4, 4]: Mosaic GPU has no layout rule for math.erf.
_ERF_NUMERATOR = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
                  -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_ERF_DENOMINATOR = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03,
                    -7.37332916720468e-03, -1.42647390514189e-02)


def _polynomial(x2, coefficients):
  value = x2 * coefficients[0] + coefficients[1]
  for c in coefficients[2:]:
    value = value * x2 + c
  return value


def rational_gelu(x):
  z = jnp.minimum(jnp.maximum(x * (1 / math.sqrt(2)), -4.0), 4.0)
  erf = z * _polynomial(z * z, _ERF_NUMERATOR) / _polynomial(z * z, _ERF_DENOMINATOR)
  return 0.5 * x * (1.0 + erf)


@dataclasses.dataclass(frozen=True)
class GemmTiles:
  tile_m: int = 128
  tile_n: int = 128
  tile_k: int = 64
  stages: int = 4
  epilogue_tile: int = 64
  grid_tile_width: int = 8
  split_n_over_warpgroups: bool = True   # else the two compute warpgroups split M
  approx_math: bool = False


def _gemm_bias_gelu_kernel(a_gmem, b_gmem, bias_gmem, *out_gmems, tiles: GemmTiles):
  """hopper_matmul_mgpu's persistent warp-specialised kernel, with bias + GELU applied to the fp32
  accumulator before the store. One output: GELU(a @ b + bias); two: also a @ b + bias."""
  import jax.experimental.pallas as pl  # pylint: disable=import-outside-toplevel
  import jax.experimental.pallas.mosaic_gpu as plgpu  # pylint: disable=import-outside-toplevel
  from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm  # pylint: disable=import-outside-toplevel

  dtype = a_gmem.dtype
  (m, k), n = a_gmem.shape, b_gmem.shape[1]
  tile_m, tile_n, tile_k, epi = tiles.tile_m, tiles.tile_n, tiles.tile_k, tiles.epilogue_tile
  swizzle = plgpu.find_swizzle(tile_k * jnp.dtype(dtype).itemsize * 8)
  transforms = (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(swizzle))
  out_swizzle = plgpu.find_swizzle(epi * jnp.dtype(dtype).itemsize * 8)
  out_transforms = (plgpu.TilingTransform((8, out_swizzle // jnp.dtype(dtype).itemsize)),
                    plgpu.SwizzleTransform(out_swizzle))
  cta_m = tile_m * (1 if tiles.split_n_over_warpgroups else 2)
  cta_n = tile_n * (2 if tiles.split_n_over_warpgroups else 1)
  m_iters, n_iters = m // cta_m, n // cta_n

  def pipeline(body, context):
    return plgpu.emit_pipeline_warp_specialized(
        body, grid=(k // tile_k,), memory_registers=40, wg_axis="wg", num_compute_wgs=2,
        max_concurrent_steps=tiles.stages, compute_context=context,
        in_specs=[plgpu.BlockSpec((cta_m, tile_k), lambda i: (0, i), transforms=transforms, memory_space=plgpu.SMEM),
                  plgpu.BlockSpec((tile_k, cta_n), lambda i: (i, 0), transforms=transforms, memory_space=plgpu.SMEM)])

  ignore = lambda *_, **__: None

  @functools.partial(
      pl.run_scoped, pipeline_allocs=pipeline(ignore, ignore).get_allocations(a_gmem, b_gmem),
      out_smem=plgpu.SMEM((2, len(out_gmems), 2, epi, epi), dtype, transforms=out_transforms),
      bias_smem=plgpu.SMEM((2, tile_n), jnp.float32), bias_barrier=plgpu.Barrier(num_barriers=2),
      collective_axes="wg")
  def _scope(pipeline_allocs, out_smem, bias_smem, bias_barrier):
    wg = lax.axis_index("wg")

    @plgpu.nd_loop((m_iters * n_iters,), collective_axes="cluster_grid")
    def _tile_loop(loop_info):
      m_idx, n_idx = plgpu.planar_snake(loop_info.index[0], (m_iters, n_iters), hm.MatmulDimension.N,
                                        tiles.grid_tile_width)
      cta_rows, cta_cols = pl.ds(m_idx * cta_m, cta_m), pl.ds(n_idx * cta_n, cta_n)
      if tiles.split_n_over_warpgroups:
        wg_rows, wg_cols = slice(None), pl.ds(wg * tile_n, tile_n)
        bias_cols = pl.ds(n_idx * cta_n + wg * tile_n, tile_n)
      else:
        wg_rows, wg_cols = pl.ds(wg * tile_m, tile_m), slice(None)
        bias_cols = cta_cols

      def compute_context(run_pipeline):
        @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((tile_m, tile_n), jnp.float32))
        def _accumulate(acc_ref):
          plgpu.copy_gmem_to_smem(bias_gmem.at[bias_cols], bias_smem.at[wg], bias_barrier.at[wg])
          run_pipeline(acc_ref)
          plgpu.barrier_wait(bias_barrier.at[wg])
          pre = acc_ref[...] + lax.broadcast_in_dim(bias_smem[wg], (tile_m, tile_n), [1])
          values = [rational_gelu(pre).astype(dtype)] + ([pre.astype(dtype)] if len(out_gmems) == 2 else [])
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)
          for mi in range(tile_m // epi):
            for ni in range(tile_n // epi):
              rows, cols, slot = (slice(mi * epi, (mi + 1) * epi), slice(ni * epi, (ni + 1) * epi),
                                   (mi * (tile_n // epi) + ni) % 2)
              plgpu.wait_smem_to_gmem(len(out_gmems), wait_read_only=True)
              for o, value in enumerate(values):
                out_smem[wg, o, slot] = value[rows, cols]
              plgpu.commit_smem()
              for o, out_gmem in enumerate(out_gmems):
                plgpu.copy_smem_to_gmem(out_smem.at[wg, o, slot],
                                        out_gmem.at[cta_rows, cta_cols].at[wg_rows, wg_cols].at[rows, cols])

      def mma(_, a_smem, b_smem, acc_ref):
        plgpu.wgmma(acc_ref, a_smem.at[wg_rows], b_smem.at[:, wg_cols])
        plgpu.wgmma_wait(0)
        return acc_ref

      pipeline(mma, compute_context)(a_gmem.at[cta_rows, :], b_gmem.at[:, cta_cols], allocations=pipeline_allocs)
  plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def pallas_gemm_bias_gelu(a, b, bias, tiles=GemmTiles(), with_preactivation=False):
  import jax.experimental.pallas.mosaic_gpu as plgpu  # pylint: disable=import-outside-toplevel
  out = jax.ShapeDtypeStruct((a.shape[0], b.shape[1]), a.dtype)
  kernel = plgpu.kernel(
      functools.partial(_gemm_bias_gelu_kernel, tiles=tiles), out_type=(out,) * (1 + with_preactivation),
      grid=(jax.devices()[0].core_count,), grid_names=("cluster_grid",), num_threads=3, thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=tiles.approx_math,
                                           lowering_semantics=plgpu.LoweringSemantics.Warpgroup))
  return kernel(a, b, bias.astype(jnp.float32))


def fc1_cases():
  from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm  # pylint: disable=import-outside-toplevel
  from hico_jax.models.layers import exact_gelu  # pylint: disable=import-outside-toplevel
  from hico_jax.ops.xla_options import vision_compiler_options  # pylint: disable=import-outside-toplevel

  tokens = CLIPS * CLIP_TOKENS
  flops = 2 * tokens * WIDTH * MLP_DIM
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  a = jax.random.normal(keys[0], (tokens, WIDTH), jnp.bfloat16)
  b = (jax.random.normal(keys[1], (WIDTH, MLP_DIM)) * WIDTH ** -0.5).astype(jnp.bfloat16)
  bias = jax.random.normal(keys[2], (MLP_DIM,)) * 0.1
  reference = exact_gelu(jnp.dot(a, b, preferred_element_type=jnp.float32) + bias)   # fp32 GEMM and GELU

  def row(name, fn, outputs_are_tuple, gelu=True):
    ms = _time_ms(fn, a, b, bias)
    result = dict(section="fc1", case=name, ms=round(ms, 3), gemm_tflops_equivalent=round(flops / ms / 1e9, 1))
    if gelu:
      result["max_error_vs_fp32"] = _max_error(fn(a, b, bias)[0] if outputs_are_tuple else fn(a, b, bias),
                                               reference)
    return result

  compile_vision = lambda fn: jax.jit(fn).lower(a, b, bias).compile(vision_compiler_options())
  as_model = lambda a, b, bias: a @ b + bias.astype(a.dtype)          # Projection: einsum + add_bias
  yield row("xla: gemm + bias", compile_vision(as_model), False, gelu=False)
  yield row("xla: gemm + bias, GELU", compile_vision(lambda *args: exact_gelu(as_model(*args))), False)
  yield row("xla: gemm + bias, GELU and pre-activation",
            compile_vision(lambda *args: (exact_gelu(as_model(*args)), as_model(*args))), True)
  plain = hm.TuningConfig(tile_m=128, tile_n=128, tile_k=64, max_concurrent_steps=4, epi_tile_n=64, epi_tile_m=64,
                          grid_minor_dim=hm.MatmulDimension.N, grid_tile_width=16, wg_dimension=hm.MatmulDimension.M)
  yield dict(section="fc1", case="pallas: gemm, no bias", ms=round(_time_ms(
      jax.jit(functools.partial(hm.matmul, config=plain)), a, b, None), 3))
  for tiles in [GemmTiles(), GemmTiles(grid_tile_width=16), GemmTiles(approx_math=True),
                GemmTiles(grid_tile_width=16, approx_math=True)]:
    for with_pre in (False, True):
      chosen = dataclasses.replace(tiles, stages=3) if with_pre else tiles   # two outputs: less shared memory
      fn = jax.jit(functools.partial(pallas_gemm_bias_gelu, tiles=chosen, with_preactivation=with_pre))
      yield {**row("pallas: gemm + bias + GELU epilogue" + (" and pre-activation" if with_pre else ""), fn, True),
             "tiles": dataclasses.asdict(chosen)}


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("sections", nargs="+", choices=["attention", "fc1"])
  parser.add_argument("--out", default=None, help="append the JSON lines to this file")
  args = parser.parse_args()
  device = jax.devices()[0]
  for section in args.sections:
    for result in {"attention": attention_cases, "fc1": fc1_cases}[section]():
      line = json.dumps({**result, "device": device.device_kind, "jax": jax.__version__})
      print(line, flush=True)
      if args.out:
        with open(args.out, "a") as f:
          f.write(line + "\n")


if __name__ == "__main__":
  main()
