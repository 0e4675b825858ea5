"""The held-out results table (hico_jax.train.evaluate.format_results): each task's p-value of choosing at
least that well by guessing, against scipy's binomial tail, and the significance marks and summary line."""

import numpy as np
import pytest
from scipy import stats

from hico_jax.train import evaluate


@pytest.mark.parametrize("count,chance", [(100, 0.2), (50, 0.2), (150, 0.2), (7, 0.5), (100, 1 / 3)])
def test_guessing_p_value_is_the_binomial_upper_tail(count, chance):
  for hits in range(count + 1):
    want = stats.binom.sf(hits - 1, count, chance)     # P(X >= hits)
    np.testing.assert_allclose(evaluate.guessing_p_value(hits, count, chance), want, rtol=1e-9, atol=1e-300)


def _row(line: str) -> list[str]:
  return line.split()


def test_table_gives_each_tasks_p_value_marks_the_significant_ones_and_ends_on_the_mean():
  results = {  # hits of 100 at chance 20%: 31 is the first count with P(X >= k) < 0.01
      "captioning": dict(choice=0.31, choice_chance=0.2, exact=0.05, exact_chance=1 / 60, count=100, skipped=0),
      "event_counting": dict(choice=0.30, choice_chance=0.2, exact=0.30, exact_chance=0.2, count=100, skipped=0),
      "event_relation": dict(choice=0.96, choice_chance=0.2, exact=0.9, exact_chance=0.05, count=100, skipped=0),
      "scene_relation": dict(choice=0.12, choice_chance=0.2, exact=0.1, exact_chance=0.05, count=50, skipped=2),
  }
  lines = evaluate.format_results(results).splitlines()
  assert _row(lines[0])[:4] == ["task", "choice", "chance", "p"]
  rows = {_row(line)[0]: _row(line) for line in lines[1:5]}
  for task, r in results.items():
    hits = round(r["choice"] * r["count"])
    want = stats.binom.sf(hits - 1, r["count"], r["choice_chance"])
    printed = float(rows[task][3])
    np.testing.assert_allclose(printed, want, rtol=0.051)         # printed to two significant digits
    assert (rows[task][4] == "*") == (want < 0.01), task
  assert lines[5].startswith("mean choice over 4 tasks 42.2%")   # (31 + 30 + 96 + 12) / 4
  assert "(2 of 4 tasks" in lines[5]
  assert lines[6] == "not scored, the video did not decode: scene_relation 2"


def test_picture_tasks_follow_the_video_tasks_line_with_their_own_and_leave_it_as_it_was():
  videos = {  # 31 of 100 at chance 20%: p < 0.01; 30 of 100: not
      "captioning": dict(choice=0.31, choice_chance=0.2, exact=0.0, exact_chance=0.02, count=100, skipped=0),
      "event_counting": dict(choice=0.30, choice_chance=0.2, exact=0.3, exact_chance=0.2, count=100, skipped=0),
  }
  pictures = {  # 33 of 50 at chance 50%: P(X >= 33) = 0.016; 34 of 50: 0.0077
      "image_comparison": dict(choice=0.66, choice_chance=0.5, exact=0.66, exact_chance=0.5, count=50, skipped=0,
                               media="image"),
      "shape_count": dict(choice=0.68, choice_chance=0.5, exact=0.6, exact_chance=0.2, count=50, skipped=1,
                          media="image"),
  }
  alone = evaluate.format_results(videos).splitlines()
  lines = evaluate.format_results({**pictures, **videos}).splitlines()
  assert lines[:4] == alone                       # header, the two video rows, the video line unchanged
  assert [_row(line)[0] for line in lines[4:6]] == ["image_comparison", "shape_count"]
  assert _row(lines[4])[4] != "*" and _row(lines[5])[4] == "*"
  assert lines[6] == "mean choice over 2 image tasks 67.0% (1 of 2 image tasks above chance at p < 0.01)"
  assert lines[7] == "not scored, the picture did not decode: shape_count 1"
