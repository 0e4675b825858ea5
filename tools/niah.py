#!/usr/bin/env python
"""Needle in a video haystack, single- or multi-hop, as the reference evaluates it (hico_jax/eval/niah.py).

  python tools/niah.py single --model DIR --haystack video_haystack.mkv \
      --needles niah-coco-singlehop_20.json --image_root DIR --min_frame_num 1000 --max_frame_num 10000 \
      --frame_interval 1000 --depth_interval 0.2 --out single.json --yarn_factor 4
  python tools/niah.py multi --model DIR --haystack video_haystack.mkv \
      --needles niah-coco-multihop-100.json --image_root DIR ... --out multi.json

The program is hico_jax/cli/niah.py (its --help says the rest); hico_jax comes from `pip install -e .`.
"""

import sys

from hico_jax.cli.niah import main

if __name__ == "__main__":
  sys.exit(main())
