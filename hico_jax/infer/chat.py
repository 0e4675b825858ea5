"""Chat with a video the way the reference's HF `chat()` does it, for a loaded model.

The reference (`modeling_videochat_flash.py`, `VideoChatFlashQwenForCausalLM.chat`, and the `qwen_2` template of
`conversation.py`; shared/reference/videochat_flash.md §5) does, per question:

1. `load_video(video_path, max_num_frames=512)`: dynamic_fps1 sampling (about 1 fps in whole 4-frame clips) with
   a floor of 64 frames and a cap of `max_num_frames`, and the "short" time message
   `"\\nThe video lasts for {vlen / fps:.2f} seconds, and {T} frames are uniformly sampled from it. "`.
2. The prompt, `conv_qwen` (CHATML) with the system turn `<|im_start|>system\\nYou are a helpful assistant.` and each
   turn `{role}\\n{content}<|im_end|>\\n`, roles `<|im_start|>user` / `<|im_start|>assistant`, then the open
   assistant header `<|im_start|>assistant\\n`. The first user turn is `<image>\\n{time_msg.strip()} {question}`;
   with a non-empty `chat_history` the history turns come first, verbatim, and the new user turn is the bare
   question (the video placeholder stays in the first turn only).
3. `tokenizer_image_token` (`text.tokenize_image_prompt`): the text around `<image>` is tokenized piece by
   piece and the placeholder becomes IMAGE_TOKEN_INDEX (-200, our `VIDEO_TOKEN_ID`).
4. `generate(...)` until `<|im_end|>` (a stopping keyword) or the model's eos; the answer is the generated text
   decoded with `skip_special_tokens=True`, stripped, a trailing `<|im_end|>` cut off.
5. The history gets `{"role": "<|im_start|>user", "content": user_turn}` and the assistant's answer *text*: a
   later turn re-tokenizes that text (not the generated ids), as the reference does.

The generation settings are the caller's (`generation_config` in the reference); greedy is the default here.

Unlike the reference, which loads and encodes the video again for every question, a conversation encodes its
video once (`VideoChat` at construction) and every turn reuses the visual tokens; the frames are resized as
they are decoded (`read_video(..., size=)`), so a long video is never held at full size. A follow-up question
whose prompt starts with the last prompt (the history kept, no visual dropout) also reuses that prompt's KV
cache: only the last answer and the new question run through the decoder, not the video's tokens again.

Two numbers were not read from the reference's own files (the HF `mm_utils.load_video` is not in our sources,
see §5): the 64-frame floor is what `load_video` passes according to a third-party harness that calls the HF
module's sampler with "the same arguments load_video passes"; the model card's example (as copies of it show)
generates greedily with max_new_tokens=1024, the tool's default.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np
from tqdm import tqdm

from hico_jax.tokens import VIDEO_TOKEN_ID
from hico_jax.data import image as image_io, text, video as video_io

# chat()'s default `max_num_frames`, and the frame floor its `load_video` passes to the dynamic_fps1 sampler.
REFERENCE_MAX_NUM_FRAMES = 512
REFERENCE_MIN_NUM_FRAMES = 64
CLIP_FRAMES = 4
# conv_qwen: the roles carry the turn marker, and chat_history stores them that way.
USER, ASSISTANT = "<|im_start|>user", "<|im_start|>assistant"
STOP = "<|im_end|>"
# Prompts are left-padded (attention mask 0) to a multiple of this many tokens: generation compiles once per
# prompt length, and each turn of a conversation is longer than the last, so without buckets every turn
# would compile the model again (tens of seconds for a 7B). A padded row generates as it would alone.
PROMPT_BUCKET = 256
# A follow-up question's new tokens (the last answer and the question) are padded to a multiple of this: they
# run against the cached prompt, and their (new x cached) scores are the step's largest buffer.
CONTINUATION_BUCKET = 64
# A decode faster than this shows no progress bar.
PROGRESS_DELAY_S = 3.0


@dataclasses.dataclass(frozen=True)
class Video:
  """The sampled frames of one video file: what `load_video` gives `chat()`."""
  frames: np.ndarray      # (T, H, W, 3) uint8 RGB, T a multiple of 4 (H = W = the size asked for, if any)
  duration: float         # seconds of the whole video (frames / fps), as the time message states it
  indices: np.ndarray     # (T,) the frames chosen, into the decoded stream
  source: str

  @property
  def num_frames(self) -> int:
    return len(self.frames)

  def time_message(self) -> str:
    return text.time_message(self.duration, self.num_frames)


@dataclasses.dataclass(frozen=True)
class Turn:
  question: str
  answer: str
  prompt_ids: np.ndarray  # (L,) int32, one VIDEO_TOKEN_ID where the video goes
  answer_ids: np.ndarray  # (N,) int32, the generated ids before the first stop id
  cached_ids: int = 0     # how many of prompt_ids came from the last prompt's KV cache instead of a prefill


def check_frame_limits(max_num_frames: int, min_num_frames: int) -> None:
  """A one-line error for frame limits `read_video` cannot use, before anything is decoded or loaded."""
  for name, value in (("max_num_frames", max_num_frames), ("min_num_frames", min_num_frames)):
    # A count off whole clips would reach the vision tower as a partial clip, which the reference cannot take.
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < CLIP_FRAMES \
        or value % CLIP_FRAMES:
      raise ValueError(f"{name} must be a positive multiple of {CLIP_FRAMES} (frames per clip), got {value!r}")
  if min_num_frames > max_num_frames:
    raise ValueError(f"min_num_frames={min_num_frames} is above max_num_frames={max_num_frames}")


def read_video(path: str | os.PathLike, *, max_num_frames: int = REFERENCE_MAX_NUM_FRAMES,
               min_num_frames: int = REFERENCE_MIN_NUM_FRAMES, size: int | None = None,
               progress: bool = False) -> Video:
  """Decodes the frames `chat()` samples from a video file, each resized to size x size as it is decoded
  (the model's `config.vit.image_size`; None keeps the file's size). `progress`: a bar on stderr when the
  decode takes more than a few seconds. VideoDecodeError names a file that does not decode."""
  check_frame_limits(max_num_frames, min_num_frames)
  with tqdm(desc=f"decoding {os.path.basename(os.fspath(path))}", unit="frame", delay=PROGRESS_DELAY_S,
            leave=False, disable=not progress) as bar:
    def advance(passed: int, expected: int | None):
      bar.total = expected
      bar.update(passed - bar.n)
    frames, info = video_io.decode_frames(path, mode="dynamic_fps1", min_frames=min_num_frames,
                                          max_frames=max_num_frames, clip_frames=CLIP_FRAMES, size=size,
                                          progress=advance if progress else None)
  return Video(frames=frames, duration=float(info["duration"]), indices=np.asarray(info["indices"]),
               source=os.fspath(path))


def first_user_turn(question: str, time_msg: str) -> str:
  """The first user turn's content: the video placeholder, the time message and the question."""
  return f"{text.IMAGE_TAG}\n{time_msg.strip()} {question}"


