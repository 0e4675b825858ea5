#!/usr/bin/env python
"""Decode speed against a long KV cache: ms per new token of `hico_jax.infer.generate.generate` for a Qwen2
decoder with random bf16 weights, after prompts of the given lengths (random embeddings, as a video's visual
tokens reach the decoder), beside what reading the weights and the cache once a token takes (the floor).

  python tools/benchmark_decode.py --preset qwen2_7b --prompt 16000 160000 --cache_form carry xs_ys \
      --layers stacked per_layer

--cache_form xs_ys runs the form decoding had before 2026-12-04 (the stacked cache as the layer scan's xs and
ys, so every token copied the whole cache), for the A/B in docs/benchmarks.md. --layers per_layer holds each
layer's weights in its own buffer (`qwen2.unstack_layers`, what from_pretrained does); stacked is the training
layout, whose per-layer slices XLA copies out before the matmuls. The user-path figure (video in,
`from_pretrained` defaults) is tools/benchmark_generate.py's; this one isolates the decode loop.
"""

from __future__ import annotations

import argparse
import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from hico_jax import presets
from hico_jax.infer import generate
from hico_jax.models import qwen2

HBM_BYTES_PER_S = 4.8e12   # the H200's memory bandwidth (NVIDIA's figure), for the floor column


def _xs_ys_stacked_cache(self, run_block, hidden, params, layer_cache):
  """The earlier decode form: each layer's cache slice in as the scan's xs, the updated slice out as ys."""
  if isinstance(params, list):
    raise ValueError("--cache_form xs_ys runs with --layers stacked only")
  return jax.lax.scan(lambda x, p_kv: run_block(p_kv[0], x, p_kv[1]), hidden, (params, layer_cache))


def _seconds(fn):
  jax.block_until_ready(fn())                 # compile
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="qwen2_7b")
  parser.add_argument("--prompt", type=int, nargs="+", default=[16000, 160000])
  parser.add_argument("--new_tokens", type=int, default=33)
  parser.add_argument("--attention_impl", default="cudnn", help="the prefill's kernel (chunked on a CPU)")
  parser.add_argument("--profile", action="store_true",
                      help="also trace one decode of --new_tokens tokens and print its largest kernels")
  parser.add_argument("--cache_form", nargs="+", default=["carry"], choices=["carry", "xs_ys"])
  parser.add_argument("--layers", nargs="+", default=["per_layer"], choices=["stacked", "per_layer"])
  args = parser.parse_args()

  config = qwen2.Qwen2Config.from_dict(dict(presets.llm(args.preset, dtype="bfloat16", param_dtype="bfloat16",
                                                        attention_impl=args.attention_impl, remat_policy="none")))
  model = qwen2.Qwen2ForCausalLM(config)
  stacked = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  layouts = {"stacked": stacked}
  if "per_layer" in args.layers:
    layouts["per_layer"] = {"params": qwen2.unstack_layers(stacked["params"])}
  weight_bytes = sum(p.nbytes for p in jax.tree.leaves(stacked))
  carry_form = qwen2.Qwen2ForCausalLM._decode_layers
  for length in args.prompt:
    ids = jnp.zeros((1, length), jnp.int32)
    embeddings = jax.random.normal(jax.random.key(1), (1, length, config.hidden_size), jnp.bfloat16)
    cache_bytes = 2 * config.num_layers * length * config.num_kv_heads * config.head_dim * 2
    for form, layers in ((f, l) for f in args.cache_form for l in args.layers):
      if form == "xs_ys" and layers == "per_layer":
        continue
      qwen2.Qwen2ForCausalLM._decode_layers = carry_form if form == "carry" else _xs_ys_stacked_cache
      jax.clear_caches()                      # the jitted generate would otherwise keep the other form
      params = layouts[layers]
      run = lambda n: generate.generate(model, params, ids, max_new_tokens=n, embeddings=embeddings)
      one, many = _seconds(lambda: run(1)), _seconds(lambda: run(args.new_tokens))
      print(json.dumps({
          "preset": args.preset, "prompt": length, "cache_form": form, "layers": layers,
          "device": jax.devices()[0].device_kind,
          "prefill_s": round(one, 3), "decode_ms_per_token": round(1e3 * (many - one) / (args.new_tokens - 1), 2),
          "floor_ms_per_token": round(1e3 * (weight_bytes + cache_bytes) / HBM_BYTES_PER_S, 2),
          "date": time.strftime("%Y-%m-%d")}), flush=True)
      if args.profile:
        _print_profile(lambda: run(args.new_tokens), args.new_tokens)
    qwen2.Qwen2ForCausalLM._decode_layers = carry_form


def _print_profile(run, tokens):
  """The largest kernels of one traced call, per generated token (the prefill's share included)."""
  import tempfile        # pylint: disable=import-outside-toplevel
  import profile_gpu     # pylint: disable=import-outside-toplevel  # tools/, the script's own directory
  trace_dir = tempfile.mkdtemp()
  with jax.profiler.trace(trace_dir):
    run()
  per_kernel, launches, _ = profile_gpu.kernel_times(trace_dir, tokens)
  total = sum(per_kernel.values())
  print(f"  traced GPU time per token {total / 1e6:.2f} ms, {sum(launches.values()):.0f} launches per token")
  for name, ns in per_kernel.most_common(12):
    print(f"  {ns / 1e6:8.3f} ms  {launches[name]:6.1f}x  {profile_gpu.kind_of(name):22s} {name[:90]}")


if __name__ == "__main__":
  main()
