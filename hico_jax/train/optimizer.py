"""The optimizer from config: AdamW, warmup then cosine, global grad-norm clipping, and per-module learning
rates and freezing as data.

  config.schedule = [("visual/vision_tower/.*", 0.2),   # ViT at 0.2 x the base learning rate
                     ("llm/.*", None),                  # frozen: no optimizer state, no update
                     (".*", 1.0)]                       # everything else at the base rate

Each parameter takes the first rule whose regex matches its path ("visual/projector/fc1/kernel"), so the
reference's per-module rates (ViT 2e-6 under a 1e-5 base) are actually applied, which DeepSpeed's optimizer
silently skipped there (videochat_flash.md §6).
"""

from __future__ import annotations

import re
from typing import Sequence

import jax
import optax


def param_path(path) -> str:
  return "/".join(str(getattr(k, "key", k)) for k in path)


def group_labels(params, rules: Sequence[tuple[str, float | None]]):
  """The same tree as params, each leaf the index (as a string) of the first matching rule."""
  compiled = [(re.compile(pattern), i) for i, (pattern, _) in enumerate(rules)]

  def label(path, _):
    name = param_path(path)
    for regex, i in compiled:
      if regex.fullmatch(name):
        return str(i)
    raise ValueError(f"parameter {name!r} matches no rule of config.schedule; end the list with ('.*', 1.0)")

  return jax.tree_util.tree_map_with_path(label, params)


def frozen_mask(params, rules) -> object:
  """True for the leaves whose rule says None (frozen)."""
  labels = group_labels(params, rules)
  return jax.tree.map(lambda label: rules[int(label)][1] is None, labels)


# The names config.optim may choose, with the defaults; anything else is a config error, not a fallback.
CHOICES = {"optimizer": ("adamw", ("adamw", "sgd")), "schedule_type": ("cosine", ("cosine", "constant"))}


def config_problems(config) -> list[str]:
  """One line per misspelt choice in config.optim (validate reports them with the other config errors)."""
  return [f"optim.{field}={config.get(field, default)!r} is not one of {allowed}"
          for field, (default, allowed) in CHOICES.items() if config.get(field, default) not in allowed]


def learning_rate_schedule(config) -> optax.Schedule:
  """schedule_type "cosine" (the default): linear warmup over warmup_ratio of the steps, then cosine to zero
  (HF's cosine-with-warmup); "constant": lr throughout."""
  if config.get("schedule_type", "cosine") == "constant":
    return optax.constant_schedule(config.lr)
  warmup = int(round(config.warmup_ratio * config.total_steps))
  return optax.warmup_cosine_decay_schedule(0.0, config.lr, warmup, max(config.total_steps, warmup + 1), 0.0)


def make_optimizer(config, params) -> tuple[optax.GradientTransformation, dict]:
  """(optimizer, {group index: schedule}) for `params`. config: lr, total_steps, warmup_ratio, b1, b2, eps,
  weight_decay, grad_clip, schedule (the rule list), optimizer ("adamw" | "sgd")."""
  rules = [tuple(rule) for rule in config.schedule]
  problems = config_problems(config)
  if problems:
    raise ValueError("; ".join(problems))
  base = learning_rate_schedule(config)
  transforms, schedules = {}, {}
  for i, (_, scale) in enumerate(rules):
    if scale is None:
      transforms[str(i)] = optax.set_to_zero()          # frozen: no state, no update
      continue
    schedule = (lambda s: (lambda step: base(step) * s))(scale)
    schedules[str(i)] = schedule
    if config.get("optimizer", "adamw") == "sgd":
      transforms[str(i)] = optax.sgd(schedule)
    else:
      transforms[str(i)] = optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                                       weight_decay=config.weight_decay)
  labels = group_labels(params, rules)
  chain = []
  if config.get("grad_clip"):
    chain.append(optax.clip_by_global_norm(config.grad_clip))
  chain.append(optax.multi_transform(transforms, labels))
  return optax.chain(*chain), schedules