def prompt_text(history: Sequence[dict], user_turn: str, system_prompt: str = text.DEFAULT_SYSTEM_PROMPT) -> str:
  """conv_qwen's `get_prompt()` for the history turns, the new user turn and the open assistant turn."""
  parts = [f"<|im_start|>system\n{system_prompt}{STOP}\n"]
  for msg in (*history, {"role": USER, "content": user_turn}):
    parts.append(f"{msg['role']}\n{msg['content']}{STOP}\n")
  parts.append(f"{ASSISTANT}\n")
  return "".join(parts)


def decode_answer(new_ids, tokenizer, stop_ids: Sequence[int]) -> tuple[np.ndarray, str]:
  """(ids before the first stop id, the reference's answer text)."""
  new_ids = np.asarray(new_ids, np.int32).reshape(-1)
  stops = np.flatnonzero(np.isin(new_ids, np.asarray(list(stop_ids), np.int32)))
  ids = new_ids[:stops[0]] if stops.size else new_ids
  answer = tokenizer.decode(ids, skip_special_tokens=True).strip()
  if answer.endswith(STOP):
    answer = answer[:-len(STOP)]
  return ids, answer.strip()


def check_video_model(model) -> None:
  if not getattr(model, "is_video_model", False):
    raise ValueError("the model is a plain Qwen2 language model without a vision tower (no mm_vision_tower in "
                     "its config.json); chatting with a video needs a VideoChat-Flash checkpoint")


