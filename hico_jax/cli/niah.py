"""Needle in a video haystack, single- or multi-hop, as the reference evaluates it (hico_jax/eval/niah.py).

  python tools/niah.py single --model DIR --haystack video_haystack.mkv \
      --needles niah-coco-singlehop_20.json --image_root DIR --min_frame_num 1000 --max_frame_num 10000 \
      --frame_interval 1000 --depth_interval 0.2 --out single.json --yarn_factor 4
  python tools/niah.py multi --model DIR --haystack video_haystack.mkv \
      --needles niah-coco-multihop-100.json --image_root DIR ... --out multi.json
  python tools/niah.py single --model DIR --tfds_dir /data/tfds/niah_haystack/video_haystack/1.0.0 ...

--model: a VideoChat-Flash checkpoint (official layout, with tokenizer.json). The needle files are the
reference's: single-hop records {"question", "answer", "image"}, multi-hop {"images", "question1", "answer1",
"question2", "answer2"}, image paths relative to --image_root. The haystack is sampled as the reference
samples it (every round(fps)-th frame); above 7,500 frames, as there, its first half is encoded and repeated.
A video shorter than the frames needed is repeated too (the reference stops there instead). The decoder
applies config.json's rope_scaling, as the reference's stock Qwen2ForCausalLM does (--yarn_factor sets it
without editing the file); for the reference's 160k-token prompts use YaRN x4. The decoder's attention is
from_pretrained's for the device (cuDNN's flash kernel on a GPU), which holds no (L x L) matrix. Writes the reference's result records (per frame count, and per depth
for single-hop) to --out as JSON, and beside it (.png) the accuracy heat map of the paper's Figures 6-7 (frames
across; depth down for single-hop, the caption and QA questions for multi-hop); prints the records and their mean.
--tfds_dir reads the haystack's frames and the needles from the dataset tools/prepare_tfds.py niah made of the
same files instead of --haystack, --needles and --image_root: the same frames and images, the same records.
"""

import argparse
import dataclasses
import json
import os
import sys


