#!/usr/bin/env python
"""Checks on one NVIDIA GPU what each remat policy keeps for the backward pass with cuDNN attention.

  python tools/check_remat_gpu.py

The cuDNN kernel cannot run on CPU, so tests/test_remat_policies.py covers the XLA attention and this covers
the fused one: for a vision block and a decoder layer under each attention-keeping policy, jax's residual
report must hold the attention output exactly once (from the fused forward primitive, with no named copy
beside it). Before the fix that this guards, `attn` kept the vision tower's attention output twice: 9.5 GB
at 256 frames of 448 px. Prints every residual with its size; exits 1 if a check fails.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
from jax._src.ad_checkpoint import saved_residuals

from hico_jax.models import qwen2, vit
from hico_jax.models.layers import ATTENTION_INPUT_NAMES, DTYPES, REMAT_POLICIES
from hico_jax.ops import rope


def kept_residuals(f, *args) -> list[tuple[str, int, str]]:
  """(shape, bytes, source) of every residual the backward pass of f keeps, the arguments left out. A source
  reads "named 'query'", "output of dot_product_attention_fwd_wrapper", ..."""
  kept = []
  for aval, source in saved_residuals(f, *args):
    if not source.startswith("from the argument"):
      kept.append((str(aval), aval.size * aval.dtype.itemsize, source.split(" from ")[0]))
  return kept


def vision_block_residuals(config: vit.ViTConfig, clips: int = 2):
  """What one remat'ed vision block keeps under config.remat_policy -> (residuals, attention output shape)."""
  x = jax.random.normal(jax.random.key(0), (clips, config.clip_frames * config.tokens_per_frame, config.width),
                        DTYPES[config.dtype])
  params = vit.ViTBlock(config).init(jax.random.key(1), x, None)
  f = jax.checkpoint(lambda p, x: vit.ViTBlock(config).apply(p, x, None)[0].astype(jnp.float32).sum(),
                     policy=REMAT_POLICIES[config.remat_policy], prevent_cse=False)
  return kept_residuals(f, params, x), (clips, x.shape[1], config.num_heads, config.head_dim)


def decoder_layer_residuals(config: qwen2.Qwen2Config, length: int):
  """What one remat'ed decoder layer keeps under config.remat_policy -> (residuals, attention output shape)."""
  cos, sin = rope.rope_cos_sin(jnp.arange(length)[None], config.head_dim, config.rope_theta)
  meta = {"cos": cos, "sin": sin, "segment_ids": None, "slots": None}
  x = jax.random.normal(jax.random.key(0), (1, length, config.hidden_size), DTYPES[config.dtype])
  layer = qwen2.DecoderLayer(config)
  params = layer.init(jax.random.key(1), x, meta, None)
  f = jax.checkpoint(lambda p, x: layer.apply(p, x, meta, None)[0].astype(jnp.float32).sum(),
                     policy=REMAT_POLICIES[config.remat_policy], prevent_cse=False)
  return kept_residuals(f, params, x), (1, length, config.num_heads, config.head_dim)


def vision_block(policy):
  return vision_block_residuals(vit.ViTConfig(image_size=448, depth=1, remat_policy=policy,
                                              attention_impl="cudnn"))


def decoder_layer(policy):   # Qwen2.5-1.5B's layer
  return decoder_layer_residuals(
      qwen2.Qwen2Config(vocab_size=1024, hidden_size=1536, intermediate_size=8960, num_layers=1, num_heads=12,
                        num_kv_heads=2, head_dim=128, remat_policy=policy, attention_impl="cudnn"), 2048)


def main():
  if jax.default_backend() != "gpu":
    sys.exit("this check needs an NVIDIA GPU (cuDNN attention)")
  failures = []
  for what, build, policies in (("vision block", vision_block, ("attn", "dots_attn", "qkv_attn", "qkv_mlp_attn")),
                                ("decoder layer", decoder_layer, ("attn", "dots_attn", "qkv_attn", "qkv_mlp_attn"))):
    for policy in policies:
      kept, out_shape = build(policy)
      print(f"{what}, {policy}: {sum(b for _, b, _ in kept) / 2**20:.1f} MiB kept")
      for shape, size, source in kept:
        print(f"    {size / 2**20:9.1f} MiB  {shape:32s} {source}")
      from_kernel = [s for s in kept if "dot_product_attention_fwd" in s[2]]
      b, l, n, h = out_shape   # the fused kernel may hand its output over heads-major
      shapes = {f"[{b},{l},{n},{h}]", f"[{b},{n},{l},{h}]"}
      # (q, k and v have the output's shape too: kept by name, or as projection outputs under the dots policies)
      inputs = {f"named '{name}'" for name in ATTENTION_INPUT_NAMES} | {"output of dot_general"}
      outputs = [s for s in kept if s[0][s[0].index("["):] in shapes and s[2] not in inputs]
      if not from_kernel:
        failures.append(f"{what}, {policy}: the fused attention forward's outputs are not kept")
      if len(outputs) != 1:
        failures.append(f"{what}, {policy}: {len(outputs)} residuals of the attention output's shape "
                        f"{out_shape}, expected 1")
  for failure in failures:
    print("FAIL", failure)
  print("all checks passed" if not failures else f"{len(failures)} check(s) failed")
  sys.exit(1 if failures else 0)


if __name__ == "__main__":
  main()
