"""`ceilings` cases: what the device gives before any model. A bf16 8192^3 matmul on random data through jax
(XLA) and through torch (cuBLAS), and a device-to-device copy of 4 GiB (bytes read plus written). MFU is quoted
against the nominal 989 TFLOP/s on every Hopper; these say how far that nominal is from this card."""

from __future__ import annotations

import statistics

import jax
import jax.numpy as jnp

from hico_jax.bench import timing

SIZE, REPEATS = 8192, 10


def run_jax(case: dict) -> dict:
  n, repeats = SIZE, REPEATS
  a, b = (jax.random.normal(key, (n, n), jnp.bfloat16) for key in jax.random.split(jax.random.key(0)))
  matmul = jax.jit(lambda a, b: a @ b)
  source = jax.random.normal(jax.random.key(1), (2**30,), jnp.float32)     # 4 GiB
  add_one = jax.jit(lambda x: x + 1.0)   # one read and one write per element, as a copy

  def timed(fn, *args):
    def run():   # `repeats` launches per timed call, so the wait for the result is not in the kernel's time
      for _ in range(repeats):
        result = fn(*args)   # the device runs them in order: waiting for the last waits for all
      jax.block_until_ready(result)
    return [t / repeats for t in timing.time_calls(run, case["warmup"], case["iters"])]

  matmul_times, copy_times = timed(matmul, a, b), timed(add_one, source)
  return {"matmul_tflops": 2 * n**3 / statistics.median(matmul_times) / 1e12,
          "copy_tb_s": 2 * source.nbytes / statistics.median(copy_times) / 1e12,
          "times": matmul_times, "copy_times": copy_times, "device": jax.devices()[0].device_kind}


def run_torch(case: dict) -> dict:
  import torch  # pylint: disable=import-outside-toplevel  # only in the torch case's subprocess
  n, repeats = SIZE, REPEATS
  a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
  source = torch.randn(2**30, device="cuda", dtype=torch.float32)
  target = torch.empty_like(source)

  def timed(fn):
    def run():
      for _ in range(repeats):
        fn()
      torch.cuda.synchronize()
    return [t / repeats for t in timing.time_calls(run, case["warmup"], case["iters"])]

  matmul_times, copy_times = timed(lambda: a @ b), timed(lambda: target.copy_(source))
  return {"matmul_tflops": 2 * n**3 / statistics.median(matmul_times) / 1e12,
          "copy_tb_s": 2 * source.nbytes / statistics.median(copy_times) / 1e12,
          "times": matmul_times, "copy_times": copy_times, "device": torch.cuda.get_device_name()}
