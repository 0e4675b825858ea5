"""Model presets with the real sizes (videochat_flash.md §4), as ml_collections ConfigDicts.

Configs pick one by name and override any field on the command line (`--config.model.llm.remat_policy=dots`).
`tiny` keeps the real Qwen2 vocabulary so the real tokenizer works with it; everything else is small.
"""

import dataclasses

import ml_collections

from hico_jax.models.qwen2 import Qwen2Config
from hico_jax.models.vit import ViTConfig

_COMPUTE_DEFAULTS = dict(dtype="bfloat16", param_dtype="float32", remat_policy="full", attention_impl="xla")

LLM_PRESETS = {
    # Qwen2.5-1.5B-Instruct: the LLM of VideoChat-Flash-Qwen2_5-2B_res448.
    "qwen2_5_1_5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28,
                         num_heads=12, num_kv_heads=2, head_dim=128, rope_theta=1e6, rms_norm_eps=1e-6,
                         tie_word_embeddings=True, max_position_embeddings=32768),
    # Qwen2-7B-Instruct: the LLM of VideoChat-Flash-Qwen2-7B_res224 / _res448.
    "qwen2_7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                     num_heads=28, num_kv_heads=4, head_dim=128, rope_theta=1e6, rms_norm_eps=1e-6,
                     tie_word_embeddings=False, max_position_embeddings=32768),
    # Qwen2.5-7B-Instruct-1M: the 1M-context variant (theta 1e7, eps 1e-5). The released config says
    # max_position_embeddings 1,010,000; RoPE here is computed from positions, so no table to outgrow.
    "qwen2_5_7b_1m": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                          num_heads=28, num_kv_heads=4, head_dim=128, rope_theta=1e7, rms_norm_eps=1e-5,
                          tie_word_embeddings=False, max_position_embeddings=1010000),
    "tiny": dict(vocab_size=151936, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                 num_kv_heads=2, head_dim=16, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True,
                 max_position_embeddings=32768),
}


def _every_field(config_class, fields: dict) -> dict:
  """fields, completed with config_class's defaults. ml_collections refuses a command-line override of a key
  its dict lacks, so every field must be there for `--config.model.vit.norm_impl=pallas` to work."""
  defaults = {f.name: f.default for f in dataclasses.fields(config_class) if f.default is not dataclasses.MISSING}
  return {**defaults, **fields}


def llm(name: str, **overrides) -> ml_collections.ConfigDict:
  """The Qwen2 decoder preset `name` with compute defaults (bf16 compute, fp32 weights, full remat)."""
  if name not in LLM_PRESETS:
    raise ValueError(f"unknown LLM preset {name!r}; known presets: {sorted(LLM_PRESETS)}")
  return ml_collections.ConfigDict(_every_field(Qwen2Config, {**LLM_PRESETS[name], **_COMPUTE_DEFAULTS, **overrides}))


VIT_PRESETS = {
    # UMT-L as VideoChat-Flash runs it: 23 of 24 blocks, 4-frame clips.
    "umt_l": dict(patch_size=16, width=1024, depth=23, num_heads=16, mlp_dim=4096, clip_frames=4),
    # Same code, small: head dim 64 as in UMT-L, 112 px -> 7x7 patches, 196 tokens a clip (merged 98, 34).
    "tiny": dict(patch_size=16, width=128, depth=2, num_heads=2, mlp_dim=256, clip_frames=4),
}

# name -> (vision preset, image size, LLM preset)
HICO_PRESETS = {
    "hico_2b": ("umt_l", 448, "qwen2_5_1_5b"),       # VideoChat-Flash-Qwen2_5-2B_res448
    "hico_7b": ("umt_l", 224, "qwen2_7b"),           # VideoChat-Flash-Qwen2-7B_res224 (stage 3)
    "hico_7b_448": ("umt_l", 448, "qwen2_7b"),       # VideoChat-Flash-Qwen2-7B_res448 (stage 4)
    "hico_7b_1m": ("umt_l", 224, "qwen2_5_7b_1m"),   # VideoChat-Flash-Qwen2_5-7B-1M_res224
    "tiny": ("tiny", 112, "tiny"),
}


def _encode_chunk(vision_attention: str) -> int:
  """Clips per vision-tower step. Each step of the tower's loop carries its parameter gradients and stacks
  its residuals: with cuDNN's attention, whose memory does not grow with the square of a clip's length, a
  step takes 64 clips (one row of 256 frames on one H100: 1.646 -> 1.584 s, in no more memory;
  docs/benchmarks.md). XLA's attention writes out every clip's scores (a 448 px clip: 16 x 3136^2, 315 MB
  in bf16), so it keeps 16."""
  return 64 if vision_attention == "cudnn" else 16


def hico(name: str, **compute) -> ml_collections.ConfigDict:
  """A composed HiCo preset: {vit, llm, tokens_per_clip, encode_chunk, loss_chunk}. `compute` (dtype, param_dtype,
  remat_policy, attention_impl) applies to both towers."""
  if name not in HICO_PRESETS:
    raise ValueError(f"unknown HiCo preset {name!r}; known presets: {sorted(HICO_PRESETS)}")
  vit_name, image_size, llm_name = HICO_PRESETS[name]
  vit_compute = {**_COMPUTE_DEFAULTS, **compute}
  if vit_compute["attention_impl"] in ("ring", "all_gather"):
    # Sequence parallelism is the LLM's; the vision tower runs the per-block kernel on its own clips.
    vit_compute["attention_impl"] = vit_compute.get("attention_block_impl", "xla")
  vit_compute.pop("attention_block_impl", None)
  return ml_collections.ConfigDict({
      "vit": _every_field(ViTConfig, {**VIT_PRESETS[vit_name], "image_size": image_size, **vit_compute}),
      "llm": dict(llm(llm_name, **compute)),
      "tokens_per_clip": 64,
      "encode_chunk": _encode_chunk(vit_compute["attention_impl"]),
      "loss_chunk": 4096,
  })
