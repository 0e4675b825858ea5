"""The NIAH accuracy heat map of the paper's Figures 6 and 7: haystack frames across, needle depth (single-hop)
or the caption and QA questions (multi-hop) down, one cell per record. matplotlib (Agg) is imported only here,
when a picture is drawn, so importing the evaluation code stays light. viridis: its lightness rises with the
value, so the picture reads the same in grey."""

from __future__ import annotations

from typing import Sequence

import numpy as np

COLORMAP = "viridis"


def niah_grid(records: Sequence[dict]) -> tuple[list[str], list[int], np.ndarray]:
  """(row labels, frame counts, accuracies (rows, frames) in [0, 1], NaN where no record) from tools/niah.py's
  records: single-hop {"Num. Frame", "Frame Depth", "Score"}, multi-hop {"Num. Frame", "Caption Score",
  "QA Score", ...}."""
  if not records:
    raise ValueError("no NIAH records to plot")
  frames = sorted({int(r["Num. Frame"]) for r in records})
  col = {f: j for j, f in enumerate(frames)}
  if "Frame Depth" in records[0]:
    depths = sorted({float(r["Frame Depth"]) for r in records})
    rows, row = [f"{d:g}%" for d in depths], {d: i for i, d in enumerate(depths)}
    grid = np.full((len(rows), len(frames)), np.nan)
    for r in records:
      grid[row[float(r["Frame Depth"])], col[int(r["Num. Frame"])]] = r["Score"]
    return rows, frames, grid
  grid = np.full((2, len(frames)), np.nan)
  for r in records:
    grid[:, col[int(r["Num. Frame"])]] = (r["Caption Score"], r["QA Score"])
  return ["CAP", "QA"], frames, grid


def niah_heatmap(records: Sequence[dict], path: str, title: str = "") -> np.ndarray:
  """Writes the heat map PNG to `path`; returns the grid it drew."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows, frames, grid = niah_grid(records)
  fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * len(frames) + 1.5), max(1.8, 0.4 * len(rows) + 1.2)), dpi=120)
  ax.imshow(grid, cmap=COLORMAP, vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
  ax.set_xticks(range(len(frames)), [str(f) for f in frames], rotation=90 if len(frames) > 8 else 0)
  ax.set_yticks(range(len(rows)), rows)
  ax.set_xlabel("Frames")
  ax.set_ylabel("Depth" if rows[0] != "CAP" else "")
  ax.set_title(title or f"NIAH accuracy, mean {np.nanmean(grid):.1%}")
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return grid