class _Conversation:
  """A conversation with a loaded VideoChat-Flash model about media placed once, in the first user turn: the
  prompt (chat()'s conv_qwen with its history), left padding to prompt buckets, generation and the answer.
  Subclasses say what the first turn holds (`_first_turn`, `_placeholders`) and how the media reach
  `generate` (`_media`)."""
  what = "media"

  def __init__(self, model, tokenizer, *, system_prompt: str, prompt_bucket: int):
    self.model, self.tokenizer, self.system_prompt = model, tokenizer, system_prompt
    self.prompt_bucket = prompt_bucket
    # chat() stops on the keyword `<|im_end|>` besides whatever eos the checkpoint's generation config names.
    self.stop_ids = tuple(dict.fromkeys([*model.eos_ids, tokenizer.eos_id]))
    self.history: list[dict] = []
    # The last prompt's KV cache; kept only where it can serve the next turn (no visual dropout).
    self._prompt_cache = None
    self._keeps_cache = getattr(model, "dropout", None) is None

  def prompt_ids(self, question: str, *, keep_history: bool = True) -> tuple[np.ndarray, str]:
    """(prompt ids, the user turn as the history records it) for `question` after this conversation."""
    if not isinstance(question, str) or not question.strip():
      raise ValueError(f"question must be a non-empty string, got {question!r}")
    if text.IMAGE_TAG in question:
      raise ValueError(f"question contains {text.IMAGE_TAG!r}, the {self.what} placeholder; the {self.what} is "
                       "placed once, in the first turn")
    history = self.history if keep_history else []
    user_turn = question if history else self._first_turn(question)
    ids = text.tokenize_image_prompt(prompt_text(history, user_turn, self.system_prompt), self.tokenizer)
    found = int(np.sum(ids == VIDEO_TOKEN_ID))
    if found != self._placeholders:
      raise ValueError(f"the conversation holds {found} {text.IMAGE_TAG!r} tags for {self._placeholders} "
                       f"{self.what} placeholder(s) (an earlier answer wrote one): start a new conversation")
    return ids, user_turn

  def ask(self, question: str, *, max_new_tokens: int = 1024, temperature: float = 0.0, top_p: float = 1.0,
          seed: int = 0, keep_history: bool = True) -> Turn:
    """Answers `question`; with keep_history it follows the conversation so far (chat()'s chat_history),
    without it it starts afresh (chat_history=None). Either way the turn is added to the history."""
    ids, user_turn = self.prompt_ids(question, keep_history=keep_history)
    cached = self._prompt_cache
    reuse = (keep_history and cached is not None and len(ids) > len(cached.ids)
             and np.array_equal(ids[:len(cached.ids)], cached.ids))
    new = ids[len(cached.ids):] if reuse else ids
    padding = -len(new) % (CONTINUATION_BUCKET if reuse else self.prompt_bucket)
    padded = np.concatenate([np.full(padding, self.model.pad_id, np.int32), new])   # masked: any id does
    mask = (np.arange(len(padded)) >= padding).astype(np.int32)
    out = self.model.generate(padded[None], attention_mask=mask[None], max_new_tokens=max_new_tokens,
                              temperature=temperature, top_p=top_p, seed=seed, eos_ids=self.stop_ids,
                              **({"prefix": cached} if reuse else self._media()),
                              return_cache=self._keeps_cache)
    new_ids, self._prompt_cache = out if self._keeps_cache else (out, None)
    answer_ids, answer = decode_answer(new_ids[0], self.tokenizer, self.stop_ids)
    self.history = (self.history if keep_history else []) + [
        {"role": USER, "content": user_turn}, {"role": ASSISTANT, "content": answer}]
    return Turn(question=question, answer=answer, prompt_ids=ids, answer_ids=answer_ids,
                cached_ids=len(cached.ids) if reuse else 0)


class VideoChat(_Conversation):
  """One video and a conversation about it with a loaded VideoChat-Flash model (`hico_jax.from_pretrained`).
  The video is encoded once, here (`chunk_clips` clips at a time: CausalLM.encode_video), and every question
  reuses its visual tokens."""
  what, _placeholders = "video", 1

  def __init__(self, model, tokenizer, video: Video, *, system_prompt: str = text.DEFAULT_SYSTEM_PROMPT,
               prompt_bucket: int = PROMPT_BUCKET, chunk_clips: int | None = None, progress: bool = False):
    check_video_model(model)
    super().__init__(model, tokenizer, system_prompt=system_prompt, prompt_bucket=prompt_bucket)
    self.video = video
    size = model.config.vit.image_size
    frames = video.frames if video.frames.shape[1:3] == (size, size) else video_io.resize_frames(video.frames, size)
    # Encoded once: every turn of the reference reloads and re-encodes the same frames.
    self.visual_tokens = model.encode_video(frames, chunk_clips=chunk_clips, progress=progress)[None]  # (1, 16·T, H)

  def _first_turn(self, question: str) -> str:
    return first_user_turn(question, self.video.time_message())

  def _media(self) -> dict:
    return {"visual_tokens": self.visual_tokens}


def image_user_turn(question: str, num_images: int) -> str:
  """The first user turn about still images, as training's preprocess_multimodal shapes one: each image's
  placeholder on its own line before the question (a lone `<image>` goes to the front, then a newline)."""
  return f"{text.IMAGE_TAG}\n" * num_images + question


class ImageChat(_Conversation):
  """A conversation about one or several still images (one: anyres_nopad tiles; several: 64 tokens each). The
  reference's HF chat() takes only videos; this builds its prompt the same way, with the image turn training
  uses and no time message."""
  what = "image"

  def __init__(self, model, tokenizer, images: Sequence, *, system_prompt: str = text.DEFAULT_SYSTEM_PROMPT,
               prompt_bucket: int = PROMPT_BUCKET):
    if not getattr(model, "is_video_model", False):
      raise ValueError("the model is a plain Qwen2 language model without a vision tower (no mm_vision_tower in "
                       "its config.json); chatting about an image needs a VideoChat-Flash checkpoint")
    if not images:
      raise ValueError("ImageChat needs at least one image")
    super().__init__(model, tokenizer, system_prompt=system_prompt, prompt_bucket=prompt_bucket)
    self.images = [image_io.as_pil(im) for im in images]      # decoded once, before any turn
    self._placeholders = len(self.images)

  def _first_turn(self, question: str) -> str:
    return image_user_turn(question, len(self.images))

  def _media(self) -> dict:
    return {"images": [self.images]}
