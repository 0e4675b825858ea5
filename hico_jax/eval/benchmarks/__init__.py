"""The paper's Table 2 benchmarks, scored as the official lmms-eval_videochat tasks do. A new benchmark is one
module defining BENCHMARK (a base.Benchmark), added to _MODULES."""

from __future__ import annotations

import importlib

from hico_jax.eval.benchmarks.base import Benchmark, Question, Score

# Table 2's column order (Video-MME's two columns: without and with subtitles); then LongVideoBench's test split,
# which is submitted to its leaderboard rather than scored here.
_MODULES = ("mvbench", "perceptiontest", "longvideobench", "mlvu", "videomme", "videomme_w_subtitle", "lvbench",
            "longvideobench_test")


def names() -> tuple[str, ...]:
  return _MODULES


def get(name: str) -> Benchmark:
  if name not in _MODULES:
    raise ValueError(f"unknown benchmark {name!r}; choose from {', '.join(_MODULES)}")
  return importlib.import_module(f"hico_jax.eval.benchmarks.{name}").BENCHMARK


__all__ = ["Benchmark", "Question", "Score", "get", "names"]
