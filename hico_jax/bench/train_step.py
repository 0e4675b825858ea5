"""`train` cases: the trainer's own train step (hico_jax/train/train_state.py: ViT + merge + projector + LLM,
AdamW, fp32 master weights, bf16 compute) on one row of F frames (16·F visual tokens) plus a text, on one
device. mixed.py times the same step on other rows."""

from __future__ import annotations

import time

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from hico_jax import presets, sharding
from hico_jax.bench import timing
from hico_jax.models import vit
from hico_jax.models.hico import HiCoConfig
from hico_jax.ops import xla_options
from hico_jax.tokens import IGNORE_INDEX, VIDEO_TOKEN_ID
from hico_jax.train import train_state


def model_config(case: dict) -> HiCoConfig:
  """The HiCo preset of a train case with its remat, kernels and chunks (cuDNN attention on GPUs)."""
  on_gpu = jax.devices()[0].platform == "gpu"
  fields = presets.hico(case["preset"], dtype="bfloat16", remat_policy=case["remat"],
                        attention_impl="cudnn" if on_gpu else "xla")
  fields.vit.remat_policy = case.get("vit_remat", case["remat"])
  fields.vit.norm_impl = case.get("vit_norm", "xla")
  fields.vit.block_loop = vit.training_block_loop(case.get("vit_block_loop", "auto"), jax.default_backend())
  fields.loss_chunk = case.get("loss_chunk") or fields.loss_chunk
  fields.encode_chunk = case.get("encode_chunk") or fields.encode_chunk
  if case.get("image_size"):
    fields.vit.image_size = case["image_size"]
  return HiCoConfig.from_dict(dict(fields))


def time_train_step(case: dict, config: HiCoConfig, batch: dict, option_frames: int,
                    time_calls=timing.time_calls) -> dict:
  """AdamW train steps of HiCo(config) on `batch` (the stage recipe's ViT rate scale): the first (compile)
  and case["iters"] timed ones; XLA options sized for `option_frames` frames unless case["options"] is off."""
  optim_config = ml_collections.ConfigDict(dict(
      lr=1e-5, total_steps=1000, warmup_ratio=0.03, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, grad_clip=1.0,
      schedule=(("visual/vision_tower/.*", 0.2), (".*", 1.0))))
  options = xla_options.train_compiler_options(config, option_frames) if case.get("options", True) else {}
  mesh = sharding.make_mesh((("fsdp", -1),), jax.devices()[:1])      # one device
  built = train_state.build_train_step(config, optim_config, mesh, compiler_options=options)   # the trainer's step
  state = built.state
  batch = jax.device_put(batch, sharding.replicated(mesh))

  def run():
    nonlocal state
    state, metrics = built.train_step(state, batch)
    return jax.block_until_ready(metrics["loss"])

  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    compile_start = time.perf_counter()
    loss = float(run())
    compile_s = time.perf_counter() - compile_start
    times = time_calls(run, case["warmup"], case["iters"])
  stats = jax.devices()[0].memory_stats() or {}
  return {"loss": loss, "supervised": int((batch["targets"] >= 0).sum()), "times": times, "compile_s": compile_s,
          "peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30, "device": jax.devices()[0].device_kind}


def video_row(config: HiCoConfig, frames: int, text_tokens: int, rng: np.random.Generator) -> dict:
  """One row, one sample: 8 text tokens, the 16·frames visual tokens of a random uint8 video, then the rest of
  the text; each text position has the next token as its target, the visual ones none."""
  visual = config.visual_tokens(frames)
  length = visual + text_tokens
  ids = rng.integers(0, config.llm.vocab_size, (1, length)).astype(np.int32)
  ids[0, 8:8 + visual] = VIDEO_TOKEN_ID
  return {"input_ids": ids, "targets": np.where(ids < 0, IGNORE_INDEX, np.roll(ids, -1)).astype(np.int32),
          "segment_ids": np.ones((1, length), np.int32),
          "positions": np.arange(length, dtype=np.int32)[None],
          "frames": rng.integers(0, 255, (1, frames, config.vit.image_size, config.vit.image_size, 3), np.uint8)}


def run_jax(case: dict, time_calls=timing.time_calls) -> dict:
  """A full HiCo train step (ViT + merge + projector + LLM, AdamW) on one row of `frames` frames and
  `text_tokens` text tokens. `time_calls`: the timer (tools/profile_gpu.py passes one that traces instead)."""
  config = model_config(case)
  batch = video_row(config, case["frames"], case["text_tokens"], np.random.default_rng(0))
  return {**time_train_step(case, config, batch, case["frames"], time_calls),
          "tokens": int(batch["input_ids"].shape[1]), "encode_chunk": config.encode_chunk,
          "loss_chunk": config.loss_chunk}
