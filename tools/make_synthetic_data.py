#!/usr/bin/env python
"""Synthetic long videos and LLaVA annotations for the five LongVid tasks, answers readable from the pixels.

  python tools/make_synthetic_data.py --out /tmp/synth --num_videos 300 --size 64
  python tools/make_synthetic_data.py --out /tmp/synth_bad --num_videos 20 --corrupt 4

Writes OUT/videos/*.mp4, OUT/annotations/<task>.jsonl and OUT/data.yaml (see hico_jax/data/synthetic.py); a
folder already built with the same parameters is left as it is.
"""

from __future__ import annotations

import argparse
import sys
import time

from hico_jax.data import synthetic


def _range(kind):
  def parse(text):
    try:
      lo, hi = (kind(v) for v in text.split(","))
    except ValueError:
      raise argparse.ArgumentTypeError(f"expected LO,HI ({kind.__name__}s), got {text!r}") from None
    return lo, hi
  return parse


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="\n".join(__doc__.split("\n")[1:]))
  parser.add_argument("--out", required=True, help="output folder (created; must be empty or a previous output)")
  parser.add_argument("--num_videos", type=int, default=100, help="videos in all, split evenly over the tasks")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--size", type=int, default=64, help="frame height and width in pixels (even, >= 32)")
  parser.add_argument("--corrupt", type=int, default=0, help="bad records to add, for bad-input tests")
  parser.add_argument("--tasks", default=",".join(synthetic.TASKS), help="comma-separated subset of the tasks")
  parser.add_argument("--fps", type=_range(int), default=(4, 24), metavar="LO,HI", help="integer fps range")
  parser.add_argument("--duration", type=_range(float), default=(4.0, 40.0), metavar="LO,HI",
                      help="duration range in seconds")
  parser.add_argument("--slots", type=int, default=16, help="events start and end on 1/slots of the video")
  args = parser.parse_args(argv)

  started = time.perf_counter()
  try:
    dataset = synthetic.make_dataset(args.out, num_videos=args.num_videos, seed=args.seed, size=args.size,
                                     tasks=[t for t in args.tasks.split(",") if t], fps_range=args.fps,
                                     duration_range=args.duration, slots=args.slots, corrupt=args.corrupt)
  except (ValueError, OSError) as e:
    parser.exit(2, f"make_synthetic_data.py: error: {e}\n")
  seconds = time.perf_counter() - started
  for task, count in dataset.counts.items():
    print(f"{task:20s} {count:6d} videos")
  if dataset.corrupt:
    print(f"{'corrupt':20s} {len(dataset.corrupt):6d} records")
  total = sum(dataset.counts.values())
  if dataset.reused:
    print(f"{total} videos already built with these parameters; {dataset.yaml_path}")
    return 0
  print(f"{total} videos in {seconds:.2f} s ({total / max(seconds, 1e-9):.0f} videos/s); {dataset.yaml_path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
