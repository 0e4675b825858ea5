"""One device mesh, and the only place that knows which mesh axis a logical axis name maps to.

Modules name their axes (`("embed", "mlp")`, `("act_batch", "act_len", "act_emb")`); the rules below turn
those names into mesh axes. Changing the parallel layout is a change of these rules or of the mesh sizes in
the config, never an edit of model code (MaxText's logical-rules habit).
"""

from __future__ import annotations

import math
from typing import Sequence

from absl import logging
import flax.linen as nn
import jax
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
import numpy as np

# Slowest to fastest varying: data-parallel replicas outermost, tensor parallelism on the fastest links.
MESH_AXES = ("data", "fsdp", "seq", "tensor")

# Parameters: the embedding side of every matrix is sharded over fsdp *and* seq, so the replicas of the
# sequence axis do not each hold a full copy of the weights and optimizer state (LWM's layout).
PARAM_RULES = (
    ("embed", ("fsdp", "seq")),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
)

ACTIVATION_RULES = (
    # Video clips are folded into one batch for the vision tower and spread over every axis but tensor,
    # so with a sequence axis each device encodes only its own clips.
    ("act_clips", ("data", "fsdp", "seq")),
    ("act_batch", ("data", "fsdp")),
    ("act_len", "seq"),
    ("act_kv_len", "seq"),
    ("act_emb", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_head_dim", None),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)

LOGICAL_RULES = PARAM_RULES + ACTIVATION_RULES


def mesh_shape(mesh_config: Sequence[tuple[str, int]], num_devices: int) -> dict[str, int]:
  """Resolves `[(axis, size), ...]` with at most one -1 into sizes for all four mesh axes.

  Axes the config leaves out have size 1. The product must equal the number of devices.
  """
  sizes = {name: 1 for name in MESH_AXES}
  wildcard = None
  for name, size in mesh_config:
    if name not in sizes:
      raise ValueError(f"unknown mesh axis {name!r} in config.mesh; expected names from {MESH_AXES}")
    if sum(n == name for n, _ in mesh_config) > 1:
      raise ValueError(f"mesh axis {name!r} appears more than once in config.mesh {list(mesh_config)}")
    if size == -1:
      if wildcard is not None:
        raise ValueError(f"config.mesh has two -1 sizes ({wildcard!r} and {name!r}); at most one may be -1")
      wildcard = name
    elif size < 1:
      raise ValueError(f"mesh axis {name!r} has size {size}; sizes are positive or -1")
    else:
      sizes[name] = int(size)
  fixed = math.prod(s for n, s in sizes.items() if n != wildcard)
  if wildcard is not None:
    if num_devices % fixed:
      raise ValueError(f"config.mesh {list(mesh_config)}: the fixed axes multiply to {fixed}, which does not "
                       f"divide the {num_devices} devices, so {wildcard!r}=-1 has no integer size")
    sizes[wildcard] = num_devices // fixed
  if math.prod(sizes.values()) != num_devices:
    raise ValueError(f"config.mesh {list(mesh_config)} has {math.prod(sizes.values())} devices in all, "
                     f"but {num_devices} are available")
  return sizes


def make_mesh(mesh_config: Sequence[tuple[str, int]], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The mesh with axes `MESH_AXES`, sized from config.

  Axis types are Auto: flax linen's logical constraints call `with_sharding_constraint`, which only
  constrains (rather than asserts) on Auto axes.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(mesh_config, len(devices))
  shape = tuple(sizes[name] for name in MESH_AXES)
  try:
    # Knows the physical topology (ICI rings on TPU, NVLink islands on GPU) when devices are all local.
    device_grid = mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception as e:  # pylint: disable=broad-except  # e.g. a multi-slice TPU layout it does not know
    # Still a valid mesh, but collectives may cross slower links than they need to: say so.
    logging.warning("mesh_utils.create_device_mesh%s failed (%s); devices are laid out in listed order",
                    shape, e)
    device_grid = np.asarray(devices).reshape(shape)
  return Mesh(device_grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def axis_size(mesh: Mesh, logical_name: str, rules=LOGICAL_RULES) -> int:
  """Devices along the mesh axes that `logical_name` maps to (1 for none): e.g. "act_batch" -> data*fsdp,
  the rows a batch is split over; "act_len" -> seq; "embed" -> fsdp*seq. Code outside this module asks this
  rather than multiplying mesh axes it would have to know by name."""
  entry = nn.logical_to_mesh_axes((logical_name,), rules)[0]
  entry = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
  shape = dict(mesh.shape)
  return math.prod(shape.get(a, 1) for a in entry)


def ambient_axes(logical_name: str | None, divides: int | None = None) -> tuple[str, ...]:
  """The axes of the ambient mesh (`jax.set_mesh`) that the active logical rules (or LOGICAL_RULES) give
  `logical_name`, leaving out those the mesh lacks; with `divides`, trailing axes are dropped until their
  product divides it, as sharding constraints drop them. () without a mesh or a name."""
  mesh = jax.sharding.get_abstract_mesh()
  if logical_name is None or mesh.empty:
    return ()
  entry = nn.logical_to_mesh_axes((logical_name,), nn.get_logical_axis_rules() or LOGICAL_RULES)[0]
  entry = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
  axes = tuple(a for a in entry if a in mesh.shape)
  while divides is not None and axes and divides % ambient_size(axes):
    axes = axes[:-1]
  return axes


def ambient_size(axes: Sequence[str]) -> int:
  """Devices along `axes` of the ambient mesh (1 for none)."""
  shape = jax.sharding.get_abstract_mesh().shape
  return math.prod(shape[a] for a in axes)


def logical_to_sharding(logical_tree, mesh: Mesh, rules=LOGICAL_RULES):
  """Logical PartitionSpecs (or boxed params) -> NamedShardings on `mesh`."""
  specs = nn.get_partition_spec(logical_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def unbox_abstract(tree):
  """Boxed (logically partitioned) ShapeDtypeStructs -> plain ones. nn.unbox would also apply the
  sharding constraint, which an abstract value cannot take under a mesh."""
  return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.meta.AxisMetadata) else x,
                      tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def named_sharding(mesh: Mesh, *logical_axes: str | None, rules=LOGICAL_RULES) -> NamedSharding:
  """NamedSharding for an array whose dimensions carry these logical names."""
  return NamedSharding(mesh, nn.logical_to_mesh_axes(logical_axes, rules))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def sharding_report(params, shardings) -> tuple[str, float]:
  """A table of every parameter's shape, spec and per-device bytes; and the fraction of parameter bytes
  that sit unsharded (fully replicated) on every device.

  `params` may hold arrays or ShapeDtypeStructs; `shardings` is the matching tree of NamedShardings.
  """
  rows, total, replicated_bytes = [], 0, 0

  def row(path, leaf, sharding):
    nonlocal total, replicated_bytes
    nbytes = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
    per_device = math.prod(sharding.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize
    total += nbytes
    if per_device == nbytes:
      replicated_bytes += nbytes
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    rows.append(f"{name:60s} {str(tuple(leaf.shape)):24s} {str(sharding.spec):40s} {per_device / 2**20:10.2f} MiB")

  # tree_map pairs leaves by path and fails loudly if the two trees differ in structure.
  jax.tree_util.tree_map_with_path(row, params, shardings)
  fraction = replicated_bytes / max(total, 1)
  rows.append(f"total {total / 2**30:.3f} GiB; unsharded {replicated_bytes / 2**20:.2f} MiB ({100 * fraction:.3f}%)")
  return "\n".join(rows), fraction
