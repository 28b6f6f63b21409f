"""Populations: N models trained as one, by giving every leaf of a pytree a leading member axis.

A population is any pytree (params, a ``TrainState``, a ticket, ...) whose leaves all have the
same leading size N, member ``i`` being ``tree[i]`` leaf by leaf. Train steps in ``train.py``
draw their own batches from ``(state.key, state.step)``, so running a step over a population only
needs a map over that axis; :func:`run` offers three, which compute the same function and differ
only in speed and memory:

* ``"vmap"``: one batched program. Fastest for small nets, where one member cannot fill the chip.
* ``"map"``: ``lax.map`` in chunks of ``chunk_size`` members (vmap inside a chunk, chunks one
  after another). For large conv nets: vmapping conv weights turns every conv into a grouped
  convolution, which is slower per image than the plain one, and activations of all N members
  need not fit at once. The default on CPU, which has no fast grouped convolution. (A model
  built with ``conv_impl="im2col"`` has no convolutions to group: vmapped, its convs are
  batched matrix products; ``models.conv``.)
* ``"shard"``: the member axis is split over the devices of a 1-D mesh axis named
  ``"population"``, each device vmapping its share; shared inputs (the data) are replicated.

No strategy reduces over the member axis, so every per-member quantity (BatchNorm statistics,
metrics, PRNG streams) stays the member's own. The function :func:`run` returns takes and returns
what the single-member step does, with the leading axis added, so it composes with
``train.repeat`` and ``loop.fit`` (whose metrics then come out as ``[steps, N]``).

Batched convolutions sum in another order than single ones, so a member's step in a population
matches its solo step to ~1e-7, not bit for bit; over hundreds of steps SGD on ReLU nets
amplifies that noise as it would any other (see tests/test_population.py), so long runs are
compared statistically, not by equal weights.

Populations are pytrees, so ``checkpoint.Checkpointer`` saves and restores them as they are;
:func:`export_member` takes one member out as a standalone model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxtickets import errors
from jaxtickets.errors import UserError

PyTree = Any

STRATEGIES = ("vmap", "map", "shard")
MESH_AXIS = "population"

# Fastest strategy per (platform, model family) for one training step of N members, measured by
# benchmarks/population.py on one H100 (2026-11-26, jax 0.11.2; benchmarks/RESULTS.md):
# - ("gpu", "convnet3"), batch 64, bf16: vmap of 32 members 186k img/s, vs 104k for one member
#   alone; vmap and chunked map are within 5% of each other at N = 8 and 32.
# - ("gpu", "resnet18"), batch 256, bf16: one member 49k img/s, but vmap of 4 members 28k and of
#   8 members 35k img/s in total (vmapped conv weights become slower grouped convolutions), so
#   members run one after another (map without chunks).
# - ("gpu", "resnet20"), batch 128, fp32 (benchmarks/aws.py, the AWS transfer sweep): vmap of 16
#   members 39k img/s in total vs 46k running them one after another; the same grouped-conv
#   penalty as ResNet-18 although ResNet-20 has only 0.27M parameters.
# - "cpu", every model: XLA:CPU has no fast grouped convolution, and since models.conv keeps loop
#   bodies on Eigen, members one after another win or tie (2 cores, 4 steps of N members,
#   2026-11-26): ConvNet-3 width 32, 16x16, batch 64, N = 8: map 202 ms vs vmap 738 ms; width
#   8, 8x8, batch 16, N = 8: 9 vs 15 ms; ResNet-18 width 8: 220 vs 322 ms; ResNet-20 on 8x8,
#   N = 4: 226 vs 209 ms.
_MEASURED: dict[tuple[str, str], dict[str, Any]] = {
    ("gpu", "convnet3"): {"strategy": "vmap", "chunk_size": None},
    ("gpu", "resnet18"): {"strategy": "map", "chunk_size": None},
    ("gpu", "resnet20"): {"strategy": "map", "chunk_size": None},
}
# Without a measurement: vmap up to this many parameters per member, map (one member at a time)
# above. ConvNet-3 (width 128, 32x32x3 input) has 0.32M parameters, ResNet-18 11M.
_SMALL_NET_PARAMS = 2_000_000


def _leaf_name(path: tuple) -> str:
  return jax.tree_util.keystr(path) or "<root>"


def size(population: PyTree) -> int:
  """The number of members N of ``population``.

  Raises:
    UserError: no array leaves, a leaf without a leading axis, leaves whose leading sizes
      differ, or N = 0.
  """
  leaves = jax.tree_util.tree_leaves_with_path(population)
  if not leaves:
    raise UserError("population has no array leaves")
  shapes = [(_leaf_name(path), np.shape(leaf)) for path, leaf in leaves]
  for name, shape in shapes:
    if not shape:
      raise UserError(f"population leaf {name} is a scalar; every leaf needs a leading member "
                      "axis")
  first_name, (num_members, *_) = shapes[0]
  for name, shape in shapes[1:]:
    if shape[0] != num_members:
      raise UserError(f"population leaf {name} has {shape[0]} members but {first_name} has "
                      f"{num_members}")
  if num_members == 0:
    raise UserError("population has 0 members; it needs at least 1")
  return num_members


def stack(trees: Sequence[PyTree]) -> PyTree:
  """Stacks members with one structure into a population (each leaf gets a leading axis N).

  Args:
    trees: N >= 1 pytrees with the same structure, leaf shapes and dtypes.

  Returns:
    The population: leaf ``x[...]`` of member ``i`` becomes ``stacked[i, ...]``.

  Raises:
    UserError: no trees, or a member whose structure, leaf shape or leaf dtype differs from
      member 0's.
  """
  trees = list(trees)
  if not trees:
    raise UserError("cannot stack 0 members; a population needs at least 1")
  first = jax.tree_util.tree_leaves_with_path(trees[0])
  structure = jax.tree_util.tree_structure(trees[0])
  for index, tree in enumerate(trees[1:], start=1):
    if jax.tree_util.tree_structure(tree) != structure:
      raise UserError(f"member {index} has a different tree structure from member 0")
    for (path, leaf0), leaf in zip(first, jax.tree_util.tree_leaves(tree)):
      if np.shape(leaf) != np.shape(leaf0) or jnp.result_type(leaf) != jnp.result_type(leaf0):
        raise UserError(f"member {index} leaf {_leaf_name(path)} is "
                        f"{jnp.result_type(leaf)}{list(np.shape(leaf))}, member 0's is "
                        f"{jnp.result_type(leaf0)}{list(np.shape(leaf0))}")
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def select(population: PyTree, index: int | Sequence[int] | jax.Array) -> PyTree:
  """Member ``index`` of ``population`` (leaves lose the member axis), or a sub-population.

  Args:
    population: a population of N members.
    index: an int in [-N, N) gives one member; a sequence or i32[M] array of indices gives a
      population of M members. Indices in jax arrays (possibly traced) are not range-checked.

  Raises:
    UserError: a Python or NumPy index out of range, or not integer.
  """
  num_members = size(population)
  if not isinstance(index, jax.Array):
    indices = np.asarray(index)
    if not np.issubdtype(indices.dtype, np.integer) or indices.ndim > 1:
      raise UserError(f"member index {index!r} is not an int or a 1-D sequence of ints")
    if indices.size and (indices.min() < -num_members or indices.max() >= num_members):
      raise UserError(f"member index {index!r} is out of range for a population of "
                      f"{num_members}")
  if not isinstance(index, (int, np.integer, jax.Array)):
    index = jnp.asarray(index)
  return jax.tree.map(lambda leaf: leaf[index], population)


def unstack(population: PyTree) -> list[PyTree]:
  """The N members of ``population`` as a list (inverse of :func:`stack`)."""
  return [select(population, index) for index in range(size(population))]


def export_member(population: PyTree, index: int) -> PyTree:
  """Member ``index`` as a standalone pytree on the default device, e.g. to checkpoint alone.

  Unlike :func:`select`, the result holds no reference to the population's buffers or sharding:
  it is gathered to the host and placed, uncommitted, on the default device.

  Raises:
    UserError: ``index`` not an int in [-N, N).
  """
  if not isinstance(index, (int, np.integer)):
    raise UserError(f"member index {index!r} is not an int")
  return jax.device_put(jax.device_get(select(population, index)))


def init(fn: Callable[[jax.Array], PyTree], keys: jax.Array) -> PyTree:
  """Builds a population with ``fn(key)`` per member, as one compiled ``vmap``.

  Args:
    fn: ``key -> member`` (params, a TrainState, ...); must be vmappable.
    keys: N PRNG keys (u32[N, 2], or a pytree of per-member inputs with leading axis N).

  Returns:
    The population of the N members ``fn(keys[i])``.

  Raises:
    UserError: N = 0, or inputs whose leading sizes differ.
  """
  if all(np.shape(leaf)[:1] == (0,) for leaf in jax.tree_util.tree_leaves(keys)):
    raise UserError("population init got 0 keys; a population needs at least 1 member")
  size(keys)
  return jax.jit(jax.vmap(fn))(keys)


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh whose one axis, ``"population"``, spans ``devices`` (default: all devices)."""
  devices = jax.devices() if devices is None else list(devices)
  if not devices:
    raise UserError("a population mesh needs at least one device")
  return Mesh(np.asarray(devices), (MESH_AXIS,))


