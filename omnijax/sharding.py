"""Device mesh and the one table that maps logical axis names to mesh axes.

Models name the axes of every parameter and activation logically (``embed``, ``mlp``,
``heads``, ``exp``, ``batch`` ...); only this module (and a config override of its rules)
says which mesh axes those are. Mesh axes, outermost first: ``data``, ``fsdp``, ``expert``,
``context``, ``tensor``.

``context`` is context (sequence) parallelism for long rows: activations shard their sequence
over it, attention gathers keys and values over it (splash attention: each shard's queries
against the whole row), and parameters shard over it as over ``fsdp``.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from omnijax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "expert", "context", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")

# (logical name, mesh axes). Activation names carry an `act_` prefix where the parameter
# name of the same dimension would shard differently (parameters shard `embed` over fsdp,
# activations keep it whole).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
  # activations
  ("batch", BATCH_AXES),
  ("seq", "context"),
  ("act_embed", None),
  ("act_heads", "tensor"),
  ("act_kv_heads", "tensor"),
  ("act_kv", None),
  ("act_mlp", "tensor"),
  ("act_vocab", "tensor"),
  ("act_exp", None),
  # parameters
  ("embed", ("fsdp", "context")),
  ("vocab", "tensor"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("kv", None),
  ("mlp", "tensor"),
  ("exp", "expert"),
  ("layers", None),
  ("codebook", None),
  ("norm", None),
  ("router", None),
)


def rules_as_strings() -> dict[str, str]:
  """DEFAULT_RULES as {logical: 'mesh,axes'} ('' = replicated): the config's editable form."""
  return {name: ",".join(_as_tuple(axes)) for name, axes in DEFAULT_RULES}


def _as_tuple(axes) -> tuple[str, ...]:
  if axes is None or axes == "":
    return ()
  if isinstance(axes, str):
    return tuple(a.strip() for a in axes.split(",") if a.strip())
  return tuple(axes)


def axis_rules(overrides: Any = None) -> tuple[tuple[str, Any], ...]:
  """DEFAULT_RULES with `overrides` ({logical: 'a,b' | (a, b) | None}) applied."""
  overrides = dict(overrides or {})
  known = {name for name, _ in DEFAULT_RULES}
  unknown = sorted(set(overrides) - known)
  if unknown:
    raise ConfigError(
      f"sharding.rules names unknown logical axes {unknown}; known: {sorted(known)}."
    )
  out = []
  for name, default in DEFAULT_RULES:
    axes = _as_tuple(overrides.get(name, default))
    for a in axes:
      if a not in MESH_AXES:
        raise ConfigError(f"sharding.rules.{name} maps to {a!r}, not a mesh axis {MESH_AXES}.")
    out.append((name, None if not axes else axes[0] if len(axes) == 1 else axes))
  return tuple(out)


def resolve_mesh_shape(shape: dict[str, int], num_devices: int, where: str) -> tuple[int, ...]:
  """Sizes for MESH_AXES from a dict; one entry may be -1 (fill the rest)."""
  unknown = sorted(set(shape) - set(MESH_AXES))
  if unknown:
    raise ConfigError(f"{where} has unknown axes {unknown}; mesh axes are {list(MESH_AXES)}.")
  sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
  fills = [a for a, s in zip(MESH_AXES, sizes) if s == -1]
  if len(fills) > 1:
    raise ConfigError(f"{where}: only one axis may be -1, got {fills}.")
  if any(s == 0 or s < -1 for s in sizes):
    raise ConfigError(
      f"{where}: axis sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}."
    )
  known = math.prod(s for s in sizes if s != -1)
  if fills:
    if num_devices % known:
      raise ConfigError(
        f"{where}: the fixed axes {dict(zip(MESH_AXES, sizes))} multiply to {known}, which does "
        f"not divide the {num_devices} devices; change the axis sizes."
      )
    sizes[MESH_AXES.index(fills[0])] = num_devices // known
  elif known != num_devices:
    raise ConfigError(
      f"{where} {dict(zip(MESH_AXES, sizes))} has {known} devices but {num_devices} are available; "
      f"make the sizes multiply to {num_devices} or set one axis to -1 "
      f"(e.g. --config.mesh.fsdp=-1)."
    )
  return tuple(sizes)


def make_mesh(mesh_cfg: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A Mesh over MESH_AXES from ``config.mesh`` ({axis: size} ICI, optional ``dcn`` {axis: size}).

  With a ``dcn`` part (multi-slice / multi-host over the data-center network), the ICI shape
  applies within a slice and the DCN shape across slices.
  """
  devices = list(devices if devices is not None else jax.devices())
  cfg = dict(mesh_cfg.to_dict() if hasattr(mesh_cfg, "to_dict") else mesh_cfg or {})
  dcn = dict(cfg.pop("dcn", None) or {})
  if sorted(set(dcn) - set(MESH_AXES)) or any(int(v) < 1 for v in dcn.values()):
    raise ConfigError(f"mesh.dcn={dcn} must map mesh axes {list(MESH_AXES)} to positive sizes.")
  dcn_shape = tuple(int(dcn.get(a, 1)) for a in MESH_AXES)
  num_slices = math.prod(dcn_shape)
  if len(devices) % num_slices:
    raise ConfigError(
      f"mesh.dcn {dict(dcn)} spans {num_slices} slices, which does not divide the "
      f"{len(devices)} devices."
    )
  ici_shape = resolve_mesh_shape(cfg, len(devices) // num_slices, "mesh")
  if num_slices > 1:
    device_array = mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices)
  else:
    try:
      device_array = mesh_utils.create_device_mesh(ici_shape, devices)
    except (AssertionError, NotImplementedError, ValueError):
      device_array = np.asarray(devices).reshape(ici_shape)
  return Mesh(device_array, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def logical_to_sharding(logical_specs: Any, mesh: Mesh, rules) -> Any:
  """Tree of logical PartitionSpecs -> tree of NamedShardings on `mesh`."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def batch_sharding(mesh: Mesh, rules, ndim: int = 2, batch_dim: int = 0) -> NamedSharding:
  """Sharding of a data array whose `batch_dim` is the global batch (other dims replicated)."""
  names = [None] * ndim
  names[batch_dim] = "batch"
  return NamedSharding(mesh, nn.logical_to_mesh_axes(tuple(names), rules))


def num_batch_shards(mesh: Mesh, rules) -> int:
  spec = nn.logical_to_mesh_axes(("batch",), rules)[0]
  axes = spec if isinstance(spec, tuple) else (spec,) if spec else ()
  return math.prod(mesh.shape[a] for a in axes)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
