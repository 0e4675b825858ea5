#!/usr/bin/env python
"""Ask a VideoChat-Flash checkpoint questions about a video file, as the reference's HF chat() does.

  python tools/chat.py --model ckpt/VideoChat-Flash-Qwen2_5-2B_res448 --video cooking.mp4 --question "What is cooked?"
  python tools/chat.py --model DIR --video FILE --question "Who enters?" --question "What do they carry?"
  python tools/chat.py --model DIR --video FILE          # one question a line from stdin, until end of input
  python tools/chat.py --model DIR --image photo.jpg --question "What is on the table?"

The program is hico_jax/cli/chat.py (its --help says the rest); hico_jax comes from `pip install -e .`.
"""

import sys

from hico_jax.cli.chat import main

if __name__ == "__main__":
  sys.exit(main())
