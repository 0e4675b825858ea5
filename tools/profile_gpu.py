#!/usr/bin/env python
"""Where a benchmark case's GPU time goes: kernel durations from a jax.profiler trace, summed by kind.

  python tools/profile_gpu.py clip --preset hico_7b --frames 128
  python tools/profile_gpu.py train --preset hico_2b --frames 64 --vit_remat attn --vit_norm pallas --show_hlo 6
  python tools/profile_gpu.py train --preset hico_2b --frames 256 --vit_remat attn --launched_by memcpy --show_hlo 8

Runs the same case as tools/benchmark.py (same setup code), traces two steps after the warm-up and prints the
per-step total by kind (GEMM, attention, elementwise fusions, ...) and the largest kernels. With --show_hlo N
it also prints the HLO of the N largest non-GEMM, non-attention fusions, read from an XLA dump of the run:
the fusion's name in the trace is the instruction's name in the optimised module. Timings here are for
finding the largest costs; the figures we report come from tools/benchmark.py.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile

KINDS = (  # first match wins; names as cuDNN, cuBLAS (nvjet, cutlass, xmma) and XLA's fusion emitter write them
    ("attention", ("cudnn", "fmha", "sdpa", "flash")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "cublas")),
    ("reduction fusion", ("reduce",)),
    ("copy / transpose / memset", ("transpose", "copy", "memcpy", "memset")),
    ("gather / scatter / sort", ("gather", "scatter", "sort")),
)


def kind_of(kernel: str) -> str:
  name = kernel.lower()
  return next((kind for kind, marks in KINDS if any(m in name for m in marks)), "elementwise fusion")


def kernel_times(trace_dir: str, steps: int) -> tuple[collections.Counter, collections.Counter, collections.Counter]:
  """Kernel name -> GPU nanoseconds per step; kernel name -> launches per step; (kernel name, the HLO
  instruction that launched it) -> nanoseconds per step. From the trace's device planes.

  A fusion inside a scanned layer has one name for all its layers: its launches count the layers. Library
  kernels (cuBLAS, cuDNN, memcpy) have their own names; the instruction tells which call launched them."""
  import jax
  path = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)[0]
  per_kernel, launches, per_instruction = collections.Counter(), collections.Counter(), collections.Counter()
  for plane in jax.profiler.ProfileData.from_file(path).planes:
    if plane.name.startswith("/device:GPU"):
      for line in plane.lines:
        for event in line.events:
          per_kernel[event.name] += event.duration_ns / steps
          launches[event.name] += 1 / steps
          instruction = next((value for key, value in event.stats if key == "hlo_op"), "?")
          per_instruction[event.name, instruction] += event.duration_ns / steps
  return per_kernel, launches, per_instruction


def print_fusion_hlo(dump_dir: str, kernels: list[str]) -> None:
  """The optimised HLO of each fusion, from the largest dumped module that has an instruction of its name
  (the step; init and warm-up programs are smaller)."""
  paths = sorted(glob.glob(os.path.join(dump_dir, "*after_optimizations.txt")), key=os.path.getsize, reverse=True)
  modules = [open(path).read() for path in paths]
  strip = lambda line: re.sub(r", metadata=\{[^}]*\}", "", line.strip())
  for kernel in kernels:
    # The trace writes an instruction's numeric suffix with "_" where the HLO text has "." (fusion.12).
    name = re.sub(r"_(\d+)$", r"[._]\1", re.escape(kernel))
    pattern = re.compile(rf"^\s*(?:ROOT )?%{name} = .*$", re.MULTILINE)
    text, found = next(((t, m) for t in modules for m in [pattern.search(t)] if m), (None, None))
    if found is None:
      continue
    print(f"\n>>> {strip(found.group(0))[:700]}")
    called = re.search(r"calls=%?([\w.\-]+)", found.group(0))
    body = re.search(rf"^%?{re.escape(called.group(1))} .*?^}}", text, re.MULTILINE | re.DOTALL) if called else None
    for line in (body.group(0).splitlines()[:40] if body else []):
      print("   ", strip(line)[:200])


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("section", choices=["clip", "train"])
  parser.add_argument("--preset", default="hico_7b")
  parser.add_argument("--frames", type=int, default=128)
  parser.add_argument("--vit_remat", default="full", help="train: the vision tower's remat policy")
  parser.add_argument("--remat", default="dots_attn", help="train: the LLM's remat policy")
  parser.add_argument("--vit_norm", default="xla", choices=["xla", "pallas"], help="train: the vision LayerNorms")
  parser.add_argument("--text_tokens", type=int, default=512)
  parser.add_argument("--encode_chunk", type=int, default=None, help="train: clips per vision-tower step")
  parser.add_argument("--vit_block_loop", default="auto", choices=["auto", "scan", "unrolled"],
                      help="the vision blocks as a loop or unrolled (auto: as training and the clip encoder run them)")
  parser.add_argument("--top", type=int, default=25, help="largest kernels to list")
  parser.add_argument("--show_hlo", type=int, default=0, help="print the HLO of this many largest fusions")
  parser.add_argument("--dump_dir", default=None, help="with --show_hlo: keep XLA's dump here (default: a temp dir)")
  parser.add_argument("--launched_by", default=None, metavar="TEXT",
                      help="list the HLO instructions that launched the kernels whose name contains TEXT (any "
                           "case, e.g. memcpy), largest first; with --show_hlo, print the largest of them too. Run "
                           "with XLA_FLAGS=--xla_gpu_enable_command_buffer= or a CUDA graph is all it names")
  args = parser.parse_args()

  dump_dir = args.dump_dir or tempfile.mkdtemp()
  if args.show_hlo:   # before jax is imported: XLA reads its flags once
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={dump_dir} "
                               "--xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*").strip()
  import jax
  from hico_jax.bench import clip, train_step

  steps, trace_dir, found = 2, tempfile.mkdtemp(), {}

  def traced_time(run, warmup, iters):
    del iters
    for _ in range(max(warmup, 1)):
      run()
    with jax.profiler.trace(trace_dir):
      for _ in range(steps):
        run()
    found["kernels"], found["launches"], found["instructions"] = kernel_times(trace_dir, steps)
    return [0.0]

  # The benchmark's own case setup, timed by the tracer instead.
  case = dict(preset=args.preset, frames=args.frames, warmup=2, iters=1, vit_block_loop=args.vit_block_loop)
  if args.section == "clip":
    clip.run_jax(case, time_calls=traced_time)
  else:
    train_step.run_jax({**case, "remat": args.remat, "vit_remat": args.vit_remat, "vit_norm": args.vit_norm,
                        "text_tokens": args.text_tokens, "encode_chunk": args.encode_chunk},
                       time_calls=traced_time)

  kernels, launches = found["kernels"], found["launches"]
  if not kernels:
    sys.exit("no GPU kernels in the trace: this tool profiles GPU runs")
  total = sum(kernels.values())
  by_kind = collections.Counter()
  for name, ns in kernels.items():
    by_kind[kind_of(name)] += ns
  print(f"{args.section} {args.preset} {args.frames} frames on {jax.devices()[0].device_kind}: "
        f"{total / 1e6:.2f} ms of GPU kernels per step")
  for kind, ns in by_kind.most_common():
    print(f"  {kind:24s} {ns / 1e6:9.2f} ms {100 * ns / total:5.1f}%")
  print("largest kernels: ms per step, launches per step, µs per launch")
  for name, ns in kernels.most_common(args.top):
    calls = launches[name]
    print(f"  {ns / 1e6:9.3f} {calls:6.0f} {ns / 1e3 / calls:9.1f}  {kind_of(name):20s} {name[:90]}")
  if args.launched_by:
    chosen = collections.Counter()
    for (name, op), ns in found["instructions"].items():
      if args.launched_by.lower() in name.lower():
        chosen[op] += ns
    chosen = chosen.most_common()
    print(f"HLO instructions launching kernels named *{args.launched_by}*: ms per step")
    for op, ns in chosen[:args.top]:
      print(f"  {ns / 1e6:9.3f}  {op}")
  if args.show_hlo:
    fusions = [n for n, _ in kernels.most_common() if kind_of(n) not in ("gemm", "attention")]
    if args.launched_by:
      fusions = [op for op, _ in chosen if op != "?"]
    print_fusion_hlo(dump_dir, fusions[:args.show_hlo])


if __name__ == "__main__":
  main()
