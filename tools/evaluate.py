#!/usr/bin/env python
"""Scores a VideoChat-Flash checkpoint on the paper's Table 2 benchmarks as the official lmms-eval does.

  python tools/evaluate.py --model DIR --benchmark mvbench --benchmark videomme \
      --data_root mvbench=/data/MVBench --data_root videomme=/data/Video-MME --out results/

--data_root: one folder (every benchmark's files under <root>/<name>/; videomme_w_subtitle reads videomme/,
longvideobench_test longvideobench/) or NAME=DIR per benchmark, each the benchmark's download as published (see
hico_jax/eval/benchmarks/<name>.py for the files it reads). --tfds_dir instead reads the download prepared as a
TFDS dataset (python tools/prepare_tfds.py benchmark NAME --download DIR --data_dir TFDS_DIR), the same
questions and frames: one TFDS_DIR for all, or NAME=TFDS_DIR; each benchmark from one of the two. Answers go to
<out>/<benchmark>/results.*.jsonl as they come; a rerun skips what is there. Several processes (hosts or GPUs):
give each --process_index i --process_count n (default: jax's), then run once more with --merge. Prints the
Table 2 row and writes <out>/summary.md and <out>/summary.json. longvideobench_test has no answers: it is not
scored; <out>/submissions/ gets the official submission file for the LongVideoBench leaderboard.
"""

import argparse
import os
import sys


def _parse(argv):
  from hico_jax.eval import benchmarks
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", required=True, help="VideoChat-Flash checkpoint directory (with tokenizer.json)")
  parser.add_argument("--benchmark", action="append", required=True, choices=benchmarks.names())
  parser.add_argument("--data_root", action="append", default=[], help="DIR, or NAME=DIR per benchmark")
  parser.add_argument("--tfds_dir", action="append", default=[],
                      help="TFDS data_dir of the prepared benchmarks (tools/prepare_tfds.py), or NAME=DIR")
  parser.add_argument("--out", required=True, help="results folder")
  parser.add_argument("--batch_size", type=int, default=1,
                      help="questions of one frame count per generate call (1: fastest at 512 frames on an H200)")
  parser.add_argument("--process_index", type=int, default=None)
  parser.add_argument("--process_count", type=int, default=None)
  parser.add_argument("--merge", action="store_true", help="only merge the processes' files into the summary")
  parser.add_argument("--limit", type=int, default=None, help="only the first N questions of each benchmark")
  parser.add_argument("--max_frames", type=int, default=None,
                      help="frame cap instead of the official one (512; LVBench 640): not the official score")
  parser.add_argument("--decode_workers", type=int, default=4)
  parser.add_argument("--dtype", default=None, help="compute dtype (default: the checkpoint's)")
  parser.add_argument("--no_progress", action="store_true")
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = _parse(argv)
  from hico_jax.eval import benchmarks, sources
  names = [n for n in benchmarks.names() if n in args.benchmark]     # Table 2's column order
  try:
    roots = sources.resolve(names, args.data_root, args.tfds_dir)
    for name in names:       # a wrong folder is named before the model loads
      roots[name].load()
  except (ValueError, FileNotFoundError) as e:
    print(f"evaluate: {e}", file=sys.stderr)
    return 2
  if args.batch_size < 1:
    print(f"evaluate: --batch_size must be >= 1, got {args.batch_size}", file=sys.stderr)
    return 2
  import jax
  import hico_jax
  from hico_jax.data.tokenizer import load_tokenizer
  from hico_jax.eval import runner
  model_name = os.path.basename(os.path.normpath(args.model))
  if not args.merge:
    index = jax.process_index() if args.process_index is None else args.process_index
    count = jax.process_count() if args.process_count is None else args.process_count
    if not 0 <= index < count:
      print(f"evaluate: --process_index {index} is outside 0..{count - 1}", file=sys.stderr)
      return 2
    model = hico_jax.from_pretrained(args.model, **({"dtype": args.dtype} if args.dtype else {}))
    options = runner.Options(batch_size=args.batch_size, process_index=index, process_count=count,
                             decode_workers=args.decode_workers, limit=args.limit, max_frames=args.max_frames,
                             progress=not args.no_progress)
    run = runner.Runner(model, load_tokenizer(args.model), args.out, options)
    for name in names:
      run.run(name, roots[name])
    if count > 1 and not args.merge:
      print(f"process {index} of {count} done; run again with --merge after all have finished")
      return 0
  runner.summarize(args.out, names, roots, model_name, limit=args.limit)
  with open(os.path.join(args.out, "summary.md")) as f:
    print(f.read(), end="")
  return 0


if __name__ == "__main__":
  sys.exit(main())
