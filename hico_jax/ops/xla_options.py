"""XLA compiler options for programs that are mostly the vision tower (clip encoding for inference,
haystack embedding). Measured on one H100 with jax 0.11.2 (docs/benchmarks.md): XLA's Triton GEMM path
runs the ViT's (tokens x 1024) @ (1024 x 4096) at 161 TFLOP/s where cuBLAS reaches 544, while for the
decoder the Triton path is the faster one; so the option is set per program, not globally.
"""

import jax


def vision_compiler_options() -> dict:
  if jax.default_backend() == "gpu":
    return {"xla_gpu_enable_triton_gemm": False}
  return {}
