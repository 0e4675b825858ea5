"""XLA compiler options for programs that are mostly the vision tower (clip encoding for inference,
haystack embedding). Measured on one H100 with jax 0.11.2 (docs/benchmarks.md): XLA's Triton GEMM path
runs the ViT's (tokens x 1024) @ (1024 x 4096) at 161 TFLOP/s where cuBLAS reaches 544, while for the
decoder the Triton path is the faster one; so the option is set per program, not globally.
"""

import jax

from hico_jax import flops


def vision_compiler_options() -> dict:
  if jax.default_backend() == "gpu":
    return {"xla_gpu_enable_triton_gemm": False}
  return {}


def train_compiler_options(model_config, frames_per_row: int, text_tokens_per_row: int = 512) -> dict:
  """Options for a train step: the vision ones when the vision tower does most of the FLOPs (long videos
  at 448 px), XLA's defaults otherwise (the decoder is faster with them)."""
  clips = frames_per_row // model_config.clip_frames
  vision = clips * flops.umt_clip_forward_flops(model_config.vit, model_config.llm.hidden_size)
  llm = flops.qwen2_forward_flops(model_config.llm, model_config.visual_tokens(frames_per_row) + text_tokens_per_row)
  return vision_compiler_options() if vision > llm else {}
