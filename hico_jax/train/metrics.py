"""Training observability: the stage's progress bar in the terminal, updated at each log step (loss, speed,
tokens/s, MFU, ETA; train/progress.py), and TensorBoard event files in the workdir with everything (loss,
learning rate per group, grad norm, skipped records, throughput)."""

from __future__ import annotations

import time

import jax
from jax.experimental import multihost_utils
import numpy as np

from hico_jax import flops
from hico_jax.train import progress


def train_flops(model_config, config, data_config):
  """supervised tokens of a step -> its model FLOPs, every row filled to its token, frame and tile budgets and the
  output head counted at the step's supervised positions (the only ones where the loss computes it)."""
  rows = config.batch_size          # rows per optimizer step (micro-batches split them)
  budget = lambda supervised: flops.hico_train_flops(model_config, data_config.token_budget,
                                                     data_config.frame_budget, supervised=supervised,
                                                     tiles=getattr(data_config, "tile_budget", 0))
  without_head, head_per_token = rows * budget(0), budget(1) - budget(0)
  return lambda supervised: without_head + head_per_token * supervised


def batch_counts(local_batch: dict) -> dict[str, int]:
  """What a host-local batch adds to the counts logged over every process: its real (non-padding) tokens and
  the records its samples had to skip."""
  return {"tokens_since_last_log": int((local_batch["segment_ids"] > 0).sum()),
          "skipped_records_since_last_log": int(np.sum(local_batch["num_skipped"]))}


def sum_over_processes(counts: dict[str, int]) -> dict[str, float]:
  """Counts each process made of its own rows -> their sums over every process.

  A collective: every process must call it at the same step (the trainer does, on log steps). The sum
  travels as float32 (jax's default): exact below 2**24, within 1e-7 of the count above."""
  if jax.process_count() == 1:
    return {name: float(value) for name, value in counts.items()}
  names = sorted(counts)
  local = np.asarray([counts[name] for name in names], np.float32)
  total = multihost_utils.process_allgather(local).reshape(-1, len(names)).sum(0)
  return {name: float(value) for name, value in zip(names, total)}


class MetricWriter:
  def __init__(self, workdir: str, *, total_steps: int, start_step: int, flops_per_step,
               peak_flops_per_device: float = flops.H100_BF16_PEAK, desc: str = "training"):
    self.total_steps, self.flops_per_step = total_steps, flops_per_step
    self.peak = peak_flops_per_device * jax.device_count()
    self.show_mfu = jax.devices()[0].platform != "cpu"     # against an H100's peak a CPU's MFU means nothing
    self._last_time, self._last_step = time.perf_counter(), start_step
    self._writer = None
    # The stage's one bar (or its plain lines), on the process that writes.
    self.progress = progress.StageProgress(desc, total_steps, start_step, enabled=jax.process_index() == 0)
    if jax.process_index() == 0:
      # Lazily, and only on the process that writes: tensorboardX is absent from some GPU images, where a run
      # on another process (or an import of this module) must not need it.
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self._writer = SummaryWriter(workdir)

  def write(self, step: int, values: dict):
    """values: the step's metrics, with the counts of every step since the last write over all processes
    (`tokens_since_last_log`, real tokens; `skipped_records_since_last_log`): per interval, so that they add
    up over a resumed run too."""
    now = time.perf_counter()
    seconds = now - self._last_time
    seconds_per_step = seconds / max(step - self._last_step, 1)
    self._last_time, self._last_step = now, step
    values = dict(values)
    values["seconds_per_step"] = seconds_per_step
    values["tokens_per_s"] = values.get("tokens_since_last_log", 0.0) / seconds
    values["mfu"] = self.flops_per_step(values.get("num_tokens", 0.0)) / seconds_per_step / self.peak
    eta = seconds_per_step * (self.total_steps - step)
    self.progress.update(step, progress.status(values, eta, self.show_mfu))
    if self._writer is not None:
      for key, value in values.items():
        if isinstance(value, (int, float)):
          self._writer.add_scalar(key, value, step)
      self._writer.flush()

  def close(self):
    self.progress.close()
    if self._writer is not None:
      self._writer.close()
