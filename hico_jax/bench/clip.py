"""`clip` cases: clip encoding (UMT-L ViT + merge to 64 tokens + projector) of a preset, forward only, bf16:
hico_jax against the independent PyTorch reference of tests/torch_reference (bf16, sdpa) on the same sizes."""

from __future__ import annotations

import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from hico_jax import presets
from hico_jax.bench import timing
from hico_jax.models.hico import ClipEncoder, HiCoConfig
from hico_jax.ops.xla_options import vision_compiler_options


def model_config(case: dict) -> HiCoConfig:
  """The case's preset in bf16, no remat; cuDNN attention when case["on_gpu"]."""
  fields = presets.hico(case["preset"], dtype="bfloat16", remat_policy="none",
                        attention_impl="cudnn" if case["on_gpu"] else "xla")
  fields.vit.block_loop = case.get("vit_block_loop", "auto")
  return HiCoConfig.from_dict(dict(fields))


def run_jax(case: dict, time_calls=timing.time_calls) -> dict:
  """`time_calls`: the timer (tools/profile_gpu.py passes one that traces the calls instead)."""
  case = {**case, "on_gpu": jax.devices()[0].platform == "gpu"}
  config = model_config(case)
  size, clips = config.vit.image_size, case["frames"] // config.clip_frames
  encoder = ClipEncoder(config)
  video = jax.random.normal(jax.random.key(1), (clips, config.clip_frames, size, size, 3), jnp.float32)
  params = nn.unbox(jax.jit(encoder.init)(jax.random.key(0), None, video[:1]))["params"]
  options = vision_compiler_options() if case.get("vision_options", True) else {}
  encode = jax.jit(lambda p, v: encoder.apply({"params": p}, None, v)[1], compiler_options=options)

  def run():
    return jax.block_until_ready(encode(params, video))

  compile_start = time.perf_counter()
  tokens = run()
  compile_s = time.perf_counter() - compile_start
  times = time_calls(run, case["warmup"], case["iters"])
  stats = jax.devices()[0].memory_stats() or {}
  return {"out_shape": list(tokens.shape), "times": times, "compile_s": compile_s,
          "peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30, "device": jax.devices()[0].device_kind}


def run_torch(case: dict) -> dict:
  # torch only in the torch case's subprocess. The reference's own encoder lives with the tests, outside the
  # installed package: this comparison runs from the repo root with PYTHONPATH=. (the only case that needs it).
  import torch  # pylint: disable=import-outside-toplevel
  # pylint: disable-next=import-outside-toplevel
  from tests.torch_reference.videochat_flash import ClipEncoder as TorchClipEncoder

  device = "cuda" if torch.cuda.is_available() else "cpu"
  config = model_config({**case, "on_gpu": device == "cuda"})
  vit = config.vit
  with torch.device(device):
    model = TorchClipEncoder(vit.image_size, vit.width, vit.depth, vit.num_heads, vit.mlp_dim,
                             config.llm.hidden_size, vit.patch_size, vit.clip_frames,
                             attention="sdpa").to(torch.bfloat16).eval()
    frames = torch.randn(1, case["frames"], 3, vit.image_size, vit.image_size, dtype=torch.bfloat16)

  def run():
    with torch.no_grad():
      out = model(frames)
    if device == "cuda":
      torch.cuda.synchronize()
    return out

  compile_start = time.perf_counter()
  tokens = run()
  compile_s = time.perf_counter() - compile_start
  times = timing.time_calls(run, case["warmup"], case["iters"])
  peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
  kind = torch.cuda.get_device_name() if device == "cuda" else "cpu"
  return {"out_shape": list(tokens.shape), "times": times, "compile_s": compile_s, "peak_gib": peak,
          "device": kind}
