"""The train state and the jitted train step, wired once: the trainer, the tests and tools/benchmark.py all build
them here, so that what the tests check and what the benchmark times is the step a run takes.

Imports neither the input pipeline nor the checkpointer (grain, orbax): the benchmark runs where those are
not installed.
"""

from __future__ import annotations

import types

import flax.linen as nn
import jax

from hico_jax import sharding
from hico_jax.models.hico import HiCo, init_inputs
from hico_jax.train import optimizer as optim, step as step_lib


def init_train_state(model, model_config, optim_config, mesh, *, seed: int = 0, params=None):
  """The train state -> namespace(state, optimizer, schedules, frozen, param_shardings).

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


def build_train_step(model_config, optim_config, mesh, *, accumulation_steps: int = 1, seed: int = 0, params=None,
                     donate: bool = True, compiler_options: dict | None = None):
  """Model, sharded state and jitted step on `mesh` -> namespace(model, state, state_shardings, optimizer,
  schedules, frozen, param_shardings, train_step).

  train_step(state, batch) -> (state, metrics), batch as hico_jax.data.pipeline.to_global makes it, called
  under `jax.set_mesh(mesh)` and the logical rules. Donating the state (the default) lets XLA update parameters
  and moments in place, one copy of them in memory; a test that steps the same state twice passes
  donate=False. Rows are zig-zagged over the mesh's sequence devices as the pipeline does."""
  model = HiCo(model_config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    built = init_train_state(model, model_config, optim_config, mesh, seed=seed, params=params)
    state_shardings = jax.tree.map(lambda x: x.sharding, built.state)
    train_step = jax.jit(
        step_lib.make_train_step(model, built.optimizer, built.frozen, accumulation_steps=accumulation_steps,
                                 schedules=built.schedules, seq_shards=sharding.axis_size(mesh, "act_len")),
        donate_argnums=(0,) if donate else (), out_shardings=(state_shardings, None),
        compiler_options=compiler_options)
  return types.SimpleNamespace(model=model, state_shardings=state_shardings, train_step=train_step,
                               **vars(built))
