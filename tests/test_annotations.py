"""Annotation sampling strategies against the reference loader's rules."""

import math

import numpy as np
import pytest

from hico_jax.data import annotations


def _reference_select(n, strategy):
  """The reference loader's rule, transcribed: N or ceil(P% of n); first / end slices."""
  if strategy == "all":
    return list(range(n))
  kind, number = strategy.split(":")
  count = math.ceil(int(number[:-1]) * n / 100) if "%" in number else int(number)
  items = list(range(n))
  return items[:count] if kind == "first" else items[-count:] if count else []


@pytest.mark.parametrize("n", [0, 1, 7, 100, 101])
@pytest.mark.parametrize("strategy", ["all", "first:3", "first:50%", "end:5", "end:33%", "first:100%"])
def test_sampling_strategies_follow_the_reference_rules(n, strategy):
  assert annotations.select(n, strategy).tolist() == _reference_select(n, strategy)


def test_random_strategy_is_seeded_sorted_and_sized():
  picked = annotations.select(100, "random:25%", seed=3)
  assert len(picked) == 25 and np.all(np.diff(picked) > 0)
  np.testing.assert_array_equal(picked, annotations.select(100, "random:25%", seed=3))
  with pytest.raises(ValueError, match="unknown sampling_strategy"):
    annotations.select(10, "middle:3")
