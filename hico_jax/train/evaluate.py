"""Held-out question answering: accuracy per task, next to chance.

Two scores for each held-out record's first question:
  choice  the answer is one of `num_choices` candidates (the true one and distractors drawn from the other
          answers of the same task); the model picks the candidate it gives the highest log-likelihood,
          as multiple-choice video QA benchmarks are scored. Chance is 1 / num_choices.
  exact   teacher-forced, the greedy choice equals the reference at every answer token (the reference's
          NIAH rule). Chance is 1 / the number of distinct answers of the task.
The prompt is laid out exactly as in training. Video records take the sampled frames; image records (one
picture: anyres tiles; several: one padded tile each) the tiles and token layout of the training pipeline
(hico_jax.data.image_samples). Each task's result says which ("media"), and the table lists the image tasks
apart, with their own summary line.
"""

from __future__ import annotations

import collections
import math

import jax
import jax.numpy as jnp
import numpy as np

from hico_jax.data import image_samples, pipeline, text, tfds_longvid
from hico_jax.data.tokenizer import load_tokenizer
from hico_jax.models.hico import HiCo
from hico_jax.train import progress
from hico_jax.train.step import normalize_frames


def _bucket(length: int, multiple: int = 128) -> int:
  return int(math.ceil(length / multiple) * multiple)


def _answer_span(ids, answer: str, tokenizer, template: str) -> tuple[int, int]:
  """[start, end) of the answer's tokens in an encoded sample. qwen_2 ends "{answer}<|im_end|>\n", the
  special token keeping the answer's tokens apart; plain ends "{caption}\n" tokenised as one piece, so the
  newline can merge with the caption's last character (".\n" is one token) and is scored with it, as
  training supervises it."""
  if template == "plain":
    answer_ids, end = tokenizer.encode(answer + "\n"), len(ids)
  else:
    answer_ids, end = tokenizer.encode(answer), len(ids) - 2
  start = end - len(answer_ids)
  if not np.array_equal(ids[start:end], np.asarray(answer_ids, np.int32)):
    raise ValueError(f"the answer {answer!r} is not where the {template} template puts it")
  return start, end


