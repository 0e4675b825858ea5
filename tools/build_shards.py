#!/usr/bin/env python
"""Annotations (a YAML list of LLaVA/LongVid-format JSON(L) datasets) + media -> ArrayRecord shards.

  python tools/build_shards.py --data data/synthetic/data.yaml --out data/shards

Records whose annotation is malformed, whose conversations are empty or do not alternate, or whose media
is missing or undecodable are skipped and counted with their reason; nothing else is lost. Writes are
atomic: shards and the manifest appear under their final names only when complete.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data", required=True, help="YAML file listing the datasets")
  parser.add_argument("--out", required=True, help="output directory for shards and manifest.json")
  parser.add_argument("--records_per_shard", type=int, default=512)
  parser.add_argument("--no_verify", action="store_true", help="skip test-decoding each video's first frame")
  parser.add_argument("--quiet", action="store_true", help="do not print each skipped record")
  args = parser.parse_args()
  if not os.path.isfile(args.data):
    print(f"build_shards: no such file: {args.data}", file=sys.stderr)
    return 2
  if args.records_per_shard < 1:
    print(f"build_shards: --records_per_shard must be >= 1, got {args.records_per_shard}", file=sys.stderr)
    return 2
  from hico_jax.data import shards
  start = time.perf_counter()
  try:
    report = shards.build(args.data, args.out, records_per_shard=args.records_per_shard,
                          verify_media=not args.no_verify, log=(lambda _: None) if args.quiet else print)
  except (ValueError, FileNotFoundError) as e:
    print(f"build_shards: {e}", file=sys.stderr)
    return 2
  print(report.summary())
  print(f"wrote {args.out} in {time.perf_counter() - start:.1f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
