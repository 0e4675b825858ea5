"""The reference generation cached decoding is checked against: greedy tokens from re-running the whole
sequence (prompt + tokens so far) each step, one row at a time, with no KV cache."""

import numpy as np


def rerun_greedy(rerun, ids, mask, visual, new):
  """(B, new) greedy ids. `rerun(tokens, visual, segment_ids, targets)` -> logits (1, T, V) for one row
  right-padded to prompt + new tokens (one compile per row length). Only the last prompt token's target is
  supervised, so a training query rule of visual dropout picks the row the prefill's inference rule picks,
  and the generated tokens change no selection."""
  expected = []
  for row in range(len(ids)):
    real = mask[row] > 0
    prompt, prompt_len = ids[row][real], int(real.sum())
    total = prompt_len + new
    tokens, vis = np.zeros((1, total), np.int32), np.zeros((1, total), bool)
    tokens[0, :prompt_len], vis[0, :prompt_len] = prompt, visual[row][real]
    targets = np.full((1, total), -100, np.int32)
    targets[0, prompt_len - 1] = 1
    for step in range(new):
      length = prompt_len + step
      logits = rerun(tokens, vis, (np.arange(total) < length).astype(np.int32)[None], targets)
      tokens[0, length] = int(np.argmax(logits[0, length - 1]))
    expected.append(tokens[0, prompt_len:])
  return np.stack(expected)
