#!/usr/bin/env python
"""Prepares evaluation data (a benchmark's download, a NIAH haystack) as TFDS datasets over ArrayRecord.

  python tools/prepare_tfds.py benchmark mvbench --download /data/MVBench --data_dir /data/tfds
  python tools/prepare_tfds.py niah --download /data/niah --data_dir /data/tfds --haystack video_haystack.mkv \
      --single_hop niah-coco-singlehop_20.json --multi_hop niah-coco-multihop-100.json --image_root images

The program is hico_jax/cli/prepare_tfds.py (its --help says the rest); hico_jax comes from `pip install -e .`.
"""

import sys

from hico_jax.cli.prepare_tfds import main

if __name__ == "__main__":
  sys.exit(main())
