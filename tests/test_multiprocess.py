"""Two processes with gloo collectives train exactly like one process on the same global batch, and log the
same counts."""

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

WORKER = os.path.join(os.path.dirname(__file__), "multiprocess", "train_steps.py")


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run(num_processes, out, port, log_dir):
  """Runs the worker in `num_processes` processes; fails as soon as one of them fails (its peers would wait
  in the collective forever), or after 10 minutes (~30 s alone on 2 cores; under xdist the other worker
  shares them). No process outlives the call."""
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
  env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  logs = [log_dir / f"{num_processes}_processes_{i}.log" for i in range(num_processes)]
  procs = []
  for i, log in enumerate(logs):
    with open(log, "wb") as f:   # a file, not a pipe: nobody reads while waiting, and a full pipe blocks
      procs.append(subprocess.Popen([sys.executable, WORKER, str(i), str(num_processes), str(port), str(out)],
                                    env=env, stdout=f, stderr=subprocess.STDOUT))
  deadline = time.monotonic() + 600
  try:
    while time.monotonic() < deadline:
      codes = [p.poll() for p in procs]   # every process polled: any() would stop at the first running one
      if all(code is not None for code in codes) or any(codes):
        break
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  # The process that failed first in the report, not a peer this call killed.
  failures = sorted((p.returncode == -signal.SIGKILL, i) for i, p in enumerate(procs) if p.returncode)
  if failures:
    killed, i = failures[0]
    how = "was killed: a peer failed or the time ran out" if killed else f"exited with {procs[i].returncode}"
    pytest.fail(f"process {i} of {num_processes} {how}:\n{logs[i].read_text(errors='replace')[-3000:]}")


def test_two_gloo_processes_train_like_one_process_with_the_same_global_batch(tmp_path):
  _run(1, tmp_path / "one.npz", _free_port(), tmp_path)
  _run(2, tmp_path / "two.npz", _free_port(), tmp_path)
  one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
  assert sorted(one.files) == sorted(two.files)
  np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-5)
  # The logged token and skipped-record counts are the whole global batch's, however many processes read it.
  np.testing.assert_array_equal(one["counts"], one["whole_batch_counts"])
  np.testing.assert_array_equal(two["counts"], two["whole_batch_counts"])
  for name in one.files:
    np.testing.assert_allclose(two[name], one[name], atol=1e-5, rtol=1e-5, err_msg=name)
