"""Chat text for training and inference: LLaVA records to (input_ids, labels), and the HF `chat()` prompt.

A transcription of the reference's text rules (shared/reference/videochat_flash.md §5), read from
`llava-train_videochat/llava/train/train.py` (`preprocess_multimodal`, `preprocess_qwen`, `preprocess_plain`,
`LazySupervisedDataset.process_video`), `llava/mm_utils.py` (`tokenizer_image_token`), `llava/conversation.py`
(`conv_qwen` as "qwen_2", `conv_llava_plain` as "plain") and the HF model's `chat()`:

- Time message (`time_msg="short"`): `"\\nThe video lasts for {duration:.2f} seconds, and {N} frames are uniformly
  sampled from it. "`, leading newline and trailing space included.
- Training (`preprocess_multimodal`): a turn whose single `<image>` is not at its start gets it moved there
  (`"<image>\\n" + rest.strip()`), then every `<image>` becomes `"<image>" + msg.rstrip() + " "`; so the first human
  turn reads `"<image>\\nThe video lasts … from it. \\n{question}"` (`" \\n"` before the question).
- Inference (`chat()`): `"<image>\\n" + msg.strip() + " " + question` (a single space before the question).
- `qwen_2` labels (`preprocess_qwen`): `<|im_start|>{role}\\n{content}<|im_end|>\\n` per turn after a system turn;
  system and user turns are masked, assistant turns are supervised whole (`assistant\\n` header and the trailing
  `\\n` included); then every `\\n` (198), `<|im_start|>` and `<|im_end|>` token is unmasked wherever it is, user
  and system turns included. A leading non-human turn is dropped.
- `plain` labels (`preprocess_plain`): `<image>` + caption + `"\\n"`; only the one `<image>` position is masked, so
  the caption *and* the `"\\n"` are supervised. The first turn's text (question, time message) is discarded.
- Truncation: the reference cuts the expanded sequence to `tokenizer_model_max_length` from the right. We do the
  same, except that a cut inside (or before the end of) the visual span raises `SampleTooLongError`.

Labels are aligned with input_ids (Hugging Face convention); the shift to next-token targets happens in the loss.
"""

from collections.abc import Sequence

import numpy as np

from hico_jax.tokens import IGNORE_INDEX, VIDEO_TOKEN_ID

# The reference's placeholders a frame: 4-frame clips of 64 tokens after the HiCo merge (§1). The default of
# `tokens_per_frame` below; training passes the model's (DataConfig.visual_tokens_per_frame).
VISUAL_TOKENS_PER_FRAME = 16
IMAGE_TAG = "<image>"
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
TEMPLATES = ("qwen_2", "plain")
_ROLES = {"human": "user", "gpt": "assistant"}
# The reference drops this string from every turn of a media sample (a VideoInstruct-100K annotation artefact).
_NOISE_MARKER = "QA_GT_caption_based_noisy"


class SampleTooLongError(ValueError):
  """The sample's visual span does not fit in max_length; the pipeline skips and counts such samples."""


def time_message(duration: float, num_frames: int) -> str:
  """The reference's "short" time message, with its leading newline and trailing space.

  Training inserts `msg.rstrip() + " "` after `<image>`, inference `msg.strip() + " "`; see the module docstring.
  """
  _check_num_frames(num_frames)
  duration = float(duration)
  if not np.isfinite(duration) or duration < 0:
    raise ValueError(f"video duration must be a finite number of seconds >= 0, got {duration}")
  return f"\nThe video lasts for {duration:.2f} seconds, and {num_frames} frames are uniformly sampled from it. "


