"""Conversion as a table: each row maps one Hugging Face tensor to one or more params and back.

A row names the HF key ("{i}" stands for the layer index), the params paths it fills, and the transforms
both ways. Per-layer rows stack their layers on axis 0, as nn.scan stores them. A fused HF tensor (UMT's
qkv) fills several paths. Every transform is a pure transpose/reshape/split, so HF -> params -> HF
reproduces the checkpoint bit for bit.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Rule:
  hf: str
  paths: tuple[tuple[str, ...], ...]
  to_jax: Callable[[np.ndarray], tuple[np.ndarray, ...]]
  to_hf: Callable[..., np.ndarray]
  layers: int = 0          # > 0: one HF key per layer, stacked on axis 0 of each path

  def hf_keys(self) -> list[str]:
    return [self.hf.format(i=i) for i in range(self.layers)] if self.layers else [self.hf]


def one(hf: str, path: tuple[str, ...], to_jax=None, to_hf=None, layers: int = 0) -> Rule:
  """A row that maps one tensor to one param (identity unless transforms are given)."""
  to_jax, to_hf = to_jax or (lambda x: x), to_hf or (lambda x: x)
  return Rule(hf, (path,), lambda x: (to_jax(x),), to_hf, layers)


def prefixed(rules: list[Rule], path_prefix: tuple[str, ...]) -> list[Rule]:
  """The same rows with every params path moved under `path_prefix` (e.g. ("llm",))."""
  return [dataclasses.replace(r, paths=tuple(path_prefix + p for p in r.paths)) for r in rules]


# Transforms shared by the tables: torch Linear weights are (out, in), ours are (in, ...out).
def linear(w):
  return w.T


def linear_to_heads(heads):          # (heads*head_dim, D) -> (D, heads, head_dim)
  return lambda w: w.T.reshape(w.shape[1], heads, -1)


def heads_to_linear(w):              # (D, heads, head_dim) -> (heads*head_dim, D)
  return w.reshape(w.shape[0], -1).T


def bias_to_heads(heads):            # (heads*head_dim,) -> (heads, head_dim)
  return lambda b: b.reshape(heads, -1)


def flatten(b):
  return b.reshape(-1)


def out_linear_to_heads(heads):      # (D, heads*head_dim) -> (heads, head_dim, D)
  return lambda w: w.T.reshape(heads, -1, w.shape[0])


def heads_to_out_linear(w):          # (heads, head_dim, D) -> (D, heads*head_dim)
  return w.reshape(-1, w.shape[-1]).T


def to_params(reader, rules: list[Rule], dtype=None, put=None) -> dict:
  """HF tensors (a mapping from key to numpy array) -> nested params dict of numpy arrays, or of whatever
  `put` makes of each finished param (jax.device_put: the host then holds one stacked param at a time, not
  the model). Each tensor is cast to `dtype` as it is read, so a bf16 load never stacks float32 copies."""
  params: dict[str, Any] = {}
  cast = (lambda x: x) if dtype is None else (lambda x: x.astype(dtype))
  for rule in rules:
    values = None
    for i, key in enumerate(rule.hf_keys()):
      parts = [cast(part) for part in rule.to_jax(reader[key])]
      if not rule.layers:
        values = parts
        break
      if values is None:      # layers go straight into their stack: no list of them beside it
        values = [np.empty((rule.layers,) + part.shape, part.dtype) for part in parts]
      for stack, part in zip(values, parts):
        stack[i] = part
    for path, value in zip(rule.paths, values):
      _set(params, path, value if put is None else put(value))
  return params


def to_tensors(params, rules: list[Rule], dtype=None) -> dict[str, np.ndarray]:
  """Nested params -> HF tensors, keys in table order."""
  out = {}
  for rule in rules:
    values = [np.asarray(_get(params, path)) for path in rule.paths]
    if dtype is not None:
      values = [v.astype(dtype) for v in values]
    for i, key in enumerate(rule.hf_keys()):
      parts = [v[i] for v in values] if rule.layers else values
      out[key] = np.ascontiguousarray(rule.to_hf(*parts))
  return out


def _set(tree, path, value):
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree
