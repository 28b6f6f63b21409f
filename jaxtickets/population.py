"""Populations: N models trained as one, by giving every leaf of a pytree a leading member axis.

A population is any pytree (params, a ``TrainState``, a study's state, a ticket, ...) whose leaves
all have the same leading size N, member ``i`` being ``tree[i]`` leaf by leaf. A step
``step(state, data) -> (state, metrics)`` keeps everything that differs per member in its state
(keys, kept counts, masks), so running it over a population is a map over that axis.
:func:`run` offers three maps; they compute the same function and differ only in speed and memory:

* ``"vmap"``: one batched program. Fastest for small nets, where one member cannot fill the chip.
* ``"map"``: ``lax.map`` in chunks of ``chunk_size`` members (vmap inside a chunk, chunks one
  after another). For large conv nets: vmapped conv weights become grouped convolutions, slower
  per image than plain ones, and the activations of all N members need not fit at once. (A model
  built with ``conv_impl="im2col"`` has no convolutions to group; see ``models.conv``.)
* ``"shard"``: the member axis is split over the devices of a mesh axis named ``"population"``,
  each device vmapping its share; the shared inputs (the data) are replicated.

No strategy reduces over the member axis, so every per-member quantity (BatchNorm statistics,
metrics, PRNG streams) stays the member's own. Batched convolutions sum in another order than
single ones, so a member's step in a population matches its solo step to ~1e-7, not bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

PyTree = Any

STRATEGIES = ("vmap", "map", "shard")
MESH_AXIS = "population"

# Fastest strategy per (platform, model family), from benchmarks/population.py, aws.py and
# cpu_loops.py (benchmarks/RESULTS.md, "The strategy table behind population.default_strategy").
# ResNets lose under vmap (vmapped conv weights become grouped convolutions); ResNet-18's "map"
# is inferred from one member alone vs vmapped members, not timed at N > 1.
_MEASURED: dict[tuple[str, str], dict[str, Any]] = {
    ("gpu", "convnet3"): {"strategy": "vmap", "chunk_size": None},
    ("gpu", "resnet18"): {"strategy": "map", "chunk_size": None},
    ("gpu", "resnet20"): {"strategy": "map", "chunk_size": None},
}
# Without a measurement: vmap up to this many parameters per member, map (one member at a time)
# above. ConvNet-3 (width 128, 32x32x3 input) has 0.32M parameters, ResNet-18 11M.
_SMALL_NET_PARAMS = 2_000_000


def size(population: PyTree) -> int:
  """The number of members N: the leading size of ``population``'s first leaf."""
  return int(np.shape(jax.tree.leaves(population)[0])[0])


def stack(trees: Sequence[PyTree]) -> PyTree:
  """Stacks N >= 1 members of one structure, leaf shapes and dtypes into a population."""
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def select(population: PyTree, index: int | Sequence[int] | jax.Array) -> PyTree:
  """Member ``index`` (an int: leaves lose the member axis) or a sub-population (a sequence or
  i32[M] array of indices).

  Raises:
    ValueError: a Python or NumPy index outside [-N, N) (JAX would clamp it silently).
  """
  if not isinstance(index, jax.Array):
    indices = np.asarray(index)
    num_members = size(population)
    if indices.size and (indices.min() < -num_members or indices.max() >= num_members):
      raise ValueError(f"member index {index!r} is out of range for a population of "
                       f"{num_members}")
    if not isinstance(index, (int, np.integer)):
      index = jnp.asarray(indices)
  return jax.tree.map(lambda leaf: leaf[index], population)


def unstack(population: PyTree) -> list[PyTree]:
  """The N members of ``population`` as a list (inverse of :func:`stack`)."""
  return [select(population, index) for index in range(size(population))]


def export_member(population: PyTree, index: int) -> PyTree:
  """Member ``index`` as a standalone pytree on the default device, e.g. to checkpoint alone:
  gathered to the host and placed, uncommitted, with no reference to the population's buffers
  or sharding."""
  return jax.device_put(jax.device_get(select(population, index)))