def encode_sample(conversations: Sequence[dict], tokenizer, *, num_frames: int | None = None,
                  duration: float | None = None, template: str = "qwen_2",
                  system_prompt: str = DEFAULT_SYSTEM_PROMPT, max_length: int | None = None,
                  image_tokens: Sequence[int] | None = None,
                  tokens_per_frame: int = VISUAL_TOKENS_PER_FRAME) -> dict:
  """One LLaVA-format record as training arrays: {"input_ids": int32 (L,), "labels": int32 (L,)}.

  conversations: `[{"from": "human"|"gpt", "value": str}, ...]`, alternating, `<image>` once in the first human
    turn for a video sample and nowhere for a text-only one.
  num_frames: the number of sampled frames T for a video sample (None: text-only). The `<image>` becomes
    `tokens_per_frame * T` copies of VIDEO_TOKEN_ID, labelled IGNORE_INDEX.
  duration: seconds, for the time message; None leaves the message out (the reference's `time_msg=None`).
  template: "qwen_2" (stages 2-4) or "plain" (stage 1: caption only, no system prompt, no time message).
  max_length: right-truncate to this many tokens as the reference does; SampleTooLongError when the visual span
    itself does not fit.
  tokens_per_frame: placeholders a frame (the model's tokens_per_clip / clip_frames; the reference's 16).
  image_tokens: for an image sample (instead of num_frames), each image's visual token count; the j-th
    `<image>` of the conversation becomes the j-th image's placeholders. A lone tag moves to the front of its turn
    as for a video, with no time message (the reference's preprocess_multimodal with msg="").
  """
  if template not in TEMPLATES:
    raise ValueError(f"unknown template {template!r}; expected one of {TEMPLATES}")
  turns = _check_conversations(conversations)
  has_video = num_frames is not None
  if has_video:
    _check_num_frames(num_frames)
  elif duration is not None:
    raise ValueError(f"duration={duration} given without num_frames: a time message needs a video")
  if template == "qwen_2" and turns[0]["from"] != "human":
    turns = turns[1:]  # preprocess_qwen drops a leading non-human turn
    if not turns:
      raise ValueError("conversation has no human turn after its leading gpt turn")
  _check_alternation(turns)
  if image_tokens is not None:
    visual_counts = _check_image_sample(turns, image_tokens, has_video, template)
  else:
    _check_image_tags(turns, has_video)
    visual_counts = [tokens_per_frame * num_frames] if has_video else []

  if template == "plain":
    pieces, masked = _plain_pieces(turns, bool(visual_counts))
  else:
    if visual_counts:
      msg = time_message(duration, num_frames) if duration is not None else ""
      turns = _insert_time_message(turns, msg)
    pieces, masked = _qwen_pieces(turns, system_prompt)

  keep = _special_ids(tokenizer) if template == "qwen_2" else set()
  input_ids, labels, tags = [], [], 0
  for text, is_masked in zip(pieces, masked):
    chunks = text.split(IMAGE_TAG)  # tokenizer_image_token: text around <image> is tokenized separately
    for j, chunk in enumerate(chunks):
      if j:
        num_visual, tags = visual_counts[tags], tags + 1
        input_ids += [VIDEO_TOKEN_ID] * num_visual
        labels += [IGNORE_INDEX] * num_visual
      ids = tokenizer.encode(chunk) if chunk else []
      input_ids += ids
      labels += [t if (not is_masked or t in keep) else IGNORE_INDEX for t in ids]

  input_ids = np.asarray(input_ids, np.int32)
  labels = np.asarray(labels, np.int32)
  if max_length is not None and len(input_ids) > max_length:
    visual = np.flatnonzero(input_ids == VIDEO_TOKEN_ID)
    if visual.size and visual[-1] >= max_length:
      raise SampleTooLongError(
        f"sample is {len(input_ids)} tokens and its {visual.size}-token visual span "
        f"({'images' if image_tokens is not None else f'{tokens_per_frame} x {num_frames} frames'}) ends "
        f"at token {visual[-1] + 1}, past max_length={max_length}: visual tokens cannot be truncated")
    input_ids, labels = input_ids[:max_length], labels[:max_length]
  return {"input_ids": input_ids, "labels": labels}


