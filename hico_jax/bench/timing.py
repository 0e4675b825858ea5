"""The one timer of the benchmarks: warm-up calls, then the wall time of each timed call. A case's `fn` waits for
its own result (block_until_ready, cuda.synchronize), so the time is the work's, not its dispatch's."""

from __future__ import annotations

import time


def time_calls(fn, warmup: int, iters: int) -> list[float]:
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times
