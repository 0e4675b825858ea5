"""Prepares evaluation data as TFDS datasets over ArrayRecord, the kind of source training reads.

  python tools/prepare_tfds.py benchmark mvbench --download /data/MVBench --data_dir /data/tfds
  python tools/evaluate.py --model DIR --benchmark mvbench --tfds_dir /data/tfds --out results/

  python tools/prepare_tfds.py niah --download /data/niah --data_dir /data/tfds --haystack video_haystack.mkv \
      --single_hop niah-coco-singlehop_20.json --multi_hop niah-coco-multihop-100.json --image_root images
  python tools/niah.py single --model DIR --tfds_dir /data/tfds/niah_haystack/video_haystack/1.0.0 ...

benchmark: the download (the folder --data_root would name) becomes <data_dir>/eval_benchmark/<NAME>/<version>/
(hico_jax.eval.tfds_benchmarks): every question the benchmark's loader reads, each video's bytes once.
niah: the haystack's frames at 1 fps (decoded once, stored losslessly) and the needle files with their images
become <data_dir>/niah_haystack/<haystack stem>/1.0.0/ (hico_jax.eval.tfds_niah); the file names are relative
to --download. TFDS writes into an incomplete.* folder and renames it when done; a finished dataset is left as
it is. Prints the prepared folder.
"""

from __future__ import annotations

import argparse
import sys


def _parse(argv):
  from hico_jax.eval import benchmarks
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  kinds = parser.add_subparsers(dest="kind", required=True)
  bench = kinds.add_parser("benchmark", help="an evaluation benchmark's download")
  bench.add_argument("name", choices=benchmarks.names())
  niah = kinds.add_parser("niah", help="a NIAH haystack video and its needle files")
  niah.add_argument("--haystack", required=True, help="the haystack video, inside --download")
  niah.add_argument("--single_hop", default="", help="the single-hop needle JSON file, inside --download")
  niah.add_argument("--multi_hop", default="", help="the multi-hop needle JSON file, inside --download")
  niah.add_argument("--image_root", default="", help="folder inside --download the needle image paths start from")
  niah.add_argument("--name", default=None, help="the dataset's config name (default: the haystack's file stem)")
  for sub in (bench, niah):
    sub.add_argument("--download", required=True, help="the downloaded folder (the builder's manual directory)")
    sub.add_argument("--data_dir", required=True, help="TFDS data_dir to write the dataset under")
    sub.add_argument("--quiet", action="store_true", help="no progress bars or skipped rows")
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = _parse(argv)
  from hico_jax.eval import tfds_benchmarks, tfds_niah
  try:
    if args.kind == "benchmark":
      path = tfds_benchmarks.build(args.name, args.download, args.data_dir,
                                   log=(lambda _: None) if args.quiet else print, quiet=args.quiet)
    else:
      path = tfds_niah.build(args.download, args.data_dir, haystack=args.haystack, single_hop=args.single_hop,
                             multi_hop=args.multi_hop, image_root=args.image_root, name=args.name, quiet=args.quiet)
  except (ValueError, FileNotFoundError) as e:
    print(f"prepare_tfds: {e}", file=sys.stderr)
    return 2
  print(path)
  return 0
