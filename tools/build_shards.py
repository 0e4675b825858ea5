#!/usr/bin/env python
"""Annotations (a YAML list of LLaVA/LongVid-format JSON(L) datasets) + media -> a TFDS dataset over ArrayRecord.

  python tools/build_shards.py --data data/synthetic/data.yaml --out data/tfds

The thin command over hico_jax.data.tfds_longvid.LongVid: the YAML's directory is the builder's manual
directory, each dataset of the YAML one split, and the result lands in --out/long_vid/<yaml stem>/1.0.0/
(dataset_info.json with the counts, metadata.json with the skip report). `tfds build` could run the same
builder, but it needs the module path and flags for the config, and it prints neither the skip report nor
the one-line errors below. Records whose annotation is malformed, whose conversations are empty or do not
alternate, or whose media is missing or undecodable are skipped and counted with their reason. TFDS writes
into an incomplete.* directory and renames it when done.
"""

import argparse
import os
import sys
import time


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data", required=True, help="YAML file listing the datasets (its folder: the manual dir)")
  parser.add_argument("--out", required=True, help="TFDS data_dir to write the dataset under")
  parser.add_argument("--threads", type=int, default=8, help="media files checked in parallel")
  parser.add_argument("--no_verify", action="store_true", help="skip test-decoding each video's first frame")
  parser.add_argument("--quiet", action="store_true", help="do not print each skipped record or progress bars")
  args = parser.parse_args()
  if not os.path.isfile(args.data):
    print(f"build_shards: no such file: {args.data}", file=sys.stderr)
    return 2
  if args.threads < 1:
    print(f"build_shards: --threads must be >= 1, got {args.threads}", file=sys.stderr)
    return 2
  from hico_jax.data import tfds_longvid
  start = time.perf_counter()
  try:
    report = tfds_longvid.build(args.data, args.out, verify_media=not args.no_verify, num_threads=args.threads,
                                log=(lambda _: None) if args.quiet else print, quiet=args.quiet)
  except (ValueError, FileNotFoundError) as e:
    print(f"build_shards: {e}", file=sys.stderr)
    return 2
  print(report.summary())
  print(f"wrote {tfds_longvid.prepared_dir(args.out)} in {time.perf_counter() - start:.1f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