def inference_prompt(question: str, tokenizer, *, num_frames: int | None = None, duration: float | None = None,
                     system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> np.ndarray:
  """The HF `chat()` prompt as int32 ids, with ONE VIDEO_TOKEN_ID where the video goes (the model expands it).

  `<|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n<image>\\n{time_msg.strip()} {question}<|im_end|>\\n
  <|im_start|>assistant\\n`. Without num_frames the user turn is the bare question; without duration it is
  `<image>\\n{question}`.
  """
  if not isinstance(question, str):
    raise ValueError(f"question must be a string, got {type(question).__name__}")
  if IMAGE_TAG in question:
    raise ValueError(f"question contains {IMAGE_TAG!r}; the video placeholder is added by inference_prompt")
  if num_frames is None:
    if duration is not None:
      raise ValueError(f"duration={duration} given without num_frames: a time message needs a video")
    user = question
  else:
    _check_num_frames(num_frames)
    user = IMAGE_TAG + "\n"
    if duration is not None:
      user += time_message(duration, num_frames).strip() + " "
    user += question
  prompt = (f"<|im_start|>system\n{system_prompt}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
            f"<|im_start|>assistant\n")
  return tokenize_image_prompt(prompt, tokenizer)


def tokenize_image_prompt(prompt: str, tokenizer) -> np.ndarray:
  """The reference's tokenizer_image_token: each piece between `<image>` tags tokenized alone, each tag one
  VIDEO_TOKEN_ID."""
  ids = []
  for j, chunk in enumerate(prompt.split(IMAGE_TAG)):
    if j:
      ids.append(VIDEO_TOKEN_ID)
    ids += tokenizer.encode(chunk) if chunk else []
  return np.asarray(ids, np.int32)


# ---------------------------------------------------------------------------------------------------------------
# The templates: each returns the text pieces in order and whether each piece is masked.

def _qwen_pieces(turns, system_prompt):
  pieces = [f"<|im_start|>system\n{system_prompt}<|im_end|>\n"]
  masked = [True]
  for turn in turns:
    role = _ROLES[turn["from"]]
    pieces.append(f"<|im_start|>{role}\n{turn['value']}<|im_end|>\n")
    masked.append(role == "user")
  return pieces, masked


def _plain_pieces(turns, has_video):
  if not has_video:
    raise ValueError("the plain template captions a video: it needs num_frames and <image> in the human turn")
  if len(turns) != 2:
    raise ValueError(f"the plain template takes one human turn and one gpt caption, got {len(turns)} turns")
  # The first turn is replaced by the bare tag; its text (question, time message) is dropped.
  caption = turns[1]["value"].replace(_NOISE_MARKER, "")
  return [IMAGE_TAG, caption + "\n"], [True, False]


def _insert_time_message(turns, msg):
  """preprocess_multimodal: move a lone <image> to the front of its turn, then append the time message to it."""
  replacement = IMAGE_TAG + (msg.rstrip() + " " if msg.rstrip() else "")
  out = []
  for turn in turns:
    value = turn["value"]
    if value.count(IMAGE_TAG) == 1 and not value.startswith(IMAGE_TAG):
      value = (IMAGE_TAG + "\n" + value.replace(IMAGE_TAG, "").strip()).strip()
    value = value.replace(IMAGE_TAG, replacement).replace(_NOISE_MARKER, "")
    out.append({"from": turn["from"], "value": value})
  return out


def _special_ids(tokenizer):
  """The ids preprocess_qwen unmasks everywhere: "\\n" (198), <|im_start|>, <|im_end|>."""
  ids = set()
  for text in ("\n", "<|im_start|>", "<|im_end|>"):
    enc = tokenizer.encode(text)
    if len(enc) != 1:
      raise ValueError(f"tokenizer encodes {text!r} as {enc}; the qwen_2 template needs a single token")
    ids.add(enc[0])
  return ids


# ---------------------------------------------------------------------------------------------------------------
# Checks on user input.

def _check_num_frames(num_frames):
  if isinstance(num_frames, bool) or not isinstance(num_frames, (int, np.integer)) or num_frames < 1:
    raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}")


def _check_conversations(conversations):
  if not isinstance(conversations, (list, tuple)) or not conversations:
    raise ValueError(f"conversations must be a non-empty list of turns, got {conversations!r}")
  for i, turn in enumerate(conversations):
    if not isinstance(turn, dict) or turn.get("from") not in _ROLES or not isinstance(turn.get("value"), str):
      raise ValueError(f"conversation turn {i} must be {{'from': 'human'|'gpt', 'value': str}}, got {turn!r}")
  return list(conversations)


def _check_alternation(turns):
  for i, turn in enumerate(turns):
    expected = "human" if i % 2 == 0 else "gpt"
    if turn["from"] != expected:
      raise ValueError(f"conversation does not alternate human/gpt: turn {i} is from {turn['from']!r}, "
                       f"expected {expected!r}")


def _check_image_tags(turns, has_video):
  counts = [t["value"].count(IMAGE_TAG) for t in turns]
  if not has_video:
    if sum(counts):
      raise ValueError(f"{IMAGE_TAG} appears in turn {next(i for i, c in enumerate(counts) if c)} "
                       f"but no video was given (num_frames=None)")
    return
  if counts[0] != 1 or sum(counts) != 1:
    raise ValueError(f"a video sample needs exactly one {IMAGE_TAG}, in the first human turn; found {counts[0]} "
                     f"there and {sum(counts) - counts[0]} elsewhere")


def _check_image_sample(turns, image_tokens, has_video, template):
  """The visual token counts of an image sample, once its tags and images agree."""
  if has_video:
    raise ValueError("a sample takes num_frames (a video) or image_tokens (images), not both")
  counts = [int(n) for n in image_tokens]
  if not counts or any(n < 1 for n in counts):
    raise ValueError(f"image_tokens must be one positive count per image, got {list(image_tokens)}")
  tags = sum(t["value"].count(IMAGE_TAG) for t in turns)
  if template == "plain":
    if len(counts) != 1:
      raise ValueError(f"the plain template captions one image; this sample has {len(counts)}")
    return counts
  if tags != len(counts):
    raise ValueError(f"the conversation holds {tags} {IMAGE_TAG} tag(s) for {len(counts)} image(s); each image "
                     "needs its own tag")
  return counts
