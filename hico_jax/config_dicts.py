"""Config dataclasses from plain dicts (ConfigDict sections, config.json fields): one rule for all of them.

A field the dataclass does not have is refused by name, with the fields it has: a typo in a config or an
override must stop the run, not pass silently. A leaf module, so that ops (YaRN), data and models all read
their configs the same way without importing one another.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping


def check_fields(cls, fields: Mapping[str, Any], what: str) -> None:
  """Raises ValueError naming every key of `fields` that is not a field of the dataclass `cls`."""
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(f"unknown {what} config field(s) {unknown}; known fields are {sorted(known)}")


def dataclass_from_dict(cls, fields: Mapping[str, Any], what: str):
  """cls(**fields), after `check_fields`."""
  check_fields(cls, fields, what)
  return cls(**fields)
