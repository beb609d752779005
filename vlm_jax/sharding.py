"""The device mesh and the one table that maps logical axis names to mesh axes.

Every param and activation is annotated with logical names (Flax `nn.with_logical_partitioning`,
`nn.with_logical_constraint`); `LOGICAL_AXIS_RULES` turns them into PartitionSpecs over the mesh axes
`data`, `fsdp`, `expert`, `tensor`. Change sharding here, nowhere else.

Axis order (data, fsdp, expert, tensor): the innermost (last) axis gets the closest devices, so tensor
parallelism (an all-reduce per layer) sits innermost, then the expert all-to-all of MoE layers, then FSDP's
weight all-gathers, then data parallelism (one gradient all-reduce per step). Like MaxText, the batch of
activations is sharded over (data, fsdp, expert): outside MoE layers the expert axis is one more data axis.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vlm_jax.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# Logical axis -> mesh axis (or axes, or None = replicated). Parameters shard their `embed`-like axis
# over fsdp (ZeRO-3) and their heads/mlp/vocab axis over tensor (Megatron). Activations use `act_*`
# names so that the batch goes over (data, fsdp, expert) while the embed axis of activations stays whole.
# MoE expert weights shard their leading `exp` axis over expert; between dispatch and combine the expert
# activations are [exp, batch, capacity, embed] with exp over expert and the batch over (data, fsdp) only.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    # parameters
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("table_vocab", None),  # embedding tables: vocab-sharded gathers rematerialize, shard embed only
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
    ("vision_embed", "fsdp"),
    ("vision_mlp", "tensor"),
    ("positions", None),
    ("patch", None),
    ("channels", None),
    ("proj_in", "fsdp"),
    ("exp", "expert"),
    # activations
    ("act_batch", ("data", "fsdp", "expert")),
    ("act_exp", "expert"),
    ("act_exp_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("act_tiles", None),
)


def axis_sizes(cfg: MeshConfig, num_devices: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """Resolves -1 in the ICI axes. Returns (ici_sizes, dcn_sizes) in MESH_AXES order."""
  dcn = (cfg.dcn_data, cfg.dcn_fsdp, cfg.dcn_expert, cfg.dcn_tensor)
  if any(d < 1 for d in dcn):
    raise ConfigError(f"mesh.dcn_* must be >= 1, got {dcn}.")
  per_slice = num_devices // math.prod(dcn)
  if per_slice * math.prod(dcn) != num_devices:
    raise ConfigError(f"{num_devices} devices do not split into DCN axes {dcn}.")
  ici = [cfg.data, cfg.fsdp, cfg.expert, cfg.tensor]
  fill = [i for i, n in enumerate(ici) if n == -1]
  if len(fill) > 1:
    raise ConfigError(f"mesh: at most one of data/fsdp/expert/tensor may be -1, got {tuple(ici)}.")
  known = math.prod(n for n in ici if n != -1)
  if fill:
    if per_slice % known:
      raise ConfigError(f"mesh {dict(zip(MESH_AXES, ici))}: {per_slice} devices per slice are not "
                        f"divisible by {known}.")
    ici[fill[0]] = per_slice // known
  if math.prod(ici) != per_slice:
    raise ConfigError(f"mesh {dict(zip(MESH_AXES, ici))} needs {math.prod(ici)} devices per slice, "
                      f"have {per_slice} ({num_devices} devices, dcn {dcn}). Use -1 on one axis to fill.")
  return tuple(ici), dcn


def make_mesh(cfg: MeshConfig, devices: list[Any] | None = None) -> Mesh:
  """Builds the (data, fsdp, expert, tensor) mesh over `devices` (default: all), topology-aware when possible."""
  devices = list(jax.devices() if devices is None else devices)
  ici, dcn = axis_sizes(cfg, len(devices))
  if math.prod(dcn) > 1:
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices, allow_split_physical_axes=True)
  else:
    try:
      grid = mesh_utils.create_device_mesh(ici, devices=devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):
      grid = np.array(devices).reshape(ici)
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)  # linen logical constraints need Auto axes
  return Mesh(grid, MESH_AXES, axis_types=auto)


def logical_to_spec(logical_axes: tuple[str | None, ...]) -> P:
  """PartitionSpec for one tuple of logical axis names."""
  return nn.logical_to_mesh_axes(logical_axes, LOGICAL_AXIS_RULES)


def logical_shardings(logical_tree: Any, mesh: Mesh) -> Any:
  """Maps a pytree of logical PartitionSpecs (from `nn.get_partition_spec`) to NamedShardings."""
  return nn.logical_to_mesh_sharding(logical_tree, mesh, LOGICAL_AXIS_RULES)


def data_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Batch arrays: leading axis over (data, fsdp, expert) (as `act_batch`), the rest replicated."""
  return NamedSharding(mesh, P(dict(LOGICAL_AXIS_RULES)["act_batch"], *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_shards(mesh: Mesh) -> dict[int, tuple[int, ...]]:
  """Process index -> the batch shards its devices hold: indices into the product of the batch axes (data,
  fsdp, expert), major to minor, as `data_sharding` cuts the leading axis. Two processes of one tensor-parallel
  group hold the same shards; under pure data parallelism every process holds its own."""
  axes = data_sharding(mesh, 1).spec[0]
  order = [mesh.axis_names.index(a) for a in axes] + [i for i, a in enumerate(mesh.axis_names) if a not in axes]
  grid = np.transpose(mesh.devices, order).reshape(math.prod(mesh.shape[a] for a in axes), -1)
  held: dict[int, set[int]] = {}
  for shard, devices in enumerate(grid):
    for device in devices:
      held.setdefault(device.process_index, set()).add(shard)
  return {p: tuple(sorted(s)) for p, s in sorted(held.items())}


def feed_group(mesh: Mesh, process_index: int | None = None) -> tuple[int, int]:
  """(group, groups): processes whose devices hold the same batch shards form a feed group and must feed the
  same rows; `groups` counts the distinct groups (= the process count under pure data parallelism, 1 when a
  batch shard spans every host). Groups are numbered in the order of their first batch shard."""
  held = batch_shards(mesh)
  process_index = jax.process_index() if process_index is None else process_index
  groups = sorted(set(held.values()))
  if sum(len(g) for g in groups) != len({s for g in groups for s in g}) or len({len(g) for g in groups}) > 1:
    raise ConfigError(f"mesh {dict(mesh.shape)}: processes hold overlapping or unequal sets of batch shards "
                      f"({held}); make the batch axes (data, fsdp, expert) split evenly over the hosts, e.g. put "
                      "the axes that span hosts in mesh.dcn_*.")
  return groups.index(held[process_index]), len(groups)
