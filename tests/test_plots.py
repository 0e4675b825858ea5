"""The NIAH heat map PNG: read back with OpenCV, its cells found by their colour, checked against the records:
the grid's shape, and the cells' lightness ordered as the accuracies (viridis' lightness rises with the value)."""

import cv2
import numpy as np
import pytest

from hico_jax.eval import plots

SINGLE = [  # 3 depths x 4 frame counts, every accuracy different
    {"Num. Frame": f, "Frame Depth": d, "Score": s}
    for (f, d), s in zip([(f, d) for f in (100, 200, 300, 400) for d in (0.0, 50.0, 100.0)],
                         [0.9, 0.1, 0.5, 0.3, 0.7, 0.05, 1.0, 0.2, 0.6, 0.4, 0.8, 0.0])]
MULTI = [{"Num. Frame": f, "Caption Score": c, "QA Score": q, "Score": (c + q) / 2}
         for f, c, q in ((64, 0.25, 0.75), (128, 1.0, 0.5), (256, 0.0, 0.6))]


def _cells(png_path, rows, cols):
  """Colours at the cell centres, the heat map being the box of saturated pixels (text and background are
  grey)."""
  image = cv2.imread(str(png_path))
  assert image is not None
  saturation = image.max(-1).astype(int) - image.min(-1)
  ys, xs = np.nonzero(saturation > 40)
  top, bottom, left, right = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
  h, w = (bottom - top) / rows, (right - left) / cols
  centres = image[(top + h * (np.arange(rows) + 0.5)).astype(int)[:, None],
                  (left + w * (np.arange(cols) + 0.5)).astype(int)[None, :]]
  # Shape: the runs of one colour at least 3 px long along the middle row (and down the middle column).
  return centres, (_runs(image[top:bottom, (left + right) // 2]), _runs(image[(top + bottom) // 2, left:right]))


def _runs(line):
  boundaries = np.flatnonzero(np.abs(np.diff(line.astype(int), axis=0)).sum(-1) > 30)
  lengths = np.diff(np.concatenate([[-1], boundaries, [len(line) - 1]]))
  return int(np.sum(lengths >= 3))


def _lightness(bgr):
  return cv2.cvtColor(bgr.astype(np.uint8).reshape(-1, 1, 3), cv2.COLOR_BGR2LAB)[:, 0, 0].astype(int)


@pytest.mark.parametrize("records,shape,expected", [
    (SINGLE, (3, 4), np.array([[0.9, 0.3, 1.0, 0.4], [0.1, 0.7, 0.2, 0.8], [0.5, 0.05, 0.6, 0.0]])),
    (MULTI, (2, 3), np.array([[0.25, 1.0, 0.0], [0.75, 0.5, 0.6]]))])
def test_heatmap_has_the_grids_shape_and_colours_ordered_as_the_accuracies(records, shape, expected, tmp_path):
  path = tmp_path / "niah.png"
  plots.niah_heatmap(records, str(path))
  centres, runs = _cells(path, *shape)
  assert runs == shape
  light = _lightness(centres)
  acc = expected.reshape(-1)
  assert list(np.argsort(light, kind="stable")) == list(np.argsort(acc, kind="stable"))


def test_grid_rows_are_depths_or_cap_and_qa():
  rows, frames, grid = plots.niah_grid(SINGLE)
  assert (rows, frames, grid[2, 0]) == (["0%", "50%", "100%"], [100, 200, 300, 400], 0.5)
  rows, frames, grid = plots.niah_grid(MULTI)
  assert (rows, frames, grid[1].tolist()) == (["CAP", "QA"], [64, 128, 256], [0.75, 0.5, 0.6])
