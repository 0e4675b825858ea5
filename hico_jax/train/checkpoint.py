"""Checkpoints with orbax: train state, data iterator state and config in one step directory.

Orbax writes each step under a temporary name and renames it when every item is complete, so a crash or a
full disk in the middle of a save never makes a partial step the latest: `latest_step()` only sees
finished ones. Saves are asynchronous (training goes on while arrays are written); the grain iterator state
is captured at the moment `save` is called. Restoring takes an abstract target whose shardings may belong
to a different mesh than the one that saved.
"""

from __future__ import annotations

import os

import grain
import jax
import orbax.checkpoint as ocp


class Checkpointer:
  def __init__(self, workdir: str, *, max_to_keep: int = 3, save_interval_steps: int = 1000,
               async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
                                             enable_async_checkpointing=async_save),
        item_names=("state", "data", "config"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iterator=None, config: dict | None = None, force: bool = False) -> bool:
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    if config is not None:
      items["config"] = ocp.args.JsonSave(config)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, step: int, abstract_state, data_iterator=None):
    """The state at `step`, laid out as `abstract_state` (ShapeDtypeStructs with shardings) says; the
    iterator, when given, continues from where that step left it."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

  def saved_config(self, step: int) -> dict | None:
    """The config saved with `step` (None for a step saved without one)."""
    if not (self.manager.directory / str(step) / "config").exists():
      return None
    return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def latest_config(workdir: str) -> tuple[int | None, dict]:
  """(the latest finished step, the config saved with it) of a run directory, read without restoring any array:
  (None, {}) when it has no step, {} for a step saved without a config."""
  checkpointer = Checkpointer(workdir)
  try:
    step = checkpointer.latest_step()
    return step, (checkpointer.saved_config(step) or {}) if step is not None else {}
  finally:
    checkpointer.close()


def abstract_like(tree, shardings):
  """ShapeDtypeStructs of `tree` carrying `shardings` (a restore target on any mesh)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
