"""Ask a VideoChat-Flash checkpoint questions about a video file, as the reference's HF chat() does.

  python tools/chat.py --model ckpt/VideoChat-Flash-Qwen2_5-2B_res448 --video cooking.mp4 --question "What is cooked?"
  python tools/chat.py --model DIR --video FILE --question "Who enters?" --question "What do they carry?"
  python tools/chat.py --model DIR --video FILE          # one question a line from stdin, until end of input
  python tools/chat.py --model DIR --image photo.jpg --question "What is on the table?"

Several questions are one conversation, as chat() with its chat_history: each follow-up sees the earlier turns
(--no_history asks each one afresh). Frames are sampled at about 1 fps in 4-frame clips, 64 at least and
--max_num_frames at most (chat()'s load_video), and the prompt carries chat()'s time message. The video is
decoded (each sampled frame resized as it comes) and encoded once; every question reuses its visual tokens.
Answers go to stdout, one per question (--json: one JSON object a line with the prompt and answer ids);
progress goes to stderr, with bars for a long video.
The prompt building and answer decoding live in hico_jax/infer/chat.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

# Light (OpenCV and Pillow, no jax): --help and argument errors stay instant.
from hico_jax.data import video as video_io
from hico_jax.infer import chat

PROG = "chat.py"


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="\n".join(__doc__.split("\n")[1:]))
  parser.add_argument("--model", required=True, help="VideoChat-Flash checkpoint directory (HF official layout, "
                      "with tokenizer.json)")
  media = parser.add_mutually_exclusive_group(required=True)
  media.add_argument("--video", help="video file to ask about")
  media.add_argument("--image", action="append", default=None,
                     help="image file to ask about; repeat for several (one: anyres tiles, several: 64 tokens each)")
  parser.add_argument("--question", action="append", default=None,
                      help="a question; repeat for follow-ups in one conversation. Absent: read stdin lines")
  parser.add_argument("--max_num_frames", type=int, default=chat.REFERENCE_MAX_NUM_FRAMES,
                      help="most frames sampled, a multiple of 4 (default: chat()'s %(default)s)")
  parser.add_argument("--min_num_frames", type=int, default=chat.REFERENCE_MIN_NUM_FRAMES,
                      help="fewest frames sampled where the video has that many (default: load_video's %(default)s)")
  parser.add_argument("--chunk_clips", type=int, default=None,
                      help="clips the vision tower encodes at a time (default: 64 at 224 px, 16 at 448); lower it "
                      "if encoding runs out of memory")
  parser.add_argument("--max_new_tokens", type=int, default=1024, help="default: the model card's %(default)s")
  parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sampling")
  parser.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass, with --temperature > 0")
  parser.add_argument("--seed", type=int, default=0, help="sampling seed; turn k uses seed + k")
  parser.add_argument("--no_history", action="store_true", help="answer each question on its own")
  parser.add_argument("--json", action="store_true",
                      help="print one JSON object per turn: question, answer, prompt_ids, answer_ids")
  return parser


def _fail(message) -> int:
  # One line, whatever the exception's text holds: the reason is what a user reads first.
  print(f"{PROG}: error: {' '.join(str(message).split())}", file=sys.stderr)
  return 2


def _questions(args):
  if args.question is not None:
    yield from args.question
    return
  interactive = sys.stdin.isatty()
  while True:
    if interactive:
      print("> ", end="", file=sys.stderr, flush=True)
    line = sys.stdin.readline()
    if not line:
      return
    if line.strip():
      yield line.strip()


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  if args.max_new_tokens < 1:
    return _fail(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
  if args.chunk_clips is not None and args.chunk_clips < 1:
    return _fail(f"--chunk_clips must be >= 1, got {args.chunk_clips}")
  if args.temperature < 0 or not 0 < args.top_p <= 1:
    return _fail(f"need --temperature >= 0 and 0 < --top_p <= 1, got {args.temperature} and {args.top_p}")
  if args.question is not None and not all(q.strip() for q in args.question):
    return _fail("--question must not be empty")
  if not os.path.isdir(args.model):
    return _fail(f"model directory {args.model!r} does not exist")

  if args.image:
    return _image_chat(args)
  try:
    chat.check_frame_limits(args.max_num_frames, args.min_num_frames)
    # A missing or broken file is reported before minutes of checkpoint loading; the frames themselves are
    # decoded after it, at the model's size, so a long video is never held at full size.
    video_io.probe(args.video)
  except ValueError as e:           # VideoDecodeError is a ValueError naming the file
    return _fail(e)

  # jax comes in here, after the arguments and the video are checked.
  import hico_jax
  from hico_jax.data import tokenizer as tokenizer_lib

  started = time.perf_counter()
  try:
    tokenizer = tokenizer_lib.load_tokenizer(args.model)
    model = hico_jax.from_pretrained(args.model)
    chat.check_video_model(model)
  except (OSError, ValueError, KeyError) as e:
    return _fail(f"cannot use {args.model!r} as a VideoChat-Flash checkpoint: {e}")
  print(f"{PROG}: loaded {args.model} ({time.perf_counter() - started:.1f} s)", file=sys.stderr)

  started = time.perf_counter()
  try:
    video = chat.read_video(args.video, max_num_frames=args.max_num_frames, min_num_frames=args.min_num_frames,
                            size=model.config.vit.image_size, progress=True)
  except ValueError as e:
    return _fail(e)
  print(f"{PROG}: {args.video}: {video.num_frames} frames of a {video.duration:.2f} s video "
        f"({time.perf_counter() - started:.1f} s)", file=sys.stderr)
  started = time.perf_counter()
  try:
    conversation = chat.VideoChat(model, tokenizer, video, chunk_clips=args.chunk_clips, progress=True)
  except ValueError as e:
    return _fail(e)
  print(f"{PROG}: encoded {conversation.visual_tokens.shape[1]} visual tokens, once for every question "
        f"({time.perf_counter() - started:.1f} s)", file=sys.stderr)

  return _converse(args, conversation)


def _image_chat(args) -> int:
  import hico_jax
  from hico_jax.data import image as image_io, tokenizer as tokenizer_lib
  try:                              # the images first, as the video: a bad file is named before loading the model
    images = [image_io.decode_image(path) for path in args.image]
  except ValueError as e:           # ImageDecodeError names the file
    return _fail(e)
  started = time.perf_counter()
  try:
    tokenizer = tokenizer_lib.load_tokenizer(args.model)
    conversation = chat.ImageChat(hico_jax.from_pretrained(args.model), tokenizer, images)
  except (OSError, ValueError, KeyError) as e:
    return _fail(f"cannot use {args.model!r} as a VideoChat-Flash checkpoint: {e}")
  print(f"{PROG}: loaded {args.model} ({time.perf_counter() - started:.1f} s)", file=sys.stderr)
  return _converse(args, conversation)


def _converse(args, conversation) -> int:
  for k, question in enumerate(_questions(args)):
    try:
      turn = conversation.ask(question, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_p=args.top_p, seed=args.seed + k, keep_history=not args.no_history)
    except ValueError as e:
      if args.question is not None:
        return _fail(e)
      _fail(e)                      # reading stdin: report the bad question and take the next one
      continue
    if args.json:
      print(json.dumps({"question": turn.question, "answer": turn.answer,
                        "prompt_ids": turn.prompt_ids.tolist(), "answer_ids": turn.answer_ids.tolist()}),
            flush=True)
    else:
      print(turn.answer, flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
