"""Needle in a video haystack, single- and multi-hop: the reference's `xtuner-eval_niah/vision_niah`.

The haystack is a long video at one frame a second (every round(fps)-th frame), encoded once: each 4-frame
clip's 64 merged, projected tokens, read as 16 tokens per frame, so a depth can fall between any two frames.
A needle is an image repeated 4x and encoded as one clip: 64 tokens. Frames and needles are padded to a
square of the mean colour before the resize (the reference's `image_aspect_ratio = "pad"`). A question's input is the reference's, embedding by embedding:

  preprompt + frames (the haystack with the needles placed in it) + question + postprompt + answer

scored teacher-forced, as the reference scores it: correct when the argmax over the answer's positions,
decoded, lowercased and stripped of "(" and ")", equals the answer. The decoder runs without visual dropout
(the reference feeds these embeddings to a stock Qwen2ForCausalLM), and only the answer's positions reach the
output head: at 10,000 frames a prompt is 160,000 tokens, and logits over all of them would not fit.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Iterable, Iterator, Sequence

import cv2

import jax
import jax.numpy as jnp
import numpy as np

from hico_jax.data import video as video_lib
from hico_jax.models import hico, qwen2

# The reference's "qwen2" prompt template: no time prompt, and no newline between the frames and the question.
PREPROMPT = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
POSTPROMPT = "<|im_end|>\n<|im_start|>assistant\n"
TOKENS_PER_FRAME = 16     # 64 tokens a 4-frame clip
# The reference's process_images with image_aspect_ratio "pad" fills with the processor's mean, int(x * 255).
PAD_COLOUR = tuple(int(x * 255) for x in video_lib.IMAGENET_MEAN)
# The fields of the reference's needle records.
NEEDLE_KEYS = {"single_hop": ("question", "answer", "image"),
               "multi_hop": ("images", "question1", "answer1", "question2", "answer2")}


def expand_to_square(frames_uint8: np.ndarray) -> np.ndarray:
  """(T, H, W, 3) -> (T, S, S, 3), S = max(H, W): each frame centred on a square of PAD_COLOUR (LLaVA's
  expand2square, which offsets the short side by (S - side) // 2)."""
  frames = np.asarray(frames_uint8)
  height, width = frames.shape[1:3]
  if height == width:
    return frames
  side = max(height, width)
  out = np.empty((len(frames), side, side, 3), np.uint8)
  out[:] = np.asarray(PAD_COLOUR, np.uint8)
  top, left = (side - height) // 2, (side - width) // 2
  out[:, top:top + height, left:left + width] = frames
  return out


def _bucket(length: int, multiple: int) -> int:
  return -(-length // multiple) * multiple


class Evaluator:
  """A VideoChat-Flash model's pieces the evaluation needs: clip encoding, text embedding, and the decoder's
  prediction at given positions of an embedded sequence. `llm_config` may differ from the model's in how it
  computes (attention_impl="cudnn" for long prompts on a GPU), not in its weights."""

  def __init__(self, config: hico.HiCoConfig, params, tokenizer, llm_config: qwen2.Qwen2Config | None = None,
               length_multiple: int = 1024):
    self.config, self.tokenizer, self.length_multiple = config, tokenizer, length_multiple
    self.params = params
    self._text = {}      # text -> embeddings: the prompt pieces and each question come back at every grid point
    llm = qwen2.Qwen2ForCausalLM(llm_config or config.llm)     # no dropout: the reference's stock decoder
    model = hico.HiCo(config)
    self._encode = jax.jit(lambda p, clips: model.apply({"params": p}, clips, method=hico.HiCo.encode_video))
    self._embed = jax.jit(lambda p, ids: llm.apply({"params": p}, ids, method=qwen2.Qwen2ForCausalLM.embed))

    @jax.jit
    def predict(p, embeddings, where):
      """argmax ids (1, K) at the positions `where` (1, K) of `embeddings` (1, L, D)."""
      _, aux = llm.apply({"params": p}, embeddings=embeddings, return_logits=False)
      hidden = jnp.take_along_axis(aux["hidden"], where[..., None], axis=1)
      kernel = llm.apply({"params": p}, method=qwen2.Qwen2ForCausalLM.head_kernel)
      return jnp.argmax(jnp.einsum("bkd,dv->bkv", hidden, kernel, preferred_element_type=jnp.float32), -1)

    self._predict = predict

  # ---------------------------------------------------------------------------------------------------------
  # Visual tokens
  # ---------------------------------------------------------------------------------------------------------

  def encode_frames(self, frames_uint8: np.ndarray) -> np.ndarray:
    """(T, H, W, 3) uint8 frames, T a multiple of 4 -> (T, 16, D) visual tokens, clip by clip."""
    if self.config.tokens_per_clip != 4 * TOKENS_PER_FRAME:
      raise ValueError(f"NIAH reads a clip's tokens as {TOKENS_PER_FRAME} a frame; this model merges a clip to "
                       f"{self.config.tokens_per_clip}")
    frames = video_lib.preprocess(expand_to_square(frames_uint8), self.config.vit.image_size)
    tokens = self._encode(self.params, jnp.asarray(frames)[None, None])
    return np.asarray(tokens).reshape(len(frames), TOKENS_PER_FRAME, -1)

  def encode_haystack(self, chunks: Iterable[np.ndarray], max_frames: int) -> np.ndarray:
    """(N, 16, D) for the first N <= max_frames frames of `chunks` (uint8 arrays, each a multiple of 4
    frames), whole clips only."""
    out, count = [], 0
    for chunk in chunks:
      chunk = chunk[:max_frames - count]
      chunk = chunk[:len(chunk) // 4 * 4]
      if len(chunk):
        out.append(self.encode_frames(chunk))
        count += len(chunk)
      if count >= max_frames:
        break
    if not out:
      raise ValueError("the haystack gave no whole 4-frame clip")
    return np.concatenate(out)

  def encode_needle(self, image_uint8: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 image -> (64, D): the image repeated 4x and encoded as one clip, as the reference's
    needles are made."""
    image = np.asarray(image_uint8)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
      raise ValueError(f"a needle image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    return self.encode_frames(np.repeat(image[None], 4, axis=0)).reshape(4 * TOKENS_PER_FRAME, -1)

  # ---------------------------------------------------------------------------------------------------------
  # Scoring
  # ---------------------------------------------------------------------------------------------------------

  def text_embeddings(self, text: str) -> np.ndarray:
    if text not in self._text:
      ids = self.tokenizer.encode(text)
      self._text[text] = np.asarray(self._embed(self.params["llm"], jnp.asarray([ids], jnp.int32)))[0]
    return self._text[text]

  def answer_correct(self, frames: np.ndarray, question: str, answer: str) -> tuple[bool, str]:
    """(correct, predicted text) for one question over `frames` (F, D) of visual tokens."""
    answer_ids = self.tokenizer.encode(answer)
    pieces = [self.text_embeddings(PREPROMPT), frames, self.text_embeddings(question),
              self.text_embeddings(POSTPROMPT), self.text_embeddings(answer)]
    sequence = np.concatenate([p.astype(pieces[0].dtype) for p in pieces])
    prompt = len(sequence) - len(answer_ids)
    # Padding after the answer: causal attention keeps it out of every position that is scored, and a few
    # bucketed lengths compile a few programs instead of one per haystack length.
    padded = np.zeros((_bucket(len(sequence), self.length_multiple), sequence.shape[1]), sequence.dtype)
    padded[:len(sequence)] = sequence
    where = np.full(_bucket(len(answer_ids), 8), prompt - 1, np.int32)
    where[:len(answer_ids)] = np.arange(prompt - 1, prompt - 1 + len(answer_ids))   # t predicts t + 1
    predicted = np.asarray(self._predict(self.params["llm"], jnp.asarray(padded)[None], jnp.asarray(where)[None]))
    text = self.tokenizer.decode(predicted[0, :len(answer_ids)]).lower()
    return text.replace("(", "").replace(")", "") == self.tokenizer.decode(answer_ids).lower(), text


# -------------------------------------------------------------------------------------------------------------
# Where the needles go
# -------------------------------------------------------------------------------------------------------------


def single_hop_frames(haystack: np.ndarray, needle: np.ndarray, num_frames: int, depth: float) -> np.ndarray:
  """haystack[:int(depth·N)] + needle + haystack[int(depth·N):N], flattened to (tokens, D)."""
  _check_frames(haystack, num_frames)
  at = int(depth * num_frames)
  width = haystack.shape[-1]
  return np.concatenate([haystack[:at].reshape(-1, width), needle.reshape(-1, width),
                         haystack[at:num_frames].reshape(-1, width)])


def multi_hop_frames(haystack: np.ndarray, needles: Sequence[np.ndarray], num_frames: int) -> np.ndarray:
  """Needle 0 first; needle i >= 1 after haystack frames [int((i-1)·N/(k-1)), int(i·N/(k-1))), so the last
  needle ends the sequence (the reference's placement of a chain of k needles)."""
  _check_frames(haystack, num_frames)
  if len(needles) < 2:
    raise ValueError(f"a multi-hop chain needs at least 2 images, got {len(needles)}")
  width = haystack.shape[-1]
  interval = num_frames / (len(needles) - 1)
  pieces = [needles[0].reshape(-1, width)]
  for i in range(1, len(needles)):
    pieces += [haystack[int((i - 1) * interval):int(i * interval)].reshape(-1, width), needles[i].reshape(-1, width)]
  return np.concatenate(pieces)


def haystack_chunks(path: str, chunk_frames: int = 64) -> Iterator[np.ndarray]:
  """A long video at one frame a second as the reference samples its haystack (frames 0, r, 2r, ... with
  r = round(fps)), `chunk_frames` uint8 RGB frames at a time: a 10,000-second video at full resolution would
  not fit in memory whole. Read straight through (grab skips a frame without decoding its pixels)."""
  capture = cv2.VideoCapture(path)
  try:
    fps = capture.get(cv2.CAP_PROP_FPS)
    if not capture.isOpened() or not fps > 0:
      raise video_lib.VideoDecodeError(f"haystack video {path}: cannot be opened or has no frame rate")
    step = max(round(fps), 1)
    frames, index = [], 0
    while capture.grab():
      if index % step == 0:
        ok, frame = capture.retrieve()
        if not ok:
          raise video_lib.VideoDecodeError(f"haystack video {path}: frame {index} does not decode")
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
        if len(frames) == chunk_frames:
          yield np.stack(frames)
          frames = []
      index += 1
    if frames:
      yield np.stack(frames)
  finally:
    capture.release()


def read_needles(path: str, kind: str, image_root: str) -> tuple[list, list]:
  """(the needle file's records, their RGB uint8 images: one per single-hop record, a list per multi-hop one),
  read as the reference reads them (cv2.imread, colour). A record without its fields, or an image that does
  not decode, is a one-line error."""
  with open(path, encoding="utf-8") as f:
    items = json.load(f)
  keys = NEEDLE_KEYS[kind]
  for i, item in enumerate(items):
    missing = [key for key in keys if key not in item]
    if missing:
      raise ValueError(f"{path} record {i} has no {missing} (a {kind.replace('_', '-')} record needs {list(keys)})")

  def image(name):
    frame = cv2.imread(os.path.join(image_root, name), cv2.IMREAD_COLOR)
    if frame is None:
      raise video_lib.VideoDecodeError(f"needle image {os.path.join(image_root, name)} does not decode")
    return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)

  if kind == "single_hop":
    return items, [image(item["image"]) for item in items]
  return items, [[image(name) for name in item["images"]] for item in items]


def _check_frames(haystack: np.ndarray, num_frames: int) -> None:
  if not 0 < num_frames <= len(haystack):
    raise ValueError(f"asked for {num_frames} haystack frames, the haystack has {len(haystack)}")


# -------------------------------------------------------------------------------------------------------------
# The sweeps, with the reference's result records
# -------------------------------------------------------------------------------------------------------------


def single_hop(evaluator: Evaluator, haystack: np.ndarray, needles: Sequence[np.ndarray], items: Sequence[dict],
               frame_counts: Sequence[int], depths: Sequence[float],
               log: Callable[[str], None] = lambda _: None) -> list[dict]:
  """items: the reference's single-hop records ({"question", "answer", ...}), needles[i] for items[i]."""
  results = []
  for num_frames in frame_counts:
    for depth in depths:
      hits = [evaluator.answer_correct(single_hop_frames(haystack, needle, num_frames, depth), item["question"],
                                       item["answer"])[0] for needle, item in zip(needles, items)]
      results.append({"Num. Frame": int(num_frames), "Frame Depth": round(float(depth) * 100, -1),
                      "Score": sum(hits) / len(hits)})
      log(str(results[-1]))
  return results


def multi_hop(evaluator: Evaluator, haystack: np.ndarray, chains: Sequence[Sequence[np.ndarray]],
              items: Sequence[dict], frame_counts: Sequence[int],
              log: Callable[[str], None] = lambda _: None) -> list[dict]:
  """items: the reference's multi-hop records ({"images", "question1" (caption), "answer1", "question2" (QA),
  "answer2"}), chains[i] the encoded images of items[i] in their order."""
  results = []
  for num_frames in frame_counts:
    caption, qa = [], []
    for chain, item in zip(chains, items):
      frames = multi_hop_frames(haystack, chain, num_frames)
      caption.append(evaluator.answer_correct(frames, item["question1"], item["answer1"])[0])
      qa.append(evaluator.answer_correct(frames, item["question2"], item["answer2"])[0])
    pairs = list(zip(caption, qa))
    results.append({
        "Num. Frame": int(num_frames),
        "Score": (sum(caption) + sum(qa)) / (2 * len(pairs)),
        "Caption Score": sum(caption) / len(pairs),
        "QA Score": sum(qa) / len(pairs),
        "Total question pair": len(pairs),
        "Both correct": pairs.count((True, True)),
        "Only cap correct": pairs.count((True, False)),
        "Only qa correct": pairs.count((False, True)),
        "Both wrong": pairs.count((False, False)),
    })
    log(str(results[-1]))
  return results