def _check_mesh(mesh: Mesh) -> None:
  if MESH_AXIS not in mesh.axis_names:
    raise UserError(f"mesh axes {tuple(mesh.axis_names)} have no {MESH_AXIS!r} axis to shard "
                    "the population over")


def _check_divisible(num_members: int, mesh: Mesh) -> None:
  num_shards = mesh.shape[MESH_AXIS]
  if num_members % num_shards:
    raise UserError(f"population of {num_members} members cannot be split evenly over the "
                    f"{num_shards} devices of mesh axis {MESH_AXIS!r}")


def member_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding that splits the leading (member) axis over the mesh's ``"population"`` axis."""
  _check_mesh(mesh)
  return NamedSharding(mesh, PartitionSpec(MESH_AXIS))


def shard(population: PyTree, mesh: Mesh | None = None) -> PyTree:
  """Places ``population`` on ``mesh`` (default: all devices), N / devices members per device.

  Raises:
    UserError: the mesh has no "population" axis or N is not divisible by its size.
  """
  mesh = make_mesh() if mesh is None else mesh
  sharding = member_sharding(mesh)
  _check_divisible(size(population), mesh)
  return jax.device_put(population, sharding)


def check_options(strategy: str, chunk_size: int | None = None, mesh: Mesh | None = None) -> None:
  """Raises UserError for an unknown strategy or an option that does not apply to it."""
  if strategy not in STRATEGIES:
    raise UserError(f"unknown population strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
  if chunk_size is not None:
    if strategy != "map":
      raise UserError(f"chunk_size={chunk_size!r} applies to strategy 'map' only")
    errors.check_int("chunk_size", chunk_size)
  if mesh is not None and strategy != "shard":
    raise UserError(f"a mesh applies to strategy 'shard' only, not {strategy!r}")


def run(step: Callable[..., Any], *, strategy: str = "vmap", chunk_size: int | None = None,
        mesh: Mesh | None = None, member_axes: Sequence[int | None] = (0,)) -> Callable[..., Any]:
  """Turns a single-member ``step(state, *shared)`` into a step over a whole population.

  Args:
    step: the per-member function, e.g. ``train.make_train_step(...)``: ``(state, data) ->
      (state, metrics)``.
    strategy: "vmap", "map" or "shard" (see module docstring); they compute the same function,
      up to floating-point summation order.
    chunk_size: "map" only: members vmapped together per chunk (None: one at a time). N need
      not be a multiple; the remainder runs as one more chunk.
    mesh: "shard" only: a mesh with a "population" axis (default: all devices in a 1-D mesh).
      Other mesh axes, if any, replicate.
    member_axes: per positional argument, 0 if it carries the member axis, None if it is shared
      by all members; arguments beyond the sequence are shared. The default makes ``state``
      per member and everything after it (the data) shared.

  Returns:
    ``population_step(states, *shared)`` with the structure of ``step``'s inputs and outputs,
    every output leaf with a leading axis N. For "shard" it is jitted with outputs sharded over
    the mesh; for the others it is a plain function to jit (or to wrap in ``train.repeat``).

  Raises:
    UserError: unknown strategy, an option that does not apply to it, bad ``member_axes``; when
      called: N = 0, per-member arguments with different N, or (shard) N not divisible by the
      number of devices on the mesh axis.
  """
  check_options(strategy, chunk_size, mesh)
  member_axes = tuple(member_axes)
  if any(axis not in (0, None) for axis in member_axes) or 0 not in member_axes:
    raise UserError(f"member_axes={member_axes!r}; expected 0 (per member) or None (shared) per "
                    "argument, with at least one 0")

  def axes_of(args: tuple) -> tuple[int | None, ...]:
    """``member_axes`` padded to all of ``args``, after checking the member arguments agree."""
    if len(args) < len(member_axes):
      raise UserError(f"population step got {len(args)} arguments but member_axes names "
                      f"{len(member_axes)}")
    axes = member_axes + (None,) * (len(args) - len(member_axes))
    sizes = [size(arg) for arg, axis in zip(args, axes) if axis == 0]
    if len(set(sizes)) > 1:
      raise UserError(f"per-member arguments have different member counts {sizes}")
    return axes

  if strategy == "vmap":
    def population_step(*args):
      return jax.vmap(step, in_axes=axes_of(args))(*args)

  elif strategy == "map":
    def population_step(*args):
      axes = axes_of(args)

      def member_step(member_args: tuple) -> Any:
        members = iter(member_args)
        return step(*(next(members) if axis == 0 else arg for arg, axis in zip(args, axes)))

      member_args = tuple(arg for arg, axis in zip(args, axes) if axis == 0)
      return jax.lax.map(member_step, member_args, batch_size=chunk_size)

  else:
    mesh = make_mesh() if mesh is None else mesh
    per_member = member_sharding(mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    compiled: dict[int, Callable[..., Any]] = {}

    def population_step(*args):
      axes = axes_of(args)
      _check_divisible(size(args[axes.index(0)]), mesh)
      shardings = tuple(per_member if axis == 0 else replicated for axis in axes)
      if len(args) not in compiled:
        compiled[len(args)] = jax.jit(jax.vmap(step, in_axes=axes), in_shardings=shardings,
                                      out_shardings=per_member)
      # jit refuses arrays committed to other devices (a state restored onto one device);
      # placing them first is free for arrays already where they belong.
      return compiled[len(args)](*jax.device_put(args, shardings))

  return population_step


def default_strategy(model_name: str, num_params: int, *,
                     platform: str | None = None) -> dict[str, Any]:
  """Keyword arguments of :func:`run` for the fastest measured strategy of ``model_name``.

  On CPU one member at a time ("map"); elsewhere the measured table in this module when it has
  ``(platform, model_name)``, otherwise "vmap" for nets of at most 2M parameters per member and
  "map" one member at a time above.

  Args:
    model_name: the registry name ("convnet3", "resnet18", ...).
    num_params: parameters per member (decides for models without a measurement).
    platform: "cpu", "gpu" or "tpu"; default ``jax.default_backend()``.

  Returns:
    ``{"strategy": ..., "chunk_size": ...}``: use as ``run(step, **default_strategy(...))``.
  """
  platform = jax.default_backend() if platform is None else platform
  if platform == "cpu":
    return {"strategy": "map", "chunk_size": None}
  measured = _MEASURED.get((platform, model_name))
  if measured is not None:
    return dict(measured)
  if num_params <= _SMALL_NET_PARAMS:
    return {"strategy": "vmap", "chunk_size": None}
  return {"strategy": "map", "chunk_size": None}
