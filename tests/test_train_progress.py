"""What a training stage prints (hico_jax/train/progress.py): on a terminal one bar that the log steps update
with loss, speed and ETA; without one, a plain line at the first log step, at most one a minute after it and
one at the last step. The trainer's own terminal output is checked in test_train_run.py."""

import fcntl
import io
import os
import pty
import struct
import termios

from hico_jax.train import progress


def test_on_a_terminal_the_log_steps_redraw_one_bar_in_place(monkeypatch):
  stream = io.StringIO()
  monkeypatch.setattr(progress, "_is_terminal", lambda s: s is stream)
  monkeypatch.setattr(progress.sys, "stderr", stream)
  bar = progress.StageProgress("stage1", total_steps=30, start_step=10)
  for step in (20, 30):
    bar.update(step, f"loss {step / 10:.4f}")
  bar.close()
  states = [s for s in stream.getvalue().split("\r") if s]
  assert stream.getvalue().count("\n") == 1
  assert states[0].startswith("stage1:  33%|") and "| 10/30 [" in states[0]            # resumed at step 10
  assert states[-1].startswith("stage1: 100%|") and "| 30/30 [" in states[-1]
  assert states[-1].rstrip().endswith(", loss 3.0000]") and any(", loss 2.0000]" in s for s in states)


def test_without_a_terminal_a_stage_prints_the_first_and_last_log_steps_and_one_a_minute_between(capfd):
  clock = iter([0.0, 10.0, 59.0, 61.0, 70.0, 80.0])      # seconds at the log steps 10, 20, ..., 60
  bar = progress.StageProgress("stage1", total_steps=60, start_step=0, clock=lambda: next(clock))
  for step in range(10, 61, 10):
    bar.update(step, f"loss {step}")
  bar.close()
  out, err = capfd.readouterr()
  assert out == "" and err.splitlines() == ["stage1 step 10/60: loss 10", "stage1 step 40/60: loss 40",
                                            "stage1 step 60/60: loss 60"]


def test_a_process_other_than_the_first_prints_nothing(capfd):
  bar = progress.StageProgress("stage1", total_steps=20, start_step=0, enabled=False)
  bar.update(10, "loss 1")
  bar.update(20, "loss 1")
  bar.close()
  assert capfd.readouterr() == ("", "")


def test_status_names_loss_speed_tokens_and_eta():
  values = {"loss": 2.345678, "seconds_per_step": 1.25, "tokens_per_s": 12345.6, "mfu": 0.4123}
  assert progress.status(values, eta_s=150.0, show_mfu=True) == (
      "loss 2.3457, 1.25 s/step, 12,346 tok/s, MFU 41.2%, ETA 2.5 min")
  fast = dict(values, seconds_per_step=0.25)
  assert progress.status(fast, eta_s=30.0, show_mfu=False) == "loss 2.3457, 4.00 steps/s, 12,346 tok/s, ETA 0.5 min"


def test_a_bar_needs_a_terminal_with_a_width():
  """tqdm draws an empty line on a pseudo-terminal of 0 columns (script(1) without a terminal): plain lines."""
  leader, follower = pty.openpty()
  with os.fdopen(follower, "w") as stream:
    for columns, bar in ((0, False), (100, True)):
      fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
      assert progress._is_terminal(stream) is bar
  os.close(leader)
  assert not progress._is_terminal(io.StringIO())


def test_a_count_bar_draws_on_a_terminal_and_prints_one_line_elsewhere(monkeypatch, capfd):
  """progress.count_bar (the held-out questions after training): a bar that counts on a terminal and is gone
  when closed; elsewhere one line saying how many, and nothing per item; disabled, nothing at all."""
  stream = io.StringIO()
  monkeypatch.setattr(progress, "_is_terminal", lambda s: s is stream)
  monkeypatch.setattr(progress.sys, "stderr", stream)
  bar = progress.count_bar(3, "scoring held-out questions", "questions")
  assert stream.getvalue().startswith("\rscoring held-out questions:   0%|") and "| 0/3 [" in stream.getvalue()
  for _ in range(3):
    bar.update()
  assert bar.n == 3 and not bar.disable
  bar.close()
  assert stream.getvalue().endswith("\r") and "\n" not in stream.getvalue()     # cleared, not left behind
  monkeypatch.undo()

  for enabled, expected in ((True, ["scoring held-out questions: 3 questions"]), (False, [])):
    bar = progress.count_bar(3, "scoring held-out questions", "questions", enabled=enabled)
    for _ in range(3):
      bar.update()
    bar.close()
    out, err = capfd.readouterr()
    assert out == "" and err.splitlines() == expected
