"""Rotary position embedding in Hugging Face's rotate-half convention (what Qwen2 checkpoints expect), with
optional YaRN scaling as transformers computes it (`_compute_yarn_parameters` in modeling_rope_utils.py)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax.numpy as jnp

from hico_jax.config_dicts import check_fields


@dataclasses.dataclass(frozen=True)
class YarnScaling:
  """YaRN (arXiv 2309.00071) as a config.json's `rope_scaling` / `rope_parameters` spells it. Frozen and
  hashable: it sits in Qwen2Config, which jit sees as a static argument. None means transformers' default
  (`attention_factor` from `factor`, `mscale` and `mscale_all_dim`; `beta_fast` 32, `beta_slow` 1); keeping
  None rather than the default writes a config.json back as it was read."""
  factor: float
  original_max_position_embeddings: int
  attention_factor: float | None = None
  beta_fast: float | None = None
  beta_slow: float | None = None
  mscale: float | None = None
  mscale_all_dim: float | None = None
  truncate: bool = True

  def __post_init__(self):
    def number(name, value):
      if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"YaRN {name} must be a number, got {value!r}")
      return float(value)

    # transformers warns (and computes something meaningless) below 1: factor is how much longer the
    # context gets, so < 1 is a typo, not a setting.
    factor = number("factor", self.factor)
    if factor < 1.0:
      raise ValueError(f"YaRN factor must be >= 1, got {self.factor!r}")
    original = self.original_max_position_embeddings
    if isinstance(original, bool) or not isinstance(original, int) or original <= 0:
      raise ValueError(f"YaRN original_max_position_embeddings must be a positive integer, got "
                       f"{original!r}")
    fields = {"factor": factor}
    for name in ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
      if getattr(self, name) is not None:
        fields[name] = number(name, getattr(self, name))
    if fields.get("attention_factor", 1.0) <= 0:
      raise ValueError(f"YaRN attention_factor must be > 0, got {self.attention_factor!r}")
    if not isinstance(self.truncate, bool):
      raise ValueError(f"YaRN truncate must be true or false, got {self.truncate!r}")
    if self.betas[0] < self.betas[1]:
      raise ValueError(f"YaRN beta_fast={self.beta_fast!r} must be >= beta_slow={self.beta_slow!r} "
                       "(defaults 32 and 1)")
    for name, value in fields.items():     # ints become floats, so equal settings compare and hash equal
      object.__setattr__(self, name, value)

  @property
  def betas(self) -> tuple[float, float]:
    # `or`, not `is None`: transformers treats a 0 as unset too.
    return self.beta_fast or 32, self.beta_slow or 1

  @classmethod
  def from_dict(cls, fields: Mapping[str, Any], max_position_embeddings: int) -> "YarnScaling":
    """From a `rope_scaling` dict ("type"/"rope_type" may say "yarn"). As transformers does, a missing
    original_max_position_embeddings is max_position_embeddings, and a null factor is their ratio."""
    fields = dict(fields)
    for key in ("type", "rope_type"):
      kind = fields.pop(key, "yarn")
      if kind != "yarn":
        raise ValueError(f"{key} = {kind!r} is not supported (only 'yarn')")
    check_fields(cls, fields, "YaRN")
    if "factor" not in fields:
      raise ValueError("YaRN needs the key 'factor'")
    original = fields.setdefault("original_max_position_embeddings", max_position_embeddings)
    if fields["factor"] is None and isinstance(original, int) and original > 0:
      fields["factor"] = max_position_embeddings / original
    return cls(**fields)

  def to_dict(self) -> dict[str, Any]:
    """The keys config.json carries (transformers' names), unset optional ones left out."""
    return {k: v for k, v in dataclasses.asdict(self).items() if v is not None and not (k == "truncate" and v)}

  def attention_scale(self) -> float:
    """What transformers multiplies cos and sin by (its `attention_scaling`)."""
    if self.attention_factor is not None:
      return self.attention_factor

    def get_mscale(scale, mscale=1.0):
      return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    if self.mscale and self.mscale_all_dim:
      return get_mscale(self.factor, self.mscale) / get_mscale(self.factor, self.mscale_all_dim)
    return get_mscale(self.factor)

  def inverse_frequencies(self, head_dim: int, theta: float):
    """(head_dim / 2,) float32: the original frequencies for dimensions that rotate fast enough to have seen
    every angle within original_max_position_embeddings (beta_fast turns), the interpolated ones (/ factor)
    for those slower than beta_slow turns, a linear ramp between. transformers' float32 arithmetic, op by op."""
    beta_fast, beta_slow = self.betas

    def correction_dim(turns):
      return head_dim * math.log(self.original_max_position_embeddings / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if self.truncate:
      low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
      high += 0.001      # transformers' guard against dividing by zero
    pos_freqs = theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (self.factor * pos_freqs)
    ramp = jnp.clip((jnp.arange(head_dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    return interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight


def rope_cos_sin(positions, head_dim: int, theta: float, scaling: YarnScaling | None = None):
  """cos, sin of shape (B, L, head_dim) for integer `positions` (B, L), computed in float32.

  Same arithmetic as transformers: inv_freq = 1 / theta^(2i/d) (or YaRN's blend), angles = position * inv_freq,
  the half table repeated ([f0..f(d/2-1), f0..f(d/2-1)]) to pair dimension i with i + d/2, and with YaRN
  cos and sin times its attention scale (in float32, before any cast to the compute dtype).
  """
  if scaling is None:
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  else:
    inv_freq = scaling.inverse_frequencies(head_dim, theta)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  angles = jnp.concatenate([angles, angles], axis=-1)
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  if scaling is not None:
    scale = scaling.attention_scale()
    cos, sin = cos * scale, sin * scale
  return cos, sin


def apply_rope(x, cos, sin):
  """x: (B, L, heads, head_dim); cos/sin: (B, L, head_dim). Returns x's dtype.

  cos and sin are cast to x's dtype first, as transformers does, so bf16 runs round the same way.
  """
  cos = cos[:, :, None, :].astype(x.dtype)
  sin = sin[:, :, None, :].astype(x.dtype)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rotated * sin
