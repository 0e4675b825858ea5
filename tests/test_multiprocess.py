"""Two processes with gloo collectives train exactly like one process on the same global batch."""

import os
import socket
import subprocess
import sys

import numpy as np

WORKER = os.path.join(os.path.dirname(__file__), "multiprocess", "train_steps.py")


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run(num_processes, out, port):
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
  env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  procs = [subprocess.Popen([sys.executable, WORKER, str(i), str(num_processes), str(port), str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(num_processes)]
  for p in procs:
    output, _ = p.communicate(timeout=240)
    assert p.returncode == 0, output.decode()[-3000:]


def test_two_gloo_processes_train_like_one_process_with_the_same_global_batch(tmp_path):
  _run(1, tmp_path / "one.npz", _free_port())
  _run(2, tmp_path / "two.npz", _free_port())
  one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
  assert sorted(one.files) == sorted(two.files)
  np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-5)
  for name in one.files:
    np.testing.assert_allclose(two[name], one[name], atol=1e-5, rtol=1e-5, err_msg=name)
