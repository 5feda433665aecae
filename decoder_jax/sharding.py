"""The device mesh and the one table that maps logical axis names onto it.

Model code names logical axes only; `LOGICAL_AXIS_RULES` decides where each goes. A
mesh axis is used at most once per array: for activations `batch` takes `data` and
`fsdp`, so their `embed` stays whole, while parameters (which have no `batch`) shard
`embed` over `fsdp`.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from decoder_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # a batch's rows are split over these (LOGICAL_AXIS_RULES' batch)

LOGICAL_AXIS_RULES = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
)


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int, int]:
  """Resolves {data, fsdp, tensor} (one of them may be -1) against the device count."""
  sizes = [int(mesh_config[a]) for a in MESH_AXES]
  free = [i for i, s in enumerate(sizes) if s == -1]
  if len(free) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))}: each axis must be a positive size, "
                      "and at most one may be -1 (fill the remaining devices)")
  known = math.prod(s for s in sizes if s != -1)
  if free:
    if num_devices % known:
      raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))} does not fit {num_devices} devices: "
                        f"{num_devices} is not divisible by {known}")
    sizes[free[0]] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))} has {math.prod(sizes)} devices but "
                      f"{num_devices} are available; sizes must multiply to the device count "
                      "(or use -1 on one axis)")
  return tuple(sizes)


def make_mesh(mesh_config, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_config, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def data_parallel_size(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def _fit(spec: P, shape, mesh: Mesh) -> P:
  """Drops mesh axes from dimensions they do not divide (e.g. a 65-character vocab)."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = math.prod(mesh.shape[n] for n in names)
    fitted.append(axes if names and dim % size == 0 else None)
  return P(*fitted)


def shardings_for(abstract_boxed_tree, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
  """NamedShardings for a tree whose leaves may be flax `Partitioned` boxes (from eval_shape)."""
  logical = nn.get_partition_spec(abstract_boxed_tree)
  mesh_specs = nn.logical_to_mesh(logical, rules)
  shapes = nn.unbox(abstract_boxed_tree)
  return jax.tree.map(lambda spec, leaf: NamedSharding(mesh, _fit(spec, leaf.shape, mesh)),
                      mesh_specs, shapes, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def abstract_like(tree):
  """jax.ShapeDtypeStruct of each array in `tree`: its shape, dtype and sharding."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      tree)


def split_host_cpu(num_devices) -> None:
  """Presents the host CPU as `num_devices` JAX devices (a no-op for None).

  XLA runs one CPU device's program on about one core, so on a CPU-only machine a
  data-parallel mesh over several CPU devices is what puts every core to work.
  """
  if not num_devices:
    return
  try:
    jax.config.update("jax_num_cpu_devices", int(num_devices))
  except RuntimeError:  # the backend is already up (a notebook, a test): keep its devices
    logging.warning("mesh.num_cpu_devices=%s ignored: JAX already initialised %d devices",
                    num_devices, jax.device_count())
