"""LongVideoBench's test split (longvideobench_test_v): the validation task's files, prompt and parser over
test-*.parquet (or lvb_test_wo_gt.json), which has no answers; the run writes the official submission file under
<out>/submissions/ instead of a score (see longvideobench)."""

from __future__ import annotations

import functools

from hico_jax.eval.benchmarks import longvideobench
from hico_jax.eval.benchmarks.base import Benchmark

BENCHMARK = Benchmark(name="longvideobench_test", column="LongVideoBench (test)",
                      load=functools.partial(longvideobench.load, split="test"), score=longvideobench.score,
                      max_new_tokens=32, folder="longvideobench",
                      submission=longvideobench.submission)
