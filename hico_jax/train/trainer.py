"""The trainer: one readable file, top to bottom (big_vision's train.py is the model).

  python -m hico_jax.train --config configs/<file>.py[:arg] --workdir DIR [--config.key=value ...]

Sections: config and workdir; mesh; input pipeline; model, optimizer and sharded state; the step;
checkpoint restore; the loop; evaluation. Config, paths and the fit of every number to the mesh are checked
before anything compiles; an init checkpoint of another architecture fails before the first step.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import signal

from absl import logging
import flax.linen as nn
import jax

from hico_jax import sharding, validate
from hico_jax.data import pipeline, tfds_longvid
from hico_jax.models import vit
from hico_jax.models.hico import HiCoConfig
from hico_jax.ops import xla_options
from hico_jax.train import checkpoint as ckpt
from hico_jax.train import evaluate, init_weights, metrics, train_state


def train(config, workdir: str) -> dict:
  """Runs the configured stage; returns the final metrics (and evaluation results)."""
  # ------------------------------------------------------------------------------------------ config, workdir
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  check_resumable(workdir, config)
  pipeline.reset_skip_log()
  config_json = json.loads(config.to_json_best_effort())      # saved with the run and in every checkpoint
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(config_json, f, indent=2)
  model_config = HiCoConfig.from_dict(dict(config.model))
  # "auto" vision blocks made concrete for a training step: unrolled on GPUs (models/vit.py).
  model_config = dataclasses.replace(model_config, vit=dataclasses.replace(
      model_config.vit, block_loop=vit.training_block_loop(model_config.vit.block_loop, jax.default_backend())))
  # The data are written for this model: its clip length and how many tokens a frame and a tile merge to.
  data_config = pipeline.DataConfig.from_dict(dict(config.data), **model_config.pipeline_counts())
  eval_shards = config.eval.get("shards") if config.get("eval") else None
  for path, what in ((data_config.shards, "data.shards"), (data_config.tokenizer_dir, "data.tokenizer_dir"),
                     (config.init.get("path"), "init.path"), (eval_shards, "eval.shards")):
    if path and not os.path.exists(path):
      raise FileNotFoundError(f"{what} {path!r} does not exist")
  if eval_shards:
    tfds_longvid.LongVidSource(eval_shards)   # opened now: a bad evaluation set must not wait for the end of training

  # -------------------------------------------------------------------------------------------------- mesh
  # jax.distributed.initialize() has already run (launch/) when there are several processes.
  mesh = sharding.make_mesh(config.mesh)
  validate.validate_training(config, model_config, mesh, data_config)   # every misfit named, before any compile
  if config.init.get("path"):
    init_weights.check_settings(config.init, model_config)    # settings no tensor shape carries
  seq_shards = sharding.axis_size(mesh, "act_len")      # tokens of a row are split over this many devices
  logging.info("mesh %s on %d devices, %d processes", dict(mesh.shape), jax.device_count(), jax.process_count())

  # -------------------------------------------------------------------------------------------- input pipeline
  # Each process reads its own slice of the records and builds its rows of the global batch.
  local_batch = config.batch_size // jax.process_count()
  dataset = pipeline.make_dataset(data_config, batch_size=local_batch, process_index=jax.process_index(),
                                  process_count=jax.process_count(), seq_shards=seq_shards)
  data_iter = iter(dataset)

  # ------------------------------------------------------------------ model, optimizer, sharded state; the step
  # The compiler options are the benchmark's: on GPUs, rows whose vision tower outweighs the decoder compile
  # without XLA's Triton GEMMs (ops/xla_options.py).
  text_tokens = max(data_config.token_budget - model_config.visual_tokens(data_config.frame_budget), 0)
  built = train_state.build_train_step(
      model_config, config.optim, mesh, accumulation_steps=config.accumulation_steps, seed=config.seed,
      compiler_options=xla_options.train_compiler_options(model_config, data_config.frame_budget, text_tokens))
  model, state, train_step = built.model, built.state, built.train_step

  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES), RunResources(workdir, config) as run:
    # ---------------------------------------------------------------------------------- checkpoint restore
    checkpointer = run.checkpointer
    abstract_target = ckpt.abstract_like(state, built.state_shardings)
    start_step = checkpointer.latest_step()
    if start_step is not None:
      state = checkpointer.restore(start_step, abstract_target, data_iter)
      logging.info("resumed from step %d of %s", start_step, checkpointer.directory)
    elif config.init.get("path"):
      state = init_weights.load_into_state(state, config.init, model_config, built.param_shardings)
      logging.info("initialised weights from %s", config.init.path)
    start_step = int(start_step or 0)

    # ------------------------------------------------------------------------------------------ the loop
    # The terminal shows one progress bar for the stage; the writer's TensorBoard events keep every metric.
    writer = run.open_writer(total_steps=config.total_steps, start_step=start_step,
                             flops_per_step=metrics.train_flops(model_config, config, data_config),
                             desc=config.get("stage") or os.path.basename(workdir))
    nonfinite_in_a_row, last = 0, {}
    since_log = collections.Counter()     # this process's rows; summed over processes when logged
    for step in range(start_step + 1, config.total_steps + 1):
      local = next(data_iter)
      since_log.update(metrics.batch_counts(local))
      batch = pipeline.to_global(local, mesh)
      state, step_metrics = train_step(state, batch)
      # The step skipped its update if the loss or gradient was not finite; several in a row stop the run.
      nonfinite_in_a_row = 0 if bool(step_metrics["finite"]) else nonfinite_in_a_row + 1
      if nonfinite_in_a_row >= config.max_nonfinite_in_a_row:
        checkpointer.wait()           # a save still in flight is the last good checkpoint the message names
        raise FloatingPointError(f"loss or gradient non-finite {nonfinite_in_a_row} steps in a row, last at step "
                                 f"{step}; the last good checkpoint is step {checkpointer.latest_step()}")
      if step % config.log_every == 0 or step == config.total_steps:
        last = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
        last.update(metrics.sum_over_processes(since_log), step=step)
        since_log.clear()
        writer.write(step, last)
      checkpointer.save(step, state, data_iter, config=config_json,
                        force=run.stop_requested or step == config.total_steps)
      if run.stop_requested:
        logging.info("stopped at step %d on SIGTERM; checkpoint saved", step)
        return {**last, "stopped_at": step}      # callers that chain stages must not go on

  summary = pipeline.skip_summary(os.path.join(workdir, "skipped_records.tsv"))
  if summary and jax.process_index() == 0:
    print(summary, flush=True)

  # ----------------------------------------------------------------------------------------- evaluation
  results = dict(last)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    if config.get("eval") and config.eval.get("shards"):
      results["eval"] = evaluate.evaluate_qa(model, state["params"], config.eval, data_config,
                                             show_progress=jax.process_index() == 0)
    if config.get("export_hf"):
      tokenizer_dir = data_config.tokenizer_dir
      has_tokenizer = bool(tokenizer_dir) and os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.json"))
      init_weights.export_hf(os.path.join(workdir, "hf"), model_config, state["params"],
                             tokenizer_dir=tokenizer_dir if has_tokenizer else None)
  return results


class OtherRunInWorkdir(ValueError):
  """The workdir holds checkpoints saved with another seed or decoder settings (check_resumable)."""


def check_resumable(workdir: str, config) -> None:
  """A workdir with checkpoints resumes from the latest. Refuse one whose run had another seed, or decoder
  settings that no tensor's shape carries (init_weights.UNCARRIED_LLM_FIELDS: a RoPE base restores without a
  shape error and computes something else): resuming would continue that run and report it as this one (the
  default's `--seed 1` after `--seed 0` in one checkout once scored seed 0's model as seed 1's)."""
  step, saved = ckpt.latest_config(workdir)
  if not saved:
    return
  pairs = [("seed", saved.get("seed"), config.get("seed")),
           ("data.seed", saved.get("data", {}).get("seed"), config.data.get("seed"))]
  saved_llm = saved.get("model", {}).get("llm", {})
  pairs += [(f"model.llm.{name}", saved_llm[name], config.model.llm.get(name))
            for name in init_weights.UNCARRIED_LLM_FIELDS if name in saved_llm]
  mismatched = [f"{key} {before} (this run's: {now})" for key, before, now in pairs if before != now]
  if mismatched:
    raise OtherRunInWorkdir(f"{workdir} holds the checkpoints of another run, up to step {step}, with "
                            f"{' and '.join(mismatched)}; resuming would continue that run under this one's "
                            f"name. Give this run its own --workdir, or delete {workdir} to start over.")


class RunResources:
  """What a run holds open: the checkpointer, the metric writer and the SIGTERM handler (preemption asks the
  loop to save and stop). Closed together on every way out of the loop: its end, SIGTERM, the non-finite
  stop, or any error."""

  def __init__(self, workdir: str, config):
    self.workdir = workdir
    self.checkpointer = ckpt.Checkpointer(workdir, max_to_keep=config.checkpoint.keep,
                                          save_interval_steps=config.checkpoint.every,
                                          async_save=config.checkpoint.async_save)
    self.writer = None
    self.stop_requested = False
    self._previous_handler = None

  def open_writer(self, **kwargs) -> metrics.MetricWriter:
    """The metric writer, opened once the start step is known (metrics.MetricWriter's arguments)."""
    self.writer = metrics.MetricWriter(self.workdir, **kwargs)
    return self.writer

  def _request_stop(self, *_):
    self.stop_requested = True

  def __enter__(self):
    self._previous_handler = signal.signal(signal.SIGTERM, self._request_stop)
    return self

  def __exit__(self, *exc_info):
    try:
      self.checkpointer.close()       # waits for the saves in flight
    finally:
      try:
        if self.writer is not None:
          self.writer.close()
      finally:
        signal.signal(signal.SIGTERM, self._previous_handler)
    return False
