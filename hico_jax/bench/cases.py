"""A command line's sections as cases, and each case's function.

A case is a JSON-able dict (section, framework, preset, sizes, warm-up and timed iterations) that one
subprocess runs (isolated.py). Its function is named here and imported only when the case runs, so that a
subprocess loads one case's module: the torch cases never build a jax model, and the GPU cases never import the
data pipeline's packages (grain, ArrayRecord), which GPU images may lack.
"""

from __future__ import annotations

import importlib
import os

# (section, framework) -> "module of hico_jax.bench:function".
RUNNERS = {
    ("llm", "jax"): "llm:run_jax", ("llm", "torch"): "llm:run_torch",
    ("clip", "jax"): "clip:run_jax", ("clip", "torch"): "clip:run_torch",
    ("train", "jax"): "train_step:run_jax",
    ("mixed", "jax"): "mixed:run_jax",
    ("ceilings", "jax"): "ceilings:run_jax", ("ceilings", "torch"): "ceilings:run_torch",
    ("data", "cpu"): "data_decode:run",
}


def run(case: dict) -> dict:
  """The case's result, run in this process."""
  module, function = RUNNERS[(case["section"], case["framework"])].split(":")
  return getattr(importlib.import_module(f"hico_jax.bench.{module}"), function)(case)


def expand(args) -> list[dict]:
  """Every case tools/benchmark.py's command line (its argparse namespace) asks for, in the order they run."""
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
