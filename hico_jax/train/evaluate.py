"""Held-out question answering: accuracy per task, next to chance.

Each held-out record's first question and answer are laid out exactly as in training; the model is
teacher-forced and a sample counts as correct when its greedy choice equals the reference answer at every
answer token (the reference's NIAH scoring rule). Chance is one over the number of distinct answers the
task has in the held-out set, the accuracy of a constant or uniformly random guess.
"""

from __future__ import annotations

import collections
import math

import jax
import jax.numpy as jnp
import numpy as np

from hico_jax.data import records, shards, text, video
from hico_jax.data.tokenizer import load_tokenizer
from hico_jax.models.hico import HiCo
from hico_jax.train.step import normalize_frames


def _bucket(length: int, multiple: int = 128) -> int:
  return int(math.ceil(length / multiple) * multiple)


def evaluate_qa(model: HiCo, params, eval_config, data_config, mesh=None) -> dict:
  """{task: {"accuracy", "chance", "count"}} over eval_config.shards (at most eval_config.max_per_task each)."""
  tokenizer = load_tokenizer(data_config.tokenizer_dir)
  source = shards.MixedSource(eval_config.shards)
  max_per_task = eval_config.get("max_per_task", 10**9)
  size, frame_budget = data_config.image_size, data_config.frame_budget

  @jax.jit
  def greedy(params, ids, frames):
    logits, _ = model.apply({"params": params}, ids, normalize_frames(frames)[:, None])
    return jnp.argmax(logits, axis=-1)

  correct, seen, answers = collections.Counter(), collections.Counter(), collections.defaultdict(set)
  for i in range(len(source)):
    header, media = records.decode_record(source[i])
    task = header["dataset"]
    if seen[task] >= max_per_task:
      continue
    question, answer = header["conversations"][0], header["conversations"][1]
    answers[task].add(answer["value"].strip())
    try:
      raw, info = video.decode_frames(media, mode=data_config.sampling, num_frames=data_config.num_frames,
                                      min_frames=data_config.min_frames, max_frames=data_config.max_frames,
                                      start=header.get("start"), end=header.get("end"))
    except ValueError:
      continue
    frames = video.resize_frames(raw, size)[:frame_budget]
    sample = text.encode_sample([question, answer], tokenizer, num_frames=len(frames), duration=info["duration"],
                                template=data_config.template)
    ids = sample["input_ids"]
    answer_ids = np.asarray(tokenizer.encode(answer["value"]), np.int32)
    end = len(ids) - 2                                   # ... {answer}<|im_end|>\n
    if data_config.template == "plain":
      end = len(ids) - 1
    start = end - len(answer_ids)
    if not np.array_equal(ids[start:end], answer_ids):
      raise ValueError(f"eval record {header['id']}: answer tokens not found where the template puts them")
    padded = np.zeros((1, _bucket(len(ids))), np.int32)
    padded[0, :len(ids)] = ids
    clip = np.zeros((1, frame_budget, size, size, 3), np.uint8)
    clip[0, :len(frames)] = frames
    predicted = np.asarray(greedy(params, jnp.asarray(padded), jnp.asarray(clip)))[0]
    correct[task] += bool(np.all(predicted[start - 1:end - 1] == ids[start:end]))
    seen[task] += 1
  return {task: {"accuracy": correct[task] / seen[task], "chance": 1.0 / max(len(answers[task]), 1),
                 "count": seen[task]} for task in sorted(seen)}


def format_results(results: dict) -> str:
  lines = [f"{'task':24s} {'accuracy':>9s} {'chance':>8s} {'n':>5s}"]
  for task, r in results.items():
    lines.append(f"{task:24s} {100 * r['accuracy']:8.1f}% {100 * r['chance']:7.1f}% {r['count']:5d}")
  return "\n".join(lines)