def evaluate_qa(model: HiCo, params, eval_config, data_config, *, show_progress: bool = True) -> dict:
  """{task: {"choice", "choice_chance", "exact", "exact_chance", "count", "skipped"}} over
  eval_config.shards; "skipped" counts the records whose video did not decode. show_progress: a bar on
  stderr (progress.count_bar; the default's 700 questions take about a minute on 2 CPU cores)."""
  tokenizer = load_tokenizer(data_config.tokenizer_dir)
  source = tfds_longvid.LongVidSource(eval_config.shards)
  max_per_task = eval_config.get("max_per_task", 10**9)
  num_choices = eval_config.get("num_choices", 5)
  size, frame_budget = data_config.image_size, data_config.frame_budget
  rng = np.random.default_rng(0)

  def log_probs_at(params, ids, visual, where, visual_index=None):
    """log p over the vocabulary at the positions `where` (B, K) only: with a 152k vocabulary, the head over
    every position of a prompt of 16·T visual tokens is most of an evaluation's work. `visual` (1, N, H): the
    one video's or picture's tokens, shared by every row (a question's candidate answers)."""
    visual = jnp.broadcast_to(visual, (ids.shape[0],) + visual.shape[1:])
    _, aux = model.apply({"params": params}, ids, visual_tokens=visual, visual_index=visual_index,
                         return_logits=False)
    hidden = jnp.take_along_axis(aux["hidden"], where[..., None], axis=1)
    kernel = model.apply({"params": params}, method=lambda m: m.llm.head_kernel())
    logits = jnp.einsum("bkd,dv->bkv", hidden, kernel, preferred_element_type=jnp.float32)
    return jax.nn.log_softmax(logits, axis=-1)

  # The candidates of a question share its video or picture, so the vision tower runs once a question, not
  # once a candidate (a fifth of the tower's work; the held-out scoring at the end of the default's run took
  # 73 s before, timed alone on 2 CPU cores; 64 s after).
  @jax.jit
  def answer_log_probs(params, ids, frames, where):
    """log_probs_at for rows of one video: frames (F, S, S, 3) uint8."""
    visual = model.apply({"params": params}, normalize_frames(frames)[None, None], method=HiCo.visual_tokens_of_row)
    return log_probs_at(params, ids, visual, where)

  @jax.jit
  def image_answer_log_probs(params, ids, tiles, visual_index, where):
    """log_probs_at for rows of one image sample: its tiles (N, S, S, 3) uint8 and each placeholder's tile
    token."""
    visual = model.apply({"params": params}, images=normalize_frames(tiles)[None],
                         method=HiCo.visual_tokens_of_row)
    return log_probs_at(params, ids, visual, where, visual_index)

  headers = [source[i] for i in range(len(source))]
  answers = collections.defaultdict(list)
  for header, _ in headers:
    answers[header["dataset"]].append(header["conversations"][1]["value"].strip())
  distinct = {task: sorted(set(values)) for task, values in answers.items()}

  choice, exact, seen, skipped = (collections.Counter() for _ in range(4))
  media_of = {}
  wanted = sum(min(len(values), max_per_task) for values in answers.values())
  bar = progress.count_bar(wanted, "scoring held-out questions", "questions", enabled=show_progress)
  for header, media in headers:
    task = header["dataset"]
    if seen[task] >= max_per_task:
      continue
    media_of[task] = header["media_type"]
    question, answer = header["conversations"][0], header["conversations"][1]
    is_image = header["media_type"] == "image"
    try:
      if is_image:     # every tile the picture asks for: no row budget here
        tiles, image_tokens, orders = image_samples.decode_images(
            media, header, size, 10**6, data_config.image_grid_pinpoints, tokens_per_tile=data_config.tokens_per_tile)
      else:
        frames, info = pipeline.sample_frames(media[0], header, data_config)
    except (ValueError, IndexError):   # media that do not decode: counted and reported, not scored
      skipped[task] += 1
      continue
    others = [a for a in distinct[task] if a != answer["value"].strip()]
    candidates = [answer["value"].strip()] + list(rng.choice(others, min(num_choices - 1, len(others)), replace=False))
    if is_image:
      sample_args = dict(image_tokens=image_tokens)
    else:
      frames = frames[:frame_budget]
      sample_args = dict(num_frames=len(frames), duration=info["duration"],
                         tokens_per_frame=data_config.visual_tokens_per_frame)
    encoded = [text.encode_sample([question, {"from": "gpt", "value": c}], tokenizer, template=data_config.template,
                                  **sample_args)["input_ids"] for c in candidates]
    spans = [_answer_span(ids, c, tokenizer, data_config.template) for ids, c in zip(encoded, candidates)]
    length = _bucket(max(len(ids) for ids in encoded))
    batch = np.zeros((len(encoded), length), np.int32)
    where = np.zeros((len(encoded), _bucket(max(end - start for start, end in spans), 16)), np.int32)
    for row, (ids, (start, end)) in enumerate(zip(encoded, spans)):
      batch[row, :len(ids)] = ids
      where[row, :end - start] = np.arange(start - 1, end - 1)     # position t predicts token t + 1
    if is_image:      # tiles padded to a multiple of 4 (fewer shapes to compile); padding is never looked at
      padded = np.zeros((_bucket(len(tiles), 4), size, size, 3), np.uint8)
      padded[:len(tiles)] = tiles
      index = np.stack([np.maximum(image_samples.image_order(row, orders), 0) for row in batch])
      scores = np.asarray(image_answer_log_probs(params, jnp.asarray(batch), jnp.asarray(padded), jnp.asarray(index),
                                                 jnp.asarray(where)))
    else:
      clip = np.zeros((frame_budget, size, size, 3), np.uint8)
      clip[:len(frames)] = frames
      scores = np.asarray(answer_log_probs(params, jnp.asarray(batch), jnp.asarray(clip), jnp.asarray(where)))
    likelihoods = []
    for row, (ids, (start, end)) in enumerate(zip(encoded, spans)):
      answer_ids = ids[start:end]
      likelihoods.append(scores[row, np.arange(end - start), answer_ids].sum())
      if row == 0:
        exact[task] += bool(np.all(scores[row, :end - start].argmax(-1) == answer_ids))
    choice[task] += int(np.argmax(likelihoods) == 0)
    seen[task] += 1
    bar.update()
  bar.close()
  score = lambda hits, task: hits[task] / seen[task] if seen[task] else float("nan")
  return {task: {"choice": score(choice, task), "choice_chance": 1.0 / min(num_choices, len(distinct[task])),
                 "exact": score(exact, task), "exact_chance": 1.0 / max(len(distinct[task]), 1),
                 "count": seen[task], "skipped": skipped[task], "media": media_of.get(task, "video")}
          for task in sorted(set(seen) | set(skipped))}


