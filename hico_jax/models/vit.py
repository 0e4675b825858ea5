"""UMT-L, the video ViT of VideoChat-Flash (videochat_flash.md §1).

Patch 16 with tubelet 1 (every frame patched on its own), width 1024, 16 heads, MLP 4096 with exact GELU,
q and v biases only (k's bias is fixed at zero), pre-norm LayerNorm eps 1e-6, no CLS token, the fixed
sinusoid position table over (t, h, w). The released checkpoints run 23 of the pretrained 24 blocks and end
with the pretrained final LayerNorm (eps 1e-12) on block 23's output: `depth` counts the blocks that run.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from einops import rearrange
import flax.linen as nn
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from hico_jax.config_dicts import dataclass_from_dict
from hico_jax.models import position_tables
from hico_jax.models.layers import (ATTENTION_INPUT_NAMES, DTYPES, MLP_HIDDEN_NAME, REMAT_POLICIES, LayerNorm,
                                    Projection, add_bias, constrain, exact_gelu, normal_init)
from hico_jax.ops import attention as attention_ops
from hico_jax.ops import layer_norm as layer_norm_ops


BLOCK_LOOPS = ("auto", "scan", "unrolled")


def training_block_loop(block_loop: str, platform: str) -> str:
  """block_loop for a training step on `platform` (jax.default_backend()): "auto" is unrolled on GPUs, where
  it shortens the hico_2b 256-frame step by 1-2% (1.554 -> 1.525 s with the `attn` remat, 1.658 -> 1.639
  with `full`) for 2.5-3 GiB and a compile 2-3x as long; a loop elsewhere: XLA's CPU scheduler runs an
  unrolled tower's recompute right after its forward and so keeps every activation (TPUs: not measured).
  Inference keeps the loop: without a backward pass there are no stacks to save, only compile time to lose."""
  if block_loop != "auto":
    return block_loop
  return "unrolled" if platform == "gpu" else "scan"


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  image_size: int = 224            # 224 ("umt-large") or 448 ("umt-hd-large")
  patch_size: int = 16
  width: int = 1024
  depth: int = 23                  # blocks that run (the checkpoint stores 23 of the pretrained 24)
  num_heads: int = 16
  mlp_dim: int = 4096
  clip_frames: int = 4             # frames per clip, the temporal extent of the position table
  dtype: str = "bfloat16"
  param_dtype: str = "float32"
  remat_policy: str = "full"
  attention_impl: str = "xla"
  norm_impl: str = "xla"           # LayerNorm kernels: xla | pallas (GPU, ops/layer_norm.py)
  # The blocks as a loop ("scan") or as straight-line code ("unrolled"); "auto" is a loop here and is what
  # `training_block_loop` decides for a training step. In a loop, every activation the backward pass keeps is
  # copied into a zero-filled per-block stack and out again (docs/benchmarks.md, "The copies, placed").
  block_loop: str = "auto"

  @classmethod
  def from_dict(cls, fields: dict[str, Any]) -> "ViTConfig":
    config = dataclass_from_dict(cls, fields, "ViT")
    if config.image_size % config.patch_size:
      raise ValueError(f"image_size={config.image_size} is not a multiple of patch_size={config.patch_size}")
    if config.width % config.num_heads:
      raise ValueError(f"width={config.width} is not a multiple of num_heads={config.num_heads}")
    if config.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy={config.remat_policy!r} is not one of {sorted(REMAT_POLICIES)}")
    if config.attention_impl not in ("xla", "cudnn"):
      # A clip's tokens are never split over the sequence axis (clips are), so there is no ring to run.
      raise ValueError(f"vision attention_impl={config.attention_impl!r} must be 'xla' or 'cudnn'")
    if config.block_loop not in BLOCK_LOOPS:
      raise ValueError(f"vision block_loop={config.block_loop!r} is not one of {BLOCK_LOOPS}")
    if config.norm_impl not in layer_norm_ops.IMPLEMENTATIONS:
      raise ValueError(f"vision norm_impl={config.norm_impl!r} is not one of {layer_norm_ops.IMPLEMENTATIONS}")
    return config

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def tokens_per_frame(self) -> int:
    return self.grid * self.grid

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads


class QKVProjection(nn.Module):
  """q, k and v from one (width, 3, heads, head_dim) kernel, as the checkpoint stores it, but as three
  matmuls: each lands in the (B, L, heads, head_dim) layout the attention kernel reads, and the attention's
  three input gradients feed three backward matmuls. One fused matmul would need its (B, L, 3, ...) output
  split into q, k and v before the attention and the three gradients joined after it, full passes over the
  activations that cost more than the larger matmul saves."""
  config: ViTConfig

  @nn.compact
  def __call__(self, h):
    cfg = self.config
    kernel = self.param("kernel", normal_init(("embed", None, "heads", "head_dim")),
                        (cfg.width, 3, cfg.num_heads, cfg.head_dim), DTYPES[cfg.param_dtype])
    kernel = kernel.astype(DTYPES[cfg.dtype])
    return tuple(jnp.einsum("bld,dnh->blnh", h, kernel[:, i]) for i in range(3))


class ViTBlock(nn.Module):
  config: ViTConfig

  @nn.compact
  def __call__(self, x, _):
    cfg = self.config
    dtype, param_dtype = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
    norm = lambda name: LayerNorm(1e-6, dtype, param_dtype, cfg.norm_impl, "act_clips", name=name)

    h = norm("norm1")(x)
    q, k, v = QKVProjection(cfg, name="qkv")(h)
    bias = lambda name: self.param(name, nn.with_logical_partitioning(nn.initializers.zeros, ("heads", "head_dim")),
                                   (cfg.num_heads, cfg.head_dim), param_dtype).astype(dtype)
    # BEiT-style biases: q and v only; k's bias is fixed at zero and is no parameter.
    q, v = add_bias(q, bias("q_bias")), add_bias(v, bias("v_bias"))
    q, k, v = (checkpoint_name(t, name) for t, name in zip((q, k, v), ATTENTION_INPUT_NAMES))
    out = attention_ops.attention(q, k, v, impl=cfg.attention_impl, causal=False)
    out = constrain(out, ("act_clips", None, "act_heads", "act_head_dim"))
    out = Projection("blnh,nhd->bld", (cfg.num_heads, cfg.head_dim, cfg.width), ("heads", "head_dim", "embed"),
                     ("embed",), dtype, param_dtype, name="proj")(out)
    x = x + out

    h = norm("norm2")(x)
    h = Projection("bld,df->blf", (cfg.width, cfg.mlp_dim), ("embed", "mlp"), ("mlp",), dtype, param_dtype,
                   name="fc1")(h)
    h = constrain(exact_gelu(checkpoint_name(h, MLP_HIDDEN_NAME)), ("act_clips", None, "act_mlp"))
    h = Projection("blf,fd->bld", (cfg.mlp_dim, cfg.width), ("mlp", "embed"), ("embed",), dtype, param_dtype,
                   name="fc2")(h)
    return constrain(x + h, ("act_clips", None, "act_emb")), None


class UMTViT(nn.Module):
  """frames (N, T, S, S, 3), normalised, T == clip_frames (a clip) or 1 (an image) -> (N, T·g·g, width)."""
  config: ViTConfig

  @nn.compact
  def __call__(self, frames):
    cfg = self.config
    dtype, param_dtype = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
    n, t, height, width, channels = frames.shape
    if height != cfg.image_size or width != cfg.image_size or channels != 3:
      raise ValueError(f"the vision tower takes {cfg.image_size}x{cfg.image_size}x3 frames, got "
                       f"{height}x{width}x{channels}")
    if t not in (1, cfg.clip_frames):
      raise ValueError(f"the vision tower takes clips of {cfg.clip_frames} frames (or 1 image), got {t}")

    # Conv3d with kernel = stride = (1, 16, 16) is a matmul over each frame's 16x16x3 patches.
    p = cfg.patch_size
    patches = rearrange(frames.astype(dtype), "n t (h p) (w q) c -> n t h p w q c", p=p, q=p)
    kernel = self.param("patch_kernel", normal_init((None, None, None, None, "embed")),
                        (1, p, p, channels, cfg.width), param_dtype)
    bias = self.param("patch_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                      (cfg.width,), param_dtype)
    x = jnp.einsum("nthpwqc,pqcd->nthwd", patches, kernel[0].astype(dtype)) + bias.astype(dtype)
    x = rearrange(x, "n t h w d -> n (t h w) d")
    table = position_tables.umt_position_table(cfg.image_size, t, cfg.width, cfg.patch_size)
    x = constrain(x + jnp.asarray(table, dtype), ("act_clips", None, "act_emb"))

    # The blocks' parameters are stacked over a "layers" axis either way (one checkpoint layout). Unrolled,
    # the remat must prevent CSE: with nothing between a block's forward and its recompute, XLA would merge
    # them and keep every activation (in a scan the loop boundary does that job, hence no barriers there).
    unroll = cfg.block_loop == "unrolled"
    block = ViTBlock
    if REMAT_POLICIES[cfg.remat_policy] is not None:
      block = nn.remat(ViTBlock, prevent_cse=unroll, policy=REMAT_POLICIES[cfg.remat_policy])
    x, _ = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, length=cfg.depth,
                   unroll=cfg.depth if unroll else 1,
                   metadata_params={nn.PARTITION_NAME: "layers"})(cfg, name="blocks")(x, None)
    return LayerNorm(1e-12, dtype, param_dtype, cfg.norm_impl, "act_clips",
                     name="vision_layernorm")(x)
