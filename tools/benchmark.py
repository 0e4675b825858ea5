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

The cases, their reports and the subprocess they run in are hico_jax/bench/; this file is their command line.
"""

from __future__ import annotations

import argparse
import json
import os

from hico_jax.bench import cases, isolated, report


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
    isolated.print_result(cases.run(json.loads(args.case)))
    return

  if args.section == "data":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    case = {"section": "data", "framework": "cpu", "workdir": args.data_dir, "videos": args.videos,
            "source_px": args.source_px, "sizes": [224, 448]}
    result = cases.run(case)
    print(json.dumps(result, indent=2))
    needed = args.frames_per_gpu_s
    for size, r in result["per_size"].items():
      print(f"| {size} | {r['frames_per_s']:.0f} | {needed / r['frames_per_s']:.1f} |")
    return
  results = []
  for case in cases.expand(args):
    result = report.summarise(isolated.run_case_in_subprocess(case, args.timeout, __file__))
    results.append(result)
    print(json.dumps({k: v for k, v in result.items() if k != "times"}), flush=True)
    if args.out:
      with open(args.out, "a") as f:
        f.write(json.dumps(result) + "\n")
  print(report.table(results))


if __name__ == "__main__":
  main()
