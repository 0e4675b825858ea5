"""Runs benchmarks through a VideoChat-Flash model the way the official lmms-eval `videochat_flash` model does:
per question chat(video, doc_to_text, chat_history=None, max_num_frames=N) with greedy decoding and the task's
max_new_tokens, answers stripped. Here questions of the same frame count go through `model.generate` together
(left-padded, with an attention mask; a padded row generates as it would alone).

Per question: dynamic_fps1 sampling (floor 64 frames, cap 512; LVBench 640) over the question's span, the prompt
  <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n<image>\\n{time message}
  {doc_to_text}<|im_end|>\\n<|im_start|>assistant\\n
and a JSON-lines record written as soon as its batch finishes (hico_jax.eval.results). The questions and their
frames come from the benchmark's download or its prepared TFDS dataset alike (hico_jax.eval.sources)."""

from __future__ import annotations

import collections
import concurrent.futures as futures
import dataclasses
import json
import os
import sys
import time
from typing import Iterator, Sequence

import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from hico_jax.data import text
from hico_jax.eval import benchmarks, results as results_io, scoring, sources
from hico_jax.eval.sources import Decoded

SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
STOP = "<|im_end|>"
# Prompts are padded to a multiple of this many tokens, so generation compiles once per length bucket.
PROMPT_BUCKET = 64


def chat_prompt(question: str, duration: float, num_frames: int) -> str:
  """chat()'s whole prompt for a first turn (conv_qwen, the time message before the question)."""
  time_msg = text.time_message(duration, num_frames).strip()
  return f"{SYSTEM}<|im_start|>user\n{text.IMAGE_TAG}\n{time_msg} {question}{STOP}\n<|im_start|>assistant\n"


@dataclasses.dataclass
class Options:
  # One question per generate call: at the paper's 512 frames a question is 8,192 visual tokens, which keep a
  # GPU busy alone; batches of 8 were 12% slower on an H200 (docs/benchmarks.md, benchmark evaluation).
  batch_size: int = 1
  process_index: int = 0
  process_count: int = 1
  decode_workers: int = 4
  limit: int | None = None        # the first N questions of each benchmark (a smoke run)
  max_frames: int | None = None   # overrides the benchmark's cap (fewer frames: a quick look, not the official score)
  progress: bool = True


def _decoded(source, questions, max_frames, image_size, workers) -> Iterator[Decoded]:
  """Decodes ahead in threads (OpenCV releases the GIL), in order, a bounded number at a time."""
  with futures.ThreadPoolExecutor(max(1, workers)) as pool:
    queue = collections.deque()
    it = iter(questions)
    for q in it:
      queue.append(pool.submit(source.decode, q, max_frames, image_size))
      if len(queue) >= 2 * max(1, workers):
        yield queue.popleft().result()
    while queue:
      yield queue.popleft().result()


