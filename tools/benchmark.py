#!/usr/bin/env python
"""Benchmarks on one accelerator, each case beside the peer it is compared with, in the same run.

  python tools/benchmark.py llm --presets qwen2_5_1_5b qwen2_7b --seq_lens 4096 16384
  python tools/benchmark.py clip --presets hico_7b hico_7b_448 --frames 128 64
  python tools/benchmark.py train --presets hico_2b --frames 64 256 --remat dots_attn
  python tools/benchmark.py data      # CPU: decode + sample + resize frames/s per core
  python tools/benchmark.py ceilings  # the device's bf16 matmul rate (jax, torch) and copy bandwidth

`llm`: forward + backward (no optimizer) of the Qwen2 decoder, random init, bf16 compute, remat; tokens/s and
MFU (FLOPs from hico_jax/flops.py, against the 989 TFLOP/s bf16 peak) for hico_jax and for transformers'
Qwen2ForCausalLM (bf16, sdpa, gradient checkpointing) on the same token ids. Every case runs in its own
subprocess so one framework's memory never crowds the other. Prints a markdown table; --out appends JSON lines.

`clip`: clip encoding (UMT-L ViT + merge to 64 tokens + projector) in frames/s, bf16, forward only, for
hico_jax and the independent PyTorch reference of tests/torch_reference (bf16, sdpa) on the same sizes.

`train`: a full train step of the composed model (ViT + merge + projector + LLM, AdamW, fp32 master weights,
bf16 compute) on one row of F frames (16·F visual tokens) plus a text.

`mixed`: the same train step on one packed row of V videos of F frames each, against that row plus I images of
K tiles each (one anyres image: base + grid; 64 tokens a tile), every sample with --text_tokens of text; samples/s
and MFU (image tiles counted as one-frame clips) for the video-only row and the mixed one.

  python tools/benchmark.py mixed --presets hico_2b --frames 64 --videos_per_row 2 --images_per_row 4 \
      --tiles_per_image 5

`ceilings`: what this device gives before any model: a bf16 8192^3 matmul on random data through jax (XLA)
and through torch (cuBLAS), and a device-to-device copy of 4 GiB (bytes read plus written). MFU is quoted
against the nominal 989 TFLOP/s on every Hopper; these say how far that nominal is from this card.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

from hico_jax import flops
from hico_jax.tokens import IGNORE_INDEX, VIDEO_TOKEN_ID


def _token_ids(vocab: int, seq_len: int, seed: int = 0):
  import numpy as np
  return np.random.default_rng(seed).integers(0, vocab, (1, seq_len)).astype(np.int32)


def _time(fn, warmup: int, iters: int) -> list[float]:
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


def run_jax_llm(case: dict) -> dict:
  import jax
  import jax.numpy as jnp
  import flax.linen as nn
  from hico_jax import presets
  from hico_jax.models.qwen2 import Qwen2Config, Qwen2ForCausalLM
  from hico_jax.ops.loss import linear_cross_entropy

  on_gpu = jax.devices()[0].platform == "gpu"
  config = Qwen2Config.from_dict(dict(presets.llm(
      case["preset"], dtype="bfloat16", param_dtype=case["param_dtype"], remat_policy=case["remat"],
      attention_impl="cudnn" if on_gpu else "xla")))
  model = Qwen2ForCausalLM(config)
  ids = jnp.asarray(_token_ids(config.vocab_size, case["seq_len"]))
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), ids[:, :8])["params"])

  def loss_fn(p, ids):
    _, aux = model.apply({"params": p}, ids, return_logits=False)
    labels = jnp.roll(ids, -1, axis=1)
    weights = jnp.ones_like(ids).at[:, -1].set(0)
    kernel = model.apply({"params": p}, method=Qwen2ForCausalLM.head_kernel)
    total, count = linear_cross_entropy(aux["hidden"], kernel, labels, weights, case["loss_chunk"])
    return total / count

  step = jax.jit(jax.value_and_grad(loss_fn))

  def run():
    loss, grads = step(params, ids)
    jax.block_until_ready((loss, grads))
    return loss

  compile_start = time.perf_counter()
  loss = float(run())
  compile_s = time.perf_counter() - compile_start
  times = _time(run, case["warmup"], case["iters"])
  stats = jax.devices()[0].memory_stats() or {}
  return {"loss": loss, "times": times, "compile_s": compile_s,
          "peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30, "device": jax.devices()[0].device_kind}


def run_torch_llm(case: dict) -> dict:
  import torch
  import transformers
  from hico_jax import presets

  p = presets.llm(case["preset"])
  hf_config = transformers.Qwen2Config(
      vocab_size=p.vocab_size, hidden_size=p.hidden_size, intermediate_size=p.intermediate_size,
      num_hidden_layers=p.num_layers, num_attention_heads=p.num_heads, num_key_value_heads=p.num_kv_heads,
      rope_theta=p.rope_theta, rms_norm_eps=p.rms_norm_eps, tie_word_embeddings=p.tie_word_embeddings,
      max_position_embeddings=max(p.max_position_embeddings, case["seq_len"]), use_cache=False)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  with torch.device(device):
    model = transformers.Qwen2ForCausalLM._from_config(hf_config, attn_implementation="sdpa",
                                                       dtype=torch.bfloat16)
  model.gradient_checkpointing_enable()
  model.train()
  ids = torch.tensor(_token_ids(p.vocab_size, case["seq_len"]), dtype=torch.long, device=device)

  def run():
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    if device == "cuda":
      torch.cuda.synchronize()
    return loss

  compile_start = time.perf_counter()
  loss = float(run())
  compile_s = time.perf_counter() - compile_start
  times = _time(run, case["warmup"], case["iters"])
  peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
  kind = torch.cuda.get_device_name() if device == "cuda" else "cpu"
  return {"loss": loss, "times": times, "compile_s": compile_s, "peak_gib": peak, "device": kind}


def _clip_configs(case: dict):
  from hico_jax import presets
  from hico_jax.models.hico import HiCoConfig
  fields = presets.hico(case["preset"], dtype="bfloat16", remat_policy="none",
                        attention_impl="cudnn" if case["on_gpu"] else "xla")
  fields.vit.block_loop = case.get("vit_block_loop", "auto")
  return HiCoConfig.from_dict(dict(fields))


def run_jax_clip(case: dict) -> dict:
  import jax
  import jax.numpy as jnp
  import flax.linen as nn
  from hico_jax.models.hico import ClipEncoder
  from hico_jax.ops.xla_options import vision_compiler_options

  case = {**case, "on_gpu": jax.devices()[0].platform == "gpu"}
  config = _clip_configs(case)
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
  times = _time(run, case["warmup"], case["iters"])
  stats = jax.devices()[0].memory_stats() or {}
  return {"out_shape": list(tokens.shape), "times": times, "compile_s": compile_s,
          "peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30, "device": jax.devices()[0].device_kind}


def run_torch_clip(case: dict) -> dict:
  import torch
  # The reference's own encoder lives with the tests, outside the installed package: this comparison runs from
  # the repo root with PYTHONPATH=. (the only part of tools/ that needs it).
  from tests.torch_reference.videochat_flash import ClipEncoder

  device = "cuda" if torch.cuda.is_available() else "cpu"
  config = _clip_configs({**case, "on_gpu": device == "cuda"})
  vit = config.vit
  with torch.device(device):
    model = ClipEncoder(vit.image_size, vit.width, vit.depth, vit.num_heads, vit.mlp_dim, config.llm.hidden_size,
                        vit.patch_size, vit.clip_frames, attention="sdpa").to(torch.bfloat16).eval()
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
  times = _time(run, case["warmup"], case["iters"])
  peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
  kind = torch.cuda.get_device_name() if device == "cuda" else "cpu"
  return {"out_shape": list(tokens.shape), "times": times, "compile_s": compile_s, "peak_gib": peak,
          "device": kind}


def _train_config(case: dict):
  """The HiCo preset of a train case with its remat, kernels and chunks (cuDNN attention on GPUs)."""
  import jax
  from hico_jax import presets
  from hico_jax.models import vit
  from hico_jax.models.hico import HiCoConfig

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


def _time_train_step(case: dict, config, batch: dict, option_frames: int) -> dict:
  """AdamW train steps of HiCo(config) on `batch` (the stage recipe's ViT rate scale): the first (compile)
  and case["iters"] timed ones; XLA options sized for `option_frames` frames unless case["options"] is off."""
  import jax
  import ml_collections
  import flax.linen as nn
  from hico_jax import sharding
  from hico_jax.ops import xla_options
  from hico_jax.train import train_state

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
    times = _time(run, case["warmup"], case["iters"])
  stats = jax.devices()[0].memory_stats() or {}
  return {"loss": loss, "supervised": int((batch["targets"] >= 0).sum()), "times": times, "compile_s": compile_s,
          "peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30, "device": jax.devices()[0].device_kind}


def run_jax_train(case: dict) -> dict:
  """A full HiCo train step (ViT + merge + projector + LLM, AdamW) on one row of `frames` frames and
  `text_tokens` text tokens."""
  import numpy as np

  config = _train_config(case)
  frames, visual = case["frames"], config.visual_tokens(case["frames"])
  length = visual + case["text_tokens"]
  rng = np.random.default_rng(0)
  ids = rng.integers(0, config.llm.vocab_size, (1, length)).astype(np.int32)
  ids[0, 8:8 + visual] = VIDEO_TOKEN_ID
  batch = {"input_ids": ids, "targets": np.where(ids < 0, IGNORE_INDEX, np.roll(ids, -1)).astype(np.int32),
           "segment_ids": np.ones((1, length), np.int32),
           "positions": np.arange(length, dtype=np.int32)[None],
           "frames": rng.integers(0, 255, (1, frames, config.vit.image_size, config.vit.image_size, 3), np.uint8)}
  return {**_time_train_step(case, config, batch, frames), "tokens": length, "encode_chunk": config.encode_chunk,
          "loss_chunk": config.loss_chunk}


def _packed_row(config, rng, videos: int, frames: int, images: int, tiles: int, text_tokens: int) -> dict:
  """One packed row: `videos` samples of `frames` frames, then `images` samples of `tiles` tiles, each sample
  8 text tokens, its visual tokens, then the rest of its text; the whole text supervised. Image tokens take
  their tiles in order (the anyres layout is a permutation: the same work)."""
  import numpy as np
  size, per_tile = config.vit.image_size, config.tokens_per_tile
  pieces, segments, video_rank, tile_tokens = [], [], 0, 0
  video_tokens = config.visual_tokens(frames) * videos
  for s in range(videos + images):
    is_video = s < videos
    visual = config.visual_tokens(frames) if is_video else tiles * per_tile
    ids = rng.integers(0, config.llm.vocab_size, 8 + visual + text_tokens - 8).astype(np.int32)
    ids[8:8 + visual] = VIDEO_TOKEN_ID
    index = np.zeros(len(ids), np.int32)
    if is_video:
      index[8:8 + visual] = video_rank + np.arange(visual)
      video_rank += visual
    else:
      index[8:8 + visual] = video_tokens + tile_tokens + np.arange(visual)
      tile_tokens += visual
    pieces.append((ids, index))
    segments.append(np.full(len(ids), s + 1, np.int32))
  ids = np.concatenate([p[0] for p in pieces])[None]
  seg = np.concatenate(segments)[None]
  targets = np.where(ids < 0, IGNORE_INDEX, np.roll(ids, -1)).astype(np.int32)
  targets[0, np.flatnonzero(np.diff(seg[0]) != 0)] = IGNORE_INDEX            # no target across samples
  batch = {"input_ids": ids, "targets": targets, "segment_ids": seg,
           "positions": np.concatenate([np.arange(len(p[0]), dtype=np.int32) for p in pieces])[None],
           "frames": rng.integers(0, 255, (1, max(videos * frames, 4), size, size, 3), np.uint8)}
  if images:
    batch["tiles"] = rng.integers(0, 255, (1, images * tiles, size, size, 3), np.uint8)
    batch["visual_index"] = np.concatenate([p[1] for p in pieces])[None]
  return batch


def run_jax_train_mixed(case: dict) -> dict:
  """A full HiCo train step on one packed row of videos, with or without image samples."""
  import numpy as np

  config = _train_config(case)
  batch = _packed_row(config, np.random.default_rng(0), case["videos"], case["frames"], case["images"],
                      case["tiles"], case["text_tokens"])
  frames = batch["frames"].shape[1]
  result = _time_train_step(case, config, batch, frames + case["images"] * case["tiles"] // 4)
  return {**result, "tokens": int(batch["input_ids"].shape[1]), "frames_in_row": frames,
          "image_size": config.vit.image_size}


def run_jax_ceilings(case: dict) -> dict:
  import jax
  import jax.numpy as jnp
  n, repeats = 8192, 10
  a, b = (jax.random.normal(key, (n, n), jnp.bfloat16) for key in jax.random.split(jax.random.key(0)))
  matmul = jax.jit(lambda a, b: a @ b)
  source = jax.random.normal(jax.random.key(1), (2**30,), jnp.float32)     # 4 GiB
  add_one = jax.jit(lambda x: x + 1.0)   # one read and one write per element, as a copy
  def timed(fn, *args):
    def run():   # `repeats` launches per timed call, so the wait for the result is not in the kernel's time
      for _ in range(repeats):
        result = fn(*args)   # the device runs them in order: waiting for the last waits for all
      jax.block_until_ready(result)
    return [t / repeats for t in _time(run, case["warmup"], case["iters"])]
  matmul_times, copy_times = timed(matmul, a, b), timed(add_one, source)
  return {"matmul_tflops": 2 * n**3 / statistics.median(matmul_times) / 1e12,
          "copy_tb_s": 2 * source.nbytes / statistics.median(copy_times) / 1e12,
          "times": matmul_times, "copy_times": copy_times, "device": jax.devices()[0].device_kind}


def run_torch_ceilings(case: dict) -> dict:
  import torch
  n, repeats = 8192, 10
  a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
  source = torch.randn(2**30, device="cuda", dtype=torch.float32)
  target = torch.empty_like(source)

  def timed(fn):
    def run():
      for _ in range(repeats):
        fn()
      torch.cuda.synchronize()
    return [t / repeats for t in _time(run, case["warmup"], case["iters"])]
  matmul_times, copy_times = timed(lambda: a @ b), timed(lambda: target.copy_(source))
  return {"matmul_tflops": 2 * n**3 / statistics.median(matmul_times) / 1e12,
          "copy_tb_s": 2 * source.nbytes / statistics.median(copy_times) / 1e12,
          "times": matmul_times, "copy_times": copy_times, "device": torch.cuda.get_device_name()}


def run_data(case: dict) -> dict:
  """Decode + sample (dynamic ~1 fps, 64-256 frames) + resize, one process on one core, from a shard of
  synthetic mp4s (their TFDS build): the work a data worker does per sample."""
  from hico_jax.data import synthetic, tfds_longvid, video
  root = case["workdir"]
  dataset = synthetic.make_dataset(os.path.join(root, "videos"), num_videos=case["videos"], seed=0,
                                   size=case["source_px"], fps_range=(24, 30), duration_range=(90.0, 150.0))
  out = os.path.join(root, "tfds")
  if not tfds_longvid.is_prepared(out) or not dataset.reused:
    shutil.rmtree(out, ignore_errors=True)
    tfds_longvid.build(str(dataset), out, log=lambda _: None)
  source = tfds_longvid.LongVidSource(out)
  media = [source[i][1][0] for i in range(len(source))]
  video.resize_frames(video.decode_frames(media[0], max_frames=8)[0], 224)   # warm-up: codec and Pillow set-up
  results = {}
  for size in case["sizes"]:
    frames_done, start = 0, time.perf_counter()
    for data in media:
      raw, _ = video.decode_frames(data, mode="dynamic_fps1", min_frames=64, max_frames=256)
      frames_done += len(video.resize_frames(raw, size))
    elapsed = time.perf_counter() - start
    results[str(size)] = {"frames": frames_done, "seconds": elapsed, "frames_per_s": frames_done / elapsed}
  mb = sum(len(m) for m in media) / len(media) / 2**20
  return {"per_size": results, "videos": len(media), "mean_video_mib": mb, "times": [0.0], "device": "cpu"}


RUNNERS = {("llm", "jax"): run_jax_llm, ("data", "cpu"): run_data, ("llm", "torch"): run_torch_llm, ("train", "jax"): run_jax_train,
           ("clip", "jax"): run_jax_clip, ("clip", "torch"): run_torch_clip,
           ("ceilings", "jax"): run_jax_ceilings, ("ceilings", "torch"): run_torch_ceilings,
           ("mixed", "jax"): run_jax_train_mixed}


def _run_case_in_subprocess(case: dict, timeout: int, script: str = __file__) -> dict:
  """Runs `script --case JSON` (this file, or another benchmark script built the same way) and reads back
  its RESULT line; a crash comes back as an error, "out of memory" when it was one."""
  command = [sys.executable, os.path.abspath(script), "--case", json.dumps(case)]
  try:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return {**case, "error": f"timed out after {timeout} s"}
  for line in reversed(done.stdout.splitlines()):
    if line.startswith("RESULT "):
      return {**case, **json.loads(line[len("RESULT "):])}
  tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
  oom = any("out of memory" in l.lower() or "resource_exhausted" in l.lower() for l in tail)
  return {**case, "error": "out of memory" if oom else " | ".join(tail)[-400:]}


def _summarise(result: dict) -> dict:
  if "error" in result:
    return result
  median = statistics.median(result["times"])
  from hico_jax import presets
  if result["section"] == "ceilings":
    return {**result, "median_s": median}
  if result["section"] == "train":
    from hico_jax.models.hico import HiCoConfig
    config = HiCoConfig.from_dict(dict(presets.hico(result["preset"])))
    train_flops = flops.hico_train_flops(config, result["tokens"], result["frames"], result.get("supervised"))
    return {**result, "median_s": median, "tokens_per_s": result["tokens"] / median,
            "tflops_per_s": train_flops / median / 1e12, "mfu": flops.mfu(train_flops, median)}
  if result["section"] == "mixed":
    from hico_jax.models.hico import HiCoConfig
    fields = presets.hico(result["preset"])
    fields.vit.image_size = result["image_size"]
    config = HiCoConfig.from_dict(dict(fields))
    tiles = result["images"] * result["tiles"]
    train_flops = flops.hico_train_flops(config, result["tokens"], result["videos"] * result["frames"],
                                         result.get("supervised"), tiles=tiles)
    samples = result["videos"] + result["images"]
    return {**result, "median_s": median, "samples_per_s": samples / median,
            "tflops_per_s": train_flops / median / 1e12, "mfu": flops.mfu(train_flops, median)}
  if result["section"] == "clip":
    from hico_jax.models.hico import HiCoConfig
    config = HiCoConfig.from_dict(dict(presets.hico(result["preset"])))
    clip_flops = flops.umt_clip_forward_flops(config.vit, config.llm.hidden_size) * result["frames"] / 4
    return {**result, "median_s": median, "frames_per_s": result["frames"] / median,
            "tflops_per_s": clip_flops / median / 1e12, "mfu": flops.mfu(clip_flops, median)}
  from hico_jax.models.qwen2 import Qwen2Config
  config = Qwen2Config.from_dict(dict(presets.llm(result["preset"])))
  train_flops = flops.qwen2_train_flops(config, result["seq_len"])
  return {**result, "median_s": median, "tokens_per_s": result["seq_len"] / median,
          "tflops_per_s": train_flops / median / 1e12, "mfu": flops.mfu(train_flops, median)}


def _clip_table(results: list[dict]) -> str:
  rows = ["| preset | px | frames | framework | step s | frames/s | TFLOP/s | MFU | peak GiB | vs torch |",
          "|---|---|---|---|---|---|---|---|---|---|"]
  torch_fps = {(r["preset"], r["frames"]): r.get("frames_per_s") for r in results if r["framework"] == "torch"}
  from hico_jax import presets
  for r in results:
    size = presets.HICO_PRESETS[r["preset"]][1]
    loop = f" (ViT {r['vit_block_loop']})" if r.get("vit_block_loop", "auto") != "auto" else ""
    label = f"| {r['preset']} | {size} | {r['frames']} | {r['framework']}{loop} | "
    if "error" in r:
      rows.append(label + f"{r['error']} | | | | | |")
      continue
    ref = torch_fps.get((r["preset"], r["frames"]))
    ratio = f"{r['frames_per_s'] / ref:.2f}x" if ref and r["framework"] == "jax" else ""
    rows.append(label + f"{r['median_s']:.3f} | {r['frames_per_s']:,.0f} | {r['tflops_per_s']:.0f} | "
                f"{100 * r['mfu']:.1f}% | {r['peak_gib']:.1f} | {ratio} |")
  return "\n".join(rows)


def _train_table(results: list[dict]) -> str:
  rows = ["| preset | frames | tokens | remat | step s | tokens/s | TFLOP/s | MFU | peak GiB |", "|---|---|---|---|---|---|---|---|---|"]
  for r in results:
    label = (f"| {r['preset']} | {r['frames']} | {r.get('tokens', '')} | vit {r.get('vit_remat')}, llm {r['remat']}"
             f"{', Pallas LayerNorm' if r.get('vit_norm') == 'pallas' else ''}"
             f"{', ViT ' + r['vit_block_loop'] if r.get('vit_block_loop', 'auto') != 'auto' else ''}"
             f"{'' if r.get('options', True) else ', default XLA'} | ")
    if "error" in r:
      rows.append(label + f"{r['error']} | | | | |")
      continue
    rows.append(label + f"{r['median_s']:.3f} | {r['tokens_per_s']:,.0f} | {r['tflops_per_s']:.0f} | "
                f"{100 * r['mfu']:.1f}% | {r['peak_gib']:.1f} |")
  return "\n".join(rows)


def _mixed_table(results: list[dict]) -> str:
  rows = ["| preset | row | tokens | step s | samples/s | TFLOP/s | MFU | peak GiB |",
          "|---|---|---|---|---|---|---|---|"]
  for r in results:
    images = f" + {r['images']} images x {r['tiles']} tiles" if r["images"] else ""
    label = f"| {r['preset']} | {r['videos']} x {r['frames']}-frame videos{images} | "
    if "error" in r:
      rows.append(label + f"| {r['error']} | | | | |")
      continue
    rows.append(label + f"{r['tokens']} | {r['median_s']:.3f} | {r['samples_per_s']:.2f} | {r['tflops_per_s']:.0f} | "
                f"{100 * r['mfu']:.1f}% | {r['peak_gib']:.1f} |")
  return "\n".join(rows)


def _ceilings_table(results: list[dict]) -> str:
  rows = ["| framework | device | bf16 8192^3 matmul TFLOP/s | of 989 | copy TB/s |", "|---|---|---|---|---|"]
  for r in results:
    if "error" in r:
      rows.append(f"| {r['framework']} | {r['error']} | | | |")
      continue
    rows.append(f"| {r['framework']} | {r['device']} | {r['matmul_tflops']:.0f} | "
                f"{100 * r['matmul_tflops'] / 989:.0f}% | {r['copy_tb_s']:.2f} |")
  return "\n".join(rows)


def _table(results: list[dict]) -> str:
  if results and results[0]["section"] == "ceilings":
    return _ceilings_table(results)
  if results and results[0]["section"] == "train":
    return _train_table(results)
  if results and results[0]["section"] == "mixed":
    return _mixed_table(results)
  if results and results[0]["section"] == "clip":
    return _clip_table(results)
  rows = ["| preset | tokens | framework | remat | params | step s | tokens/s | TFLOP/s | MFU | peak GiB | vs torch |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
  torch_tps = {(r["preset"], r["seq_len"]): r.get("tokens_per_s") for r in results if r["framework"] == "torch"}
  for r in results:
    label = (r["preset"], r["seq_len"], r["framework"], r.get("remat", "layer ckpt"), r.get("param_dtype", "bf16"))
    if "error" in r:
      rows.append("| %s | %d | %s | %s | %s | " % label + f"{r['error']} | | | | | |")
      continue
    ref = torch_tps.get((r["preset"], r["seq_len"]))
    ratio = f"{r['tokens_per_s'] / ref:.2f}x" if ref and r["framework"] == "jax" else ""
    rows.append("| %s | %d | %s | %s | %s | " % label + f"{r['median_s']:.3f} | {r['tokens_per_s']:,.0f} | "
                f"{r['tflops_per_s']:.0f} | {100 * r['mfu']:.1f}% | {r['peak_gib']:.1f} | {ratio} |")
  return "\n".join(rows)


def _cases(args) -> list[dict]:
  """Every case the command line asks for, each run in its own subprocess."""
  timing = {"warmup": args.warmup, "iters": args.iters}
  if args.section == "ceilings":
    return [{"section": "ceilings", "framework": framework, **timing} for framework in args.frameworks]
  if args.section == "train":
    return [{"section": "train", "framework": "jax", "preset": preset, "frames": frames, "remat": remat,
             "vit_remat": vit_remat, "vit_norm": args.vit_norm, "options": not args.no_options,
             "text_tokens": args.text_tokens, "loss_chunk": args.loss_chunk, "encode_chunk": args.encode_chunk,
             "vit_block_loop": loop, **timing}
            for preset in args.presets for frames in args.frames for remat in args.remat
            for vit_remat in args.vit_remat for loop in args.vit_block_loop]
  if args.section == "mixed":
    return [{"section": "mixed", "framework": "jax", "preset": preset, "frames": frames, "remat": remat,
             "vit_remat": vit_remat, "videos": args.videos_per_row, "images": images, "tiles": args.tiles_per_image,
             "text_tokens": args.text_tokens, "image_size": args.image_size, **timing}
            for preset in args.presets for frames in args.frames for remat in args.remat
            for vit_remat in args.vit_remat for images in (0, args.images_per_row)]
  if args.section == "clip":
    return [{"section": "clip", "framework": framework, "preset": preset, "frames": frames, **timing,
             **({"vit_block_loop": loop} if framework == "jax" else {})}
            for preset, frames in zip(args.presets, args.frames) for framework in args.frameworks
            for loop in (args.vit_block_loop if framework == "jax" else ["auto"])]
  cases = []
  for preset in args.presets:
    for seq_len in args.seq_lens:
      for framework in args.frameworks:
        for remat in (args.remat if framework == "jax" else [None]):
          case = {"section": "llm", "framework": framework, "preset": preset, "seq_len": seq_len,
                  "loss_chunk": args.loss_chunk or 4096, **timing}
          if framework == "jax":
            case.update(remat=remat, xla_flags=os.environ.get("XLA_FLAGS", ""),
                        param_dtype=args.param_dtype_7b if "7b" in preset else args.param_dtype)
          cases.append(case)
  return cases


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("section", nargs="?", default="llm", choices=["llm", "clip", "train", "mixed", "data",
                                                                              "ceilings"])
  parser.add_argument("--data_dir", default="/tmp/hico_data_bench", help="data section: where the videos go")
  parser.add_argument("--videos", type=int, default=12, help="data section: synthetic videos")
  parser.add_argument("--source_px", type=int, default=448, help="data section: synthetic video size")
  parser.add_argument("--frames_per_gpu_s", type=float, default=168.0,
                      help="data section: frames/s one GPU trains on (hico_2b @256 frames: 256 / step s)")
  parser.add_argument("--text_tokens", type=int, default=512, help="train section: text tokens per row; mixed: "
                      "per sample")
  parser.add_argument("--videos_per_row", type=int, default=2, help="mixed section: videos in the packed row")
  parser.add_argument("--images_per_row", type=int, default=4, help="mixed section: images added to the row")
  parser.add_argument("--tiles_per_image", type=int, default=5, help="mixed section: tiles an image takes "
                      "(5: base + a 2x2 grid)")
  parser.add_argument("--image_size", type=int, default=None, help="mixed section: vision tower size instead "
                      "of the preset's (a CPU smoke test)")
  parser.add_argument("--vit_remat", nargs="+", default=["full"],
                      help="train section: the vision tower's remat policies to measure")
  parser.add_argument("--vit_norm", default="xla", choices=["xla", "pallas"],
                      help="train section: the vision tower's LayerNorm kernels (ops/layer_norm.py)")
  parser.add_argument("--no_options", action="store_true", help="train section: default XLA options only")
  parser.add_argument("--vit_block_loop", nargs="+", default=["auto"], choices=["auto", "scan", "unrolled"],
                      help="train and clip sections: the vision blocks as a loop or unrolled (auto: what training "
                           "uses, unrolled on GPUs; a loop for the clip encoder)")
  parser.add_argument("--presets", nargs="+", default=["qwen2_5_1_5b", "qwen2_7b"])
  parser.add_argument("--seq_lens", nargs="+", type=int, default=[4096, 16384])
  parser.add_argument("--frames", nargs="+", type=int, default=[128, 64],
                      help="clip section: frames per step, one per preset")
  parser.add_argument("--frameworks", nargs="+", default=["jax", "torch"], choices=["jax", "torch"])
  parser.add_argument("--remat", nargs="+", default=["dots_attn"], help="hico_jax remat policies to measure")
  parser.add_argument("--param_dtype", default="float32", help="hico_jax master-weight dtype")
  parser.add_argument("--param_dtype_7b", default="bfloat16",
                      help="for 7B presets: fp32 weights plus fp32 grads (61 GB) leave no room on an 80 GB GPU")
  parser.add_argument("--loss_chunk", type=int, default=None,
                      help="positions per loss chunk (llm section: 4096; train section: the preset's)")
  parser.add_argument("--encode_chunk", type=int, default=None, help="train section: clips per vision-tower step "
                      "(default: the preset's)")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--iters", type=int, default=5)
  parser.add_argument("--timeout", type=int, default=900, help="seconds per case")
  parser.add_argument("--out", default=None, help="append JSON lines here")
  parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: run one case, print RESULT
  args = parser.parse_args()

  if args.case:
    case = json.loads(args.case)
    result = RUNNERS[(case["section"], case["framework"])](case)
    print("RESULT " + json.dumps(result), flush=True)
    return

  if args.section == "data":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    case = {"section": "data", "framework": "cpu", "workdir": args.data_dir, "videos": args.videos,
            "source_px": args.source_px, "sizes": [224, 448]}
    result = RUNNERS[("data", "cpu")](case)
    print(json.dumps(result, indent=2))
    needed = args.frames_per_gpu_s
    for size, r in result["per_size"].items():
      print(f"| {size} | {r['frames_per_s']:.0f} | {needed / r['frames_per_s']:.1f} |")
    return
  results = []
  for case in _cases(args):
    result = _summarise(_run_case_in_subprocess(case, args.timeout))
    results.append(result)
    print(json.dumps({k: v for k, v in result.items() if k != "times"}), flush=True)
    if args.out:
      with open(args.out, "a") as f:
        f.write(json.dumps(result) + "\n")
  print(_table(results))


if __name__ == "__main__":
  main()