def _parse(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("kind", choices=("single", "multi"))
  parser.add_argument("--model", required=True, help="VideoChat-Flash checkpoint directory")
  parser.add_argument("--haystack", help="the haystack video")
  parser.add_argument("--needles", help="the reference's needle JSON file")
  parser.add_argument("--image_root", default="", help="directory the needle image paths are relative to")
  parser.add_argument("--tfds_dir", help="instead of the three above: the prepared dataset's folder "
                      "(tools/prepare_tfds.py niah prints it)")
  parser.add_argument("--min_frame_num", type=int, default=20)
  parser.add_argument("--max_frame_num", type=int, default=256)
  parser.add_argument("--frame_interval", type=int, default=20)
  parser.add_argument("--depth_interval", type=float, default=0.1, help="single-hop only")
  parser.add_argument("--attention_impl", default=None, help="override the decoder's attention for the long prompts "
                      "(xla, cudnn, chunked, splash); default: from_pretrained's for the device")
  parser.add_argument("--yarn_factor", type=float, default=None,
                      help="YaRN rope scaling for the decoder, as the reference sets it in config.json (4)")
  parser.add_argument("--yarn_original_max_positions", type=int, default=32768)
  parser.add_argument("--out", required=True, help="JSON file for the result records")
  return parser.parse_args(argv)


def _fail(message: str) -> int:
  print(f"niah: {message}", file=sys.stderr)
  return 2


NEEDLE_SPLITS = {"single": "single_hop", "multi": "multi_hop"}


def read_inputs(kind: str, *, tfds_dir: str | None = None, haystack: str | None = None, needles: str | None = None,
                image_root: str = ""):
  """(the needle records, their RGB images: one per single-hop record, a list per multi-hop one, the haystack's
  uint8 RGB frames at 1 fps in chunks) from the downloaded files or from the dataset prepared from them."""
  from hico_jax.eval import niah, tfds_niah
  if tfds_dir:      # the builder checked the records' fields when it prepared them
    items, images = tfds_niah.needles(tfds_dir, NEEDLE_SPLITS[kind])
    return items, images, tfds_niah.haystack_chunks(tfds_dir)
  items, images = niah.read_needles(needles, NEEDLE_SPLITS[kind], image_root)
  return items, images, niah.haystack_chunks(haystack)


def main(argv=None) -> int:
  args = _parse(argv)
  if not 0 < args.min_frame_num <= args.max_frame_num or args.frame_interval < 1:
    return _fail(f"frame counts {args.min_frame_num}..{args.max_frame_num} step {args.frame_interval}: need "
                 "0 < min <= max and step >= 1")
  if args.kind == "single" and not 0 < args.depth_interval <= 1:
    return _fail(f"--depth_interval must be in (0, 1], got {args.depth_interval}")
  if args.tfds_dir and (args.haystack or args.needles or args.image_root):
    return _fail("--tfds_dir replaces --haystack, --needles and --image_root: give one or the other")
  if not args.tfds_dir and not (args.haystack and args.needles):
    return _fail("give --haystack and --needles (the downloaded files), or --tfds_dir (the prepared dataset)")
  for name in ("model", "haystack", "needles"):
    if getattr(args, name) and not os.path.exists(getattr(args, name)):
      return _fail(f"--{name} {getattr(args, name)} does not exist")

  import numpy as np

  import hico_jax
  from hico_jax.convert import videochat_flash
  from hico_jax.data import tokenizer as tokenizer_lib
  from hico_jax.eval import niah, plots

  try:
    items, images, chunks = read_inputs(args.kind, tfds_dir=args.tfds_dir, haystack=args.haystack,
                                        needles=args.needles, image_root=args.image_root)

    model = hico_jax.from_pretrained(args.model, visual_dropout=None)
    if not model.is_video_model:
      return _fail(f"{args.model} is a plain Qwen2 language model; NIAH needs a VideoChat-Flash checkpoint")
    llm_config = dataclasses.replace(model.config.llm,
                                     rope_scaling=videochat_flash.rope_scaling_in_file(args.model))
    if args.attention_impl:
      llm_config = dataclasses.replace(llm_config, attention_impl=args.attention_impl)
      llm_config.check()
    if args.yarn_factor is not None:
      llm_config = dataclasses.replace(llm_config, rope_scaling={
          "rope_type": "yarn", "factor": args.yarn_factor,
          "original_max_position_embeddings": args.yarn_original_max_positions})
    evaluator = niah.Evaluator(model.config, model.params, tokenizer_lib.load_tokenizer(args.model), llm_config)

    if args.kind == "single":
      needles = [evaluator.encode_needle(image) for image in images]
    else:
      needles = [[evaluator.encode_needle(image) for image in chain] for chain in images]
    # Above 7,500 frames the reference encodes half and repeats it (its 10,000 frames are 5,000 twice).
    wanted = args.max_frame_num // 2 if args.max_frame_num > 7500 else args.max_frame_num
    haystack = evaluator.encode_haystack(chunks, -(-wanted // 4) * 4)[:wanted]
  except (ValueError, FileNotFoundError) as e:     # VideoDecodeError is a ValueError
    return _fail(str(e))
  if len(haystack) < args.max_frame_num:
    if len(haystack) < wanted:
      print(f"niah: the haystack video gives {len(haystack)} frames at 1 fps; repeating them to "
            f"{args.max_frame_num}")
    haystack = np.concatenate([haystack] * -(-args.max_frame_num // len(haystack)))[:args.max_frame_num]

  frame_counts = range(args.min_frame_num, args.max_frame_num + 1, args.frame_interval)
  if args.kind == "single":
    depths = np.arange(0, 1 + args.depth_interval, args.depth_interval)     # the reference's grid, 1.0 included
    results = niah.single_hop(evaluator, haystack, needles, items, frame_counts, depths, log=print)
  else:
    results = niah.multi_hop(evaluator, haystack, needles, items, frame_counts, log=print)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out + ".tmp", "w") as f:      # written whole, then renamed: never a truncated result file
    json.dump(results, f, indent=2)
  os.replace(args.out + ".tmp", args.out)
  picture = os.path.splitext(args.out)[0] + ".png"
  plots.niah_heatmap(results, picture, title=f"{args.kind}-hop NIAH, {os.path.basename(args.model.rstrip('/'))}")
  print(f"mean score {np.mean([r['Score'] for r in results]):.4f} over {len(results)} records -> {args.out}, "
        f"{picture}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