class Runner:
  def __init__(self, model, tokenizer, out_dir: str, options: Options = Options()):
    if not getattr(model, "is_video_model", False):
      raise ValueError("the model has no vision tower (no mm_vision_tower in its config.json); benchmarks need a "
                       "VideoChat-Flash checkpoint")
    self.model, self.tokenizer, self.out_dir, self.options = model, tokenizer, out_dir, options
    im_end = tokenizer.token_to_id(STOP)
    self.stop_ids = tuple(dict.fromkeys([*model.eos_ids, *([im_end] if im_end is not None else [])]))

  def generate(self, batch: Sequence[Decoded], max_new_tokens: int) -> list[str]:
    """Answers for questions of one frame count, as chat() returns them (decoded, special tokens skipped,
    stripped)."""
    ids = [text.tokenize_image_prompt(chat_prompt(d.question.prompt, d.duration, len(d.pixels)), self.tokenizer)
           for d in batch]
    length = -(-max(map(len, ids)) // PROMPT_BUCKET) * PROMPT_BUCKET
    padded = np.full((len(ids), length), self.model.pad_id, np.int32)
    mask = np.zeros((len(ids), length), np.int32)
    for row, seq in enumerate(ids):
      padded[row, length - len(seq):] = seq
      mask[row, length - len(seq):] = 1
    pixels = np.stack([d.pixels for d in batch])
    # A short batch (a frame count's last few questions) is filled up with copies of its first row, so every
    # generate call has the batch shape the first one compiled; the copies' answers are dropped.
    fill = self.options.batch_size - len(batch)
    if fill > 0:
      padded, mask = (np.concatenate([a, np.repeat(a[:1], fill, 0)]) for a in (padded, mask))
      pixels = np.concatenate([pixels, np.repeat(pixels[:1], fill, 0)])
    # Encoded here, without the encoder's own progress bar: the run's bar of questions is the one a user sees.
    tokens = jnp.stack([self.model.encode_video(row, progress=False) for row in pixels])
    new_ids = self.model.generate(padded, visual_tokens=tokens, attention_mask=mask, max_new_tokens=max_new_tokens,
                                  eos_ids=self.stop_ids)
    answers = []
    for row in np.asarray(new_ids)[:len(batch)]:
      stops = np.flatnonzero(np.isin(row, self.stop_ids))
      row = row[:stops[0]] if stops.size else row
      answer = self.tokenizer.decode(row, skip_special_tokens=True).strip()
      answers.append(answer[:-len(STOP)].strip() if answer.endswith(STOP) else answer)
    return answers

  def run(self, name: str, source: str | sources.Source) -> dict:
    """Answers this process's share of the benchmark's unanswered questions from `source` (the download's
    folder, or a sources.PreparedSource); returns the summary of what the folder holds (every process's
    records)."""
    bench = benchmarks.get(name)
    source = sources.as_source(name, source)
    questions, bad_rows = source.load()
    if self.options.limit is not None:
      questions = questions[:self.options.limit]
    done = results_io.read_records(self.out_dir, name)
    mine = questions[self.options.process_index::self.options.process_count]
    todo = [q for q in mine if q.qid not in done]
    max_frames = self.options.max_frames or bench.max_frames
    path = results_io.shard_path(self.out_dir, name, self.options.process_index, self.options.process_count)
    bar = _progress(len(todo), f"{name} ({len(mine) - len(todo)} done before)", self.options.progress)
    size = self.model.config.vit.image_size
    with results_io.Writer(path) as writer:
      buckets: dict[int, list[Decoded]] = collections.defaultdict(list)

      def flush(frames):
        batch = buckets.pop(frames)
        for d, raw in zip(batch, self.generate(batch, bench.max_new_tokens)):
          writer.write(_record(bench, d, raw))
        bar.update(len(batch))

      for d in _decoded(source, todo, max_frames, size, self.options.decode_workers):
        if d.pixels is None:
          writer.write(_record(bench, d, None))
          bar.update(1)
          continue
        buckets[len(d.pixels)].append(d)
        if len(buckets[len(d.pixels)]) >= self.options.batch_size:
          flush(len(d.pixels))
        elif sum(map(len, buckets.values())) >= 2 * self.options.batch_size:
          flush(max(buckets, key=lambda k: len(buckets[k])))    # bounds the frames held in memory
      for frames in list(buckets):
        flush(frames)
    bar.close()
    return scoring.summarize(bench, questions, results_io.read_records(self.out_dir, name), bad_rows)


def _record(bench, d: Decoded, raw: str | None) -> dict:
  q = d.question
  base = {"qid": q.qid, "task": q.task, "video": q.video, "prompt": q.prompt}
  if raw is None:
    return {**base, "status": results_io.STATUS_NO_VIDEO, "error": d.error}
  s = bench.score(q, raw)
  return {**base, "status": results_io.STATUS_ANSWERED, "num_frames": len(d.pixels), "raw": raw,
          "parsed": s.parsed, "correct": s.correct, "counted": s.counted}


def _progress(total, desc, enabled):
  return tqdm(total=total, desc=desc, unit="q", disable=not enabled, file=sys.stderr, dynamic_ncols=True)


def summarize(out_dir: str, names: Sequence[str], data_roots: dict[str, str | sources.Source], model_name: str,
              limit: int | None = None) -> list[dict]:
  """Merges every process's records into out_dir/summary.json and summary.md (Table 2's layout), and writes a
  split without answers' submission files under out_dir/submissions/ (as the official generate_submission_file)."""
  summaries = []
  for name in names:
    bench = benchmarks.get(name)
    questions, bad = sources.as_source(name, data_roots[name]).load()
    questions = questions if limit is None else questions[:limit]
    records = results_io.read_records(out_dir, name)
    summary = scoring.summarize(bench, questions, records, bad)
    if bench.submission is not None:
      summary["submission_files"] = results_io.write_submission(out_dir, bench.submission(questions, records))
    summaries.append(summary)
  with open(os.path.join(out_dir, "summary.json"), "w") as f:
    json.dump({"model": model_name, "written": time.strftime("%Y-%m-%d %H:%M:%S"), "benchmarks": summaries}, f,
              indent=2)
  with open(os.path.join(out_dir, "summary.md"), "w") as f:
    f.write(scoring.markdown(summaries, model_name))
  return summaries
