#!/usr/bin/env python
"""A long video's visual tokens on one device, the way CausalLM.encode_video makes them: uint8 frames uploaded a
chunk of clips at a time, normalised on the device, tower + merge + projector per chunk (hico_jax/infer/visual.py).

  python tools/benchmark_encode.py --preset hico_7b --frames 1000 10000
  python tools/benchmark_encode.py --preset hico_2b --frames 1000 10000 --chunk_clips 8

Random bf16 vision-tower and projector weights (the LLM is never built), cuDNN attention on a GPU, random
frames at the preset's size. Prints seconds, frames per second and the device's peak memory per frame count
(each length is encoded once untimed first, which compiles its chunk shape).
"""

from __future__ import annotations

import argparse
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hico_jax.convert.videochat_flash import UMT_L
from hico_jax.infer import visual
from hico_jax.models import hico
from hico_jax.models.qwen2 import Qwen2Config
from hico_jax.models.vit import ViTConfig

# (image size, the LLM's hidden size: the projector's output), as hico_jax.presets has them; written out here
# because presets needs ml_collections, which the GPU machines lack. "tiny" is a smoke test for the CPU.
SIZES = {"hico_7b": (224, 3584), "hico_7b_448": (448, 3584), "hico_2b": (448, 1536), "tiny": (112, 64)}
TINY_VIT = dict(patch_size=16, width=128, depth=2, num_heads=2, mlp_dim=256, clip_frames=4)


def _config(preset: str, impl: str) -> hico.HiCoConfig:
  size, hidden = SIZES[preset]
  compute = dict(dtype="bfloat16", param_dtype="bfloat16", remat_policy="none", attention_impl=impl)
  vit = ViTConfig(**(TINY_VIT if preset == "tiny" else UMT_L), image_size=size, **compute)
  # Only the hidden size and dtype of the LLM matter: it is never built.
  llm = Qwen2Config(vocab_size=8, hidden_size=hidden, intermediate_size=8, num_layers=1, num_heads=1,
                    num_kv_heads=1, head_dim=8, **compute)
  return hico.HiCoConfig(vit=vit, llm=llm)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default="hico_7b", choices=sorted(SIZES))
  parser.add_argument("--frames", type=int, nargs="+", default=[1000, 10000])
  parser.add_argument("--chunk_clips", type=int, default=None, help="default: hico_jax.infer.visual's")
  args = parser.parse_args(argv)
  impl = "cudnn" if jax.default_backend() == "gpu" else "xla"
  config = _config(args.preset, impl)
  shapes = nn.unbox(jax.eval_shape(hico.HiCo(config).init, jax.random.key(0), *hico.init_inputs(config)))
  rng = np.random.default_rng(0)
  params = {"visual": jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.02, s.shape), s.dtype),
                                   shapes["params"]["visual"])}
  encoder = visual.VideoEncoder(config, params, chunk_clips=args.chunk_clips)
  size, clip = config.vit.image_size, config.clip_frames
  device = jax.devices()[0]
  print(f"{args.preset} at {size} px on {device.device_kind}, {encoder.chunk_clips} clips a chunk, {impl} attention")
  for frames in args.frames:
    video = rng.integers(0, 256, (frames // clip * clip, size, size, 3), dtype=np.uint8)
    encoder(video, progress=False).block_until_ready()       # compiles the chunk shape this length takes
    started = time.perf_counter()
    tokens = encoder(video, progress=False)
    tokens.block_until_ready()
    took = time.perf_counter() - started
    stats = device.memory_stats() or {}
    peak = stats.get("peak_bytes_in_use", float("nan")) / 2**30
    print(f"{len(video):>6} frames: {took:7.1f} s, {len(video) / took:6.0f} frames/s, tokens {tuple(tokens.shape)} "
          f"{tokens.dtype}, peak {peak:.1f} GiB", flush=True)
    del tokens
  return 0


if __name__ == "__main__":
  sys.exit(main())
