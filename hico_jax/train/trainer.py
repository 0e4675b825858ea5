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
import types

from absl import logging
import flax.linen as nn
import jax

from hico_jax import sharding, validate
from hico_jax.data import pipeline, tfds_longvid
from hico_jax.models import vit
from hico_jax.models.hico import HiCo, HiCoConfig, init_inputs
from hico_jax.ops import xla_options
from hico_jax.train import checkpoint as ckpt
from hico_jax.train import evaluate, init_weights, metrics, optimizer as optim, step as step_lib


def train(config, workdir: str) -> dict:
  """Runs the configured stage; returns the final metrics (and evaluation results)."""
  # ------------------------------------------------------------------------------------------ config, workdir
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  config_json = json.loads(config.to_json_best_effort())      # saved with the run and in every checkpoint
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(config_json, f, indent=2)
  model_config = HiCoConfig.from_dict(dict(config.model))
  # "auto" vision blocks made concrete for a training step: unrolled on GPUs (models/vit.py).
  model_config = dataclasses.replace(model_config, vit=dataclasses.replace(
      model_config.vit, block_loop=vit.training_block_loop(model_config.vit.block_loop, jax.default_backend())))
  data_config = pipeline.DataConfig.from_dict(dict(config.data))
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
  validate.validate_training(config, model_config, mesh)      # every misfit named, before any compile
  if config.init.get("path"):
    init_weights.check_settings(config.init, model_config)    # settings no tensor shape carries
  seq_shards = dict(mesh.shape)["seq"]
  logging.info("mesh %s on %d devices, %d processes", dict(mesh.shape), jax.device_count(), jax.process_count())

  # -------------------------------------------------------------------------------------------- input pipeline
  # Each process reads its own slice of the records and builds its rows of the global batch.
  local_batch = config.batch_size // jax.process_count()
  dataset = pipeline.make_dataset(data_config, batch_size=local_batch, process_index=jax.process_index(),
                                  process_count=jax.process_count(), seq_shards=seq_shards)
  data_iter = iter(dataset)

  # ------------------------------------------------------------------ model, optimizer, sharded state
  model = HiCo(model_config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    built = init_train_state(model, model_config, config.optim, mesh, seed=config.seed)
    state, tx, schedules, frozen = built.state, built.optimizer, built.schedules, built.frozen
    state_shardings = jax.tree.map(lambda x: x.sharding, state)

    # ---------------------------------------------------------------------------------------- the step
    # Donating the state lets XLA update parameters and moments in place: one copy of them in memory. The
    # compiler options are the benchmark's: on GPUs, rows whose vision tower outweighs the decoder compile
    # without XLA's Triton GEMMs (ops/xla_options.py).
    text_tokens = max(data_config.token_budget - model_config.visual_tokens(data_config.frame_budget), 0)
    train_step = jax.jit(
        step_lib.make_train_step(model, tx, frozen, accumulation_steps=config.accumulation_steps,
                                 schedules=schedules, seq_shards=seq_shards),
        donate_argnums=(0,), out_shardings=(state_shardings, None),
        compiler_options=xla_options.train_compiler_options(model_config, data_config.frame_budget, text_tokens))

    # ---------------------------------------------------------------------------------- checkpoint restore
    checkpointer = ckpt.Checkpointer(workdir, max_to_keep=config.checkpoint.keep,
                                     save_interval_steps=config.checkpoint.every,
                                     async_save=config.checkpoint.async_save)
    abstract_target = ckpt.abstract_like(state, state_shardings)
    start_step = checkpointer.latest_step()
    if start_step is not None:
      state = checkpointer.restore(start_step, abstract_target, data_iter)
      logging.info("resumed from step %d of %s", start_step, checkpointer.directory)
    elif config.init.get("path"):
      state = init_weights.load_into_state(state, config.init, model_config, built.param_shardings)
      logging.info("initialised weights from %s", config.init.path)
    start_step = int(start_step or 0)

    # ------------------------------------------------------------------------------------------ the loop
    stop = {"requested": False}
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: stop.update(requested=True))  # preemption
    writer = metrics.MetricWriter(workdir, total_steps=config.total_steps, start_step=start_step,
                                  flops_per_step=metrics.train_flops(model_config, config, data_config))
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
        checkpointer.close()
        raise FloatingPointError(f"loss or gradient non-finite {nonfinite_in_a_row} steps in a row, last at step "
                                 f"{step}; the last good checkpoint is step {checkpointer.latest_step()}")
      if step % config.log_every == 0 or step == config.total_steps:
        last = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
        last.update(metrics.sum_over_processes(since_log), step=step)
        since_log.clear()
        writer.write(step, last)
      checkpointer.save(step, state, data_iter, config=config_json,
                        force=stop["requested"] or step == config.total_steps)
      if stop["requested"]:
        checkpointer.close()
        writer.close()
        signal.signal(signal.SIGTERM, previous_handler)
        logging.info("stopped at step %d on SIGTERM; checkpoint saved", step)
        return last
    checkpointer.close()
    writer.close()
    signal.signal(signal.SIGTERM, previous_handler)

    # ----------------------------------------------------------------------------------------- evaluation
    results = dict(last)
    if config.get("eval") and config.eval.get("shards"):
      results["eval"] = evaluate.evaluate_qa(model, state["params"], config.eval, data_config)
    if config.get("export_hf"):
      tokenizer_dir = data_config.tokenizer_dir
      has_tokenizer = bool(tokenizer_dir) and os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.json"))
      init_weights.export_hf(os.path.join(workdir, "hf"), model_config, state["params"],
                             tokenizer_dir=tokenizer_dir if has_tokenizer else None)
  return results


def init_train_state(model, model_config, optim_config, mesh, *, seed: int = 0, params=None):
  """The train state as train() makes it -> namespace(state, optimizer, schedules, frozen, param_shardings).

  Parameters are born sharded by the logical rules (or, given `params`, placed with those shardings). The
  optimizer state is made eagerly from them, so each moment lands with its parameter's sharding; its counters
  (and the step) are replicated."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    abstract = jax.eval_shape(model.init, jax.random.key(seed), *init_inputs(model_config))
    param_shardings = sharding.logical_to_sharding(abstract, mesh)["params"]
    abstract_params = sharding.unbox_abstract(abstract)["params"]
    tx, schedules = optim.make_optimizer(optim_config, abstract_params)
    if params is None:
      init_params = lambda rng: nn.unbox(model.init(rng, *init_inputs(model_config)))["params"]
      params = jax.jit(init_params, out_shardings=param_shardings)(jax.random.key(seed))
    else:
      params = jax.device_put(params, param_shardings)
    state = replicate_scalars(step_lib.init_state(params, tx), mesh)
  return types.SimpleNamespace(state=state, optimizer=tx, schedules=schedules, param_shardings=param_shardings,
                               frozen=optim.frozen_mask(abstract_params, optim_config.schedule))


def replicate_scalars(tree, mesh):
  """Leaves that live on one device (counters made eagerly) -> replicated over the mesh."""
  replicated = sharding.replicated(mesh)
  return jax.tree.map(lambda x: jax.device_put(x, replicated)
                      if isinstance(x.sharding, jax.sharding.SingleDeviceSharding) else x, tree)
