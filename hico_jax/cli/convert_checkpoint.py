"""Converts checkpoints: Hugging Face layouts <-> training run directories (orbax), released parts -> a run.

  python tools/convert_checkpoint.py hf-to-orbax path/to/VideoChat-Flash-Qwen2_5-2B_res448 runs/imported
  python tools/convert_checkpoint.py orbax-to-hf runs/tiny/stage2 out/hf --dtype bfloat16 [--step 700]
  python tools/convert_checkpoint.py parts-to-orbax --vision UMT-L_f4_vision.pt \\
      --llm Qwen2.5-1.5B-Instruct runs/2b/init --image_size 448

parts-to-orbax reads the UMT-L encoder checkpoint (torch.load with weights_only=True: no pickled code runs)
as the official build_vit loads it (encoder.norm -> vision_layernorm, 23 of its 24 blocks) and a plain Qwen2
directory, adds a projector drawn as the reference's fresh one (torch's nn.Linear default), and writes a run
directory for the stage-1 config's --config.init.path.

hf-to-orbax reads the official VideoChat-Flash layout or a plain Qwen2 directory (config.json + safetensors)
and writes a run directory as the trainer writes one (checkpoints/0/{state,config}, float32 params): give it
to a training run as --config.init.path (init.kind "run"; a plain Qwen2 one initialises the LLM alone), or
to hico_jax.from_pretrained. It holds no optimizer state, so it is a starting point, not a --workdir to resume.
orbax-to-hf writes a run's latest step (or --step N) as the official VideoChat-Flash layout (a HiCo model) or
the plain Qwen2 layout (a decoder alone), as the trainer's own export does; transformers loads the Qwen2 part.
The output is written beside OUT under a temporary name and renamed when complete; an existing, non-empty OUT
is refused unless --overwrite.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import numpy as np

from hico_jax.convert import qwen2_hf, released_parts, run_dir, videochat_flash

LAYOUT_NAMES = {"videochat_flash": "the VideoChat-Flash layout", "qwen2": "the plain Qwen2 layout"}


def hf_to_orbax(src: str, out: str) -> str:
  kind = run_dir.layout(src)
  if kind == "run":
    raise ValueError(f"{src!r} is already a training run directory (it has {run_dir.CHECKPOINTS}/); "
                     "hf-to-orbax reads a Hugging Face directory")
  # float32: the trainer's master weights. Every HF dtype (bfloat16, float16, float32) widens exactly, so
  # orbax-to-hf --dtype of the file's own dtype (bfloat16 or float32) reproduces the file bit for bit.
  if kind == "videochat_flash":
    config, params, file_dtype = videochat_flash.load(src, params_dtype=np.float32)
  else:
    config, llm, file_dtype = qwen2_hf.load(src, params_dtype=np.float32)
    params = {"llm": llm}
  token_ids = qwen2_hf.read_token_ids(src)
  saved = {"model": run_dir.config_to_dict(config), run_dir.TOKEN_IDS_FIELD: token_ids,
           "converted_from": {"path": os.path.abspath(src), "layout": kind, "dtype": file_dtype}}

  _write_atomically(out, lambda tmp: _save_run(tmp, params, saved))
  return f"{LAYOUT_NAMES[kind]} ({file_dtype}) -> run directory {out} (step 0, float32)"


def parts_to_orbax(vision: str, llm: str, out: str, image_size: int, seed: int) -> str:
  config, params, token_ids = released_parts.load(vision, llm, image_size=image_size, seed=seed)
  saved = {"model": run_dir.config_to_dict(config), run_dir.TOKEN_IDS_FIELD: token_ids,
           "converted_from": {"vision": os.path.abspath(vision), "llm": os.path.abspath(llm),
                              "layout": "released parts", "projector_seed": seed}}
  _write_atomically(out, lambda tmp: _save_run(tmp, params, saved))
  return (f"UMT-L@{image_size} + {config.llm.num_layers}-layer Qwen2 + fresh projector -> run directory {out} "
          "(step 0, float32)")


def _save_run(directory, params, saved):
  from hico_jax.train import init_weights   # the trainer's own writer (it needs grain: here only)
  init_weights.save_run(directory, params, saved)


def orbax_to_hf(src: str, out: str, step: int | None, dtype: str) -> str:
  kind = run_dir.layout(src)
  if kind != "run":
    raise ValueError(f"{src!r} is a Hugging Face directory ({LAYOUT_NAMES[kind]}), not a training run "
                     f"directory (no {run_dir.CHECKPOINTS}/); orbax-to-hf reads a run")
  run = run_dir.read(src, step)
  token_ids = run.token_ids

  def write(tmp):
    run_dir.save_hf(tmp, run.config, run.params, dtype=dtype, extra_fields=token_ids or None,
                    tokenizer_dir=run_dir.tokenizer_source(src, run.saved_config))
    if token_ids:
      with open(os.path.join(tmp, "generation_config.json"), "w") as f:
        json.dump(token_ids, f, indent=2)

  _write_atomically(out, write)
  layout = "videochat_flash" if "visual" in run.params else "qwen2"
  return f"run directory {src} step {run.step} -> {LAYOUT_NAMES[layout]} ({dtype}) in {out}"


def check_output(out: str, overwrite: bool, src: str):
  """Refuses, before any work, an output that would clobber something."""
  out_path, src_path = os.path.abspath(out), os.path.abspath(src)
  if out_path == src_path:
    raise ValueError(f"output {out!r} is the input directory")
  if os.path.commonpath([out_path, src_path]) in (out_path, src_path):
    # --overwrite replaces the whole output directory: one inside the other would lose the input.
    raise ValueError(f"output {out!r} and input {src!r} lie one inside the other")
  if os.path.exists(out) and not os.path.isdir(out):
    raise ValueError(f"output {out!r} exists and is not a directory")
  if os.path.isdir(out) and os.listdir(out) and not overwrite:
    raise ValueError(f"output directory {out!r} exists and is not empty (pass --overwrite to replace it)")


def _write_atomically(out: str, write):
  """write(tmp) into a sibling of `out`, renamed to `out` once complete: an interrupted conversion leaves a
  `.NAME.partial-PID` directory, never an `out` that looks finished."""
  out = os.path.abspath(out)
  parent, name = os.path.split(out)
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f".{name}.partial-{os.getpid()}")
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    write(tmp)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if os.path.isdir(out):
    old = os.path.join(parent, f".{name}.old-{os.getpid()}")
    os.rename(out, old)          # --overwrite (checked before), or an empty directory
    os.rename(tmp, out)
    shutil.rmtree(old)
  else:
    os.rename(tmp, out)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="convert_checkpoint.py", description=__doc__.split("\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="\n".join(__doc__.split("\n")[1:]))
  commands = parser.add_subparsers(dest="command", required=True, metavar="{hf-to-orbax,orbax-to-hf,parts-to-orbax}")
  to_orbax = commands.add_parser("hf-to-orbax", help="an HF directory -> a run directory (orbax)")
  to_orbax.add_argument("src", help="HF directory: VideoChat-Flash layout or plain Qwen2 (config.json + safetensors)")
  to_orbax.add_argument("out", help="run directory to write (must not exist, or be empty, unless --overwrite)")
  to_hf = commands.add_parser("orbax-to-hf", help="a run directory (orbax) -> an HF directory")
  to_hf.add_argument("src", help="training run directory (the trainer's --workdir, or hf-to-orbax's output)")
  to_hf.add_argument("out", help="HF directory to write (must not exist, or be empty, unless --overwrite)")
  to_hf.add_argument("--step", type=int, default=None, help="the step to export (default: the latest)")
  to_hf.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                     help="dtype of the written tensors (default bfloat16, as the released weights and the "
                          "trainer's export)")
  parts = commands.add_parser("parts-to-orbax", help="the released UMT-L encoder + a Qwen2 LLM directory -> "
                                                     "a run directory stage 1 starts from")
  parts.add_argument("--vision", required=True, help="UMT-L_f4_vision.pt (OpenGVLab/Video_Encoders_for_"
                                                     "Training_VideoChat-Flash): torch state dict, encoder.*")
  parts.add_argument("--llm", required=True, help="plain Qwen2 / Qwen2.5 Instruct directory (config.json + "
                                                  "safetensors), e.g. Qwen2.5-1.5B-Instruct")
  parts.add_argument("out", help="run directory to write (must not exist, or be empty, unless --overwrite)")
  parts.add_argument("--image_size", type=int, choices=(224, 448), default=224,
                     help="the tower's resolution: 224 (umt-large, the 7B's stages 1-3) or 448 (umt-hd-large, "
                          "the 2B); only the position table differs")
  parts.add_argument("--seed", type=int, default=0, help="seed of the fresh projector")
  for sub in (to_orbax, to_hf, parts):
    sub.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
  args = parser.parse_args(argv)

  started = time.perf_counter()
  try:
    if args.command == "parts-to-orbax":
      if not os.path.isfile(args.vision):
        raise FileNotFoundError(f"vision checkpoint {args.vision!r} does not exist")
      if (kind := run_dir.layout(args.llm)) != "qwen2":
        raise ValueError(f"--llm {args.llm!r} is not a plain Qwen2 directory ({LAYOUT_NAMES.get(kind, 'a run')})")
      for src in (args.vision, args.llm):
        check_output(args.out, args.overwrite, src)
      what = parts_to_orbax(args.vision, args.llm, args.out, args.image_size, args.seed)
    else:
      run_dir.layout(args.src)        # a missing or unreadable input is named before the output
      check_output(args.out, args.overwrite, args.src)
      if args.command == "hf-to-orbax":
        what = hf_to_orbax(args.src, args.out)
      else:
        what = orbax_to_hf(args.src, args.out, args.step, args.dtype)
  except (ValueError, OSError, ImportError) as e:
    parser.exit(2, f"convert_checkpoint.py: error: {e}\n")
  print(f"{what} in {time.perf_counter() - started:.1f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