def init(fn: Callable[[jax.Array], PyTree], keys: jax.Array) -> PyTree:
  """The population ``fn(keys[i])``, built by one compiled ``vmap``.

  Args:
    fn: ``key -> member`` (params, a TrainState, ...); must be vmappable.
    keys: u32[N, 2] PRNG keys (or any pytree of per-member inputs with leading axis N).
  """
  return jax.jit(jax.vmap(fn))(keys)


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh whose one axis, ``"population"``, spans ``devices`` (default: all devices)."""
  return Mesh(np.asarray(jax.devices() if devices is None else list(devices)), (MESH_AXIS,))


def member_sharding(mesh: Mesh) -> NamedSharding:
  """Splits the leading (member) axis over the mesh's ``"population"`` axis; other mesh axes
  replicate."""
  if MESH_AXIS not in mesh.axis_names:
    raise ValueError(f"mesh axes {tuple(mesh.axis_names)} have no {MESH_AXIS!r} axis to shard "
                     "the population over")
  return NamedSharding(mesh, PartitionSpec(MESH_AXIS))


def shard(population: PyTree, mesh: Mesh | None = None) -> PyTree:
  """Places ``population`` on ``mesh`` (default: all devices), N / devices members per device.

  N must be a multiple of the size of the mesh's ``"population"`` axis.
  """
  return jax.device_put(population, member_sharding(make_mesh() if mesh is None else mesh))


def run(step: Callable[..., Any], *, strategy: str = "vmap", chunk_size: int | None = None,
        mesh: Mesh | None = None) -> Callable[..., Any]:
  """Turns a single-member ``step(state, *shared)`` into a step over a population of states.

  Args:
    step: the per-member function, e.g. ``(state, data) -> (state, metrics)``; everything that
      differs per member is in ``state``.
    strategy: "vmap", "map" or "shard" (see the module docstring).
    chunk_size: "map" only: members vmapped together per chunk (None: one at a time); N need
      not be a multiple of it.
    mesh: "shard" only: a mesh with a "population" axis, whose size divides N (default: all
      devices in a 1-D mesh).

  Returns:
    ``population_step(states, *shared)``: ``states`` with leading axis N, ``shared`` the same for
    every member; every output leaf gets the leading axis N. For "shard" it is jitted with its
    outputs sharded over the mesh; for the others, a plain function to jit (or to wrap in
    ``train.repeat``).
  """
  if strategy == "vmap":
    def population_step(states, *shared):
      return jax.vmap(lambda state: step(state, *shared))(states)

  elif strategy == "map":
    def population_step(states, *shared):
      return jax.lax.map(lambda state: step(state, *shared), states, batch_size=chunk_size)

  elif strategy == "shard":
    mesh = make_mesh() if mesh is None else mesh
    per_member = member_sharding(mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    compiled: dict[int, Callable[..., Any]] = {}

    def population_step(states, *shared):
      if size(states) % mesh.shape[MESH_AXIS]:
        raise ValueError(f"a population of {size(states)} members cannot be split evenly over "
                         f"the {mesh.shape[MESH_AXIS]} devices of mesh axis {MESH_AXIS!r}")
      shardings = (per_member,) + (replicated,) * len(shared)
      if len(shared) not in compiled:
        compiled[len(shared)] = jax.jit(
            lambda states, *shared: jax.vmap(lambda state: step(state, *shared))(states),
            in_shardings=shardings, out_shardings=per_member)
      # jit refuses arrays committed to other devices (a state restored onto one device);
      # placing them first is free for arrays already where they belong.
      return compiled[len(shared)](*jax.device_put((states, *shared), shardings))

  else:
    raise ValueError(f"unknown population strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
  return population_step


def default_strategy(model_name: str, num_params: int, *,
                     platform: str | None = None) -> dict[str, Any]:
  """Keyword arguments of :func:`run` for the fastest measured strategy of ``model_name``.

  On CPU one member at a time ("map"; XLA:CPU has no fast grouped convolution); elsewhere the
  measured table in this module when it has ``(platform, model_name)``, otherwise "vmap" for nets
  of at most 2M parameters per member and "map" one member at a time above.

  Args:
    model_name: the registry name ("convnet3", "resnet18", ...).
    num_params: parameters per member (decides for models without a measurement).
    platform: "cpu", "gpu" or "tpu"; default ``jax.default_backend()``.
  """
  platform = jax.default_backend() if platform is None else platform
  if platform == "cpu":
    return {"strategy": "map", "chunk_size": None}
  measured = _MEASURED.get((platform, model_name))
  if measured is not None:
    return dict(measured)
  strategy = "vmap" if num_params <= _SMALL_NET_PARAMS else "map"
  return {"strategy": strategy, "chunk_size": None}
