"""A stage's progress in the terminal: one line that a run updates at each log step (and `count_bar`, the same
rule for a count of items, such as the held-out questions scored after training).

On a terminal it is a tqdm bar on stderr,
  stage2:  50%|█████     | 100/200 [01:23, loss 2.3456, 1.23 s/step, 812 tok/s, ETA 2.1 min]
left in place when the stage ends. Elsewhere (a CI log, a Slurm output file) a bar's carriage returns would
run together into one unreadable line, so the same status goes out as a plain line: at the first log step,
then at most one every PLAIN_EVERY_S seconds, and at the last step. Speed and ETA are the metric writer's, over
the last log interval, not tqdm's own average (which would carry the first step's compilation for a long time).
"""

from __future__ import annotations

import os
import sys
import time

from tqdm import tqdm

PLAIN_EVERY_S = 60.0
_BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"


def status(values: dict, eta_s: float, show_mfu: bool) -> str:
  """`values`, a log step's metrics (MetricWriter.write's, with seconds_per_step, tokens_per_s and mfu) ->
  "loss 2.3456, 1.23 s/step, 812 tok/s[, MFU 41.2%], ETA 2.1 min"."""
  seconds = values["seconds_per_step"]
  speed = f"{seconds:.2f} s/step" if seconds >= 1 else f"{1 / seconds:.2f} steps/s"
  return (f"loss {values.get('loss', float('nan')):.4f}, {speed}, {values['tokens_per_s']:,.0f} tok/s, "
          + (f"MFU {100 * values['mfu']:.1f}%, " if show_mfu else "") + f"ETA {eta_s / 60:.1f} min")


def _is_terminal(stream) -> bool:
  """A terminal with a width: on a pseudo-terminal of 0 columns (script(1) run without one, some containers)
  tqdm draws its bar as an empty line, so that one gets the plain lines."""
  try:
    return stream.isatty() and os.get_terminal_size(stream.fileno()).columns > 0
  except (AttributeError, OSError, ValueError):     # no file descriptor behind it (a StringIO, pytest's capture)
    return False


class StageProgress:
  """Steps start_step..total_steps of one stage; `update(step, text)` at each log step, `close()` once."""

  def __init__(self, desc: str, total_steps: int, start_step: int, *, enabled: bool = True,
               clock=time.perf_counter):
    self.desc, self.total_steps, self.enabled, self._clock = desc, total_steps, enabled, clock
    stream = sys.stderr
    self._bar = None
    self._last_plain = None            # the clock when the last plain line went out; None before the first
    if enabled and _is_terminal(stream):
      self._bar = tqdm(total=total_steps, initial=start_step, desc=desc, unit="step", file=stream,
                       dynamic_ncols=True, bar_format=_BAR_FORMAT, leave=True)
    self._step = start_step

  def update(self, step: int, text: str):
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.set_postfix_str(text, refresh=False)
      self._bar.update(step - self._step)
      self._bar.refresh()
    else:
      now = self._clock()
      if self._last_plain is None or now - self._last_plain >= PLAIN_EVERY_S or step == self.total_steps:
        print(f"{self.desc} step {step}/{self.total_steps}: {text}", file=sys.stderr, flush=True)
        self._last_plain = now
    self._step = step

  def close(self):
    if self._bar is not None:
      self._bar.close()
      self._bar = None


def count_bar(total: int, desc: str, unit: str, *, enabled: bool = True) -> tqdm:
  """A bar on stderr for `total` items on a terminal, gone when closed. Elsewhere one plain line now ("desc:
  total unit") and a silent bar: the items are quick, so a line per item would only be noise."""
  on_terminal = enabled and _is_terminal(sys.stderr)
  if enabled and not on_terminal:
    print(f"{desc}: {total} {unit}", file=sys.stderr, flush=True)
  return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False,
              disable=not on_terminal)