def guessing_p_value(hits: int, count: int, chance: float) -> float:
  """P(at least `hits` of `count` right by guessing at `chance` per question): the binomial upper tail,
  summed exactly in log space (math.lgamma) so that tails of 1e-40 stay accurate."""
  if count <= 0:
    return float("nan")
  if hits <= 0:
    return 1.0
  if chance <= 0.0:
    return 0.0
  if chance >= 1.0:
    return 1.0
  log_terms = [math.lgamma(count + 1) - math.lgamma(k + 1) - math.lgamma(count - k + 1)
               + k * math.log(chance) + (count - k) * math.log1p(-chance) for k in range(hits, count + 1)]
  top = max(log_terms)
  return min(1.0, math.exp(top) * math.fsum(math.exp(t - top) for t in log_terms))


SIGNIFICANCE = 0.01


def _format_p(p: float) -> str:
  return f"{p:.2g}"      # two significant digits: 0.75, 0.0061, 1.3e-61


def format_results(results: dict) -> str:
  """The per-task table; `p` is the chance of choosing at least this well by guessing (binomial tail over the
  task's `n` questions), `*` marks p < SIGNIFICANCE. The video tasks come first with their summary line; tasks
  whose "media" is "image" follow, with their own line, so the video line says the same with or without them."""
  lines = [f"{'task':22s} {'choice':>8s} {'chance':>8s} {'p':>8s}   {'exact':>8s} {'chance':>8s} {'n':>4s}"]
  videos = {task: r for task, r in results.items() if r.get("media", "video") != "image"}
  images = {task: r for task, r in results.items() if r.get("media", "video") == "image"}
  for group, what in ((videos, ""), (images, "image ")):
    if not group:
      continue
    above, means = 0, []
    for task, r in group.items():
      hits = int(round(r["choice"] * r["count"])) if r["count"] else 0
      p = guessing_p_value(hits, r["count"], r["choice_chance"])
      mark = "*" if p < SIGNIFICANCE else " "
      above += p < SIGNIFICANCE
      if r["count"]:
        means.append(r["choice"])
      lines.append(f"{task:22s} {100 * r['choice']:7.1f}% {100 * r['choice_chance']:7.1f}% {_format_p(p):>8s} {mark} "
                   f"{100 * r['exact']:7.1f}% {100 * r['exact_chance']:7.1f}% {r['count']:4d}")
    mean = 100 * sum(means) / len(means) if means else float("nan")
    if what:
      lines.append(f"mean choice over {len(means)} {what}tasks {mean:.1f}% ({above} of {len(group)} {what}tasks "
                   f"above chance at p < {SIGNIFICANCE})")
    else:
      lines.append(f"mean choice over {len(means)} tasks {mean:.1f}%; * = above chance at p < {SIGNIFICANCE} "
                   f"({above} of {len(group)} tasks; p: the chance of at least this many right by guessing)")
  for group, what in ((videos, "video"), (images, "picture")):
    skipped = {task: r["skipped"] for task, r in group.items() if r.get("skipped")}
    if skipped:
      lines.append(f"not scored, the {what} did not decode: " + ", ".join(f"{t} {n}" for t, n in skipped.items()))
  return "\n".join(lines)
