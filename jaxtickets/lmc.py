"""Linear mode connectivity: test error along the straight line between two networks.

At each ``t`` in ``linspace(0, 1, num_points)`` the network ``a + t * (b - a)`` (every param)
gets its BatchNorm statistics recomputed from reset by one train-mode pass over augmented
training batches (AWS's ``calculate_error_barrier.py``, with the model's momentum) and is
evaluated on the test split. The points run as one population. AWS's error barrier is
``max_t [err(t) - (err(0) + err(1)) / 2]``. The form ``a + t * (b - a)`` makes a network's curve
with itself exactly flat and keeps pruned weights exactly zero on the whole line.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxtickets import data as data_lib
from jaxtickets import paths, population
from jaxtickets import train as train_lib

PyTree = Any
# (params_a, params_b, batch_stats, train, test, key) -> f32[num_points] test errors
ErrorCurve = Callable[..., jax.Array]

# What a reset BatchNorm holds: flax's initial running mean and variance.
_RESET_STATISTICS = {"mean": 0.0, "var": 1.0}


def interpolate(params_a: PyTree, params_b: PyTree, t: float | jax.Array) -> PyTree:
  """``a + t * (b - a)`` leaf by leaf (``t``: f32[], may be traced); trees of one structure."""
  return jax.tree.map(lambda a, b: a + jnp.asarray(t, a.dtype) * (b - a), params_a, params_b)


def reset_batch_stats(batch_stats: PyTree) -> PyTree:
  """Flax BatchNorm statistics as freshly initialized: every ``mean`` 0, every ``var`` 1."""
  return jax.tree.map_with_path(
      lambda path, leaf: jnp.full_like(leaf, _RESET_STATISTICS[paths.key_name(path[-1])]),
      batch_stats)


def recalibrate(apply_fn: train_lib.ApplyFn, params: PyTree, batch_stats: PyTree,
                data: train_lib.Data, key: jax.Array, *, batch_size: int,
                augment: train_lib.Augment | None = None) -> PyTree:
  """BatchNorm statistics recomputed from reset by one train-mode pass over ``data``.

  The pass visits ``N // batch_size`` full batches in :func:`data.get_batch`'s order for
  ``key``, each augmented with its own key; params get no gradient.

  Args:
    apply_fn: the network on pixels in [0, 1]; it must not draw randomness in train mode.
    params: the network's params.
    batch_stats: statistics of its shape (values discarded).
    data: the training split.
    key: PRNG key of the batch order and the augmentation.
    batch_size: examples per batch.
    augment: ``(key, u8[B, H, W, C]) -> u8[B, H, W, C]``, or None.

  Returns:
    The recomputed statistics, shaped like ``batch_stats``.
  """
  num_batches = data_lib.steps_per_epoch(data.labels.shape[0], batch_size)
  order_key, augment_key = jax.random.split(key)

  def one_batch(statistics: PyTree, index: jax.Array) -> tuple[PyTree, None]:
    images, _ = data_lib.get_batch(order_key, index, data.images, data.labels, batch_size)
    if augment is not None:
      images = augment(jax.random.fold_in(augment_key, index), images)
    _, statistics = apply_fn(params, statistics, data_lib.to_unit(images), True)
    return statistics, None

  statistics, _ = jax.lax.scan(one_batch, reset_batch_stats(batch_stats),
                               jnp.arange(num_batches))
  return statistics


def make_error_curve(apply_fn: train_lib.ApplyFn, *, num_points: int = 11, batch_size: int = 128,
                     augment: train_lib.Augment | None = None, eval_batch_size: int = 500,
                     **run_options: Any) -> ErrorCurve:
  """The jitted test-error curve between two networks, its points run as one population.

  Args:
    apply_fn: the plain network on pixels in [0, 1] (params hold the masked weights).
    num_points: points on the line (>= 2), ``t = linspace(0, 1, num_points)``.
    batch_size: batch size of the recalibration pass; augment: its augmentation, or None.
    eval_batch_size: batch size of the test evaluation.
    **run_options: ``population.run`` options (strategy, chunk_size, mesh).

  Returns:
    ``curve(params_a, params_b, batch_stats, train, test, key) -> f32[num_points]`` test errors;
    every point recalibrates on the same batches (``key``).
  """

  def point_error(t, params_a, params_b, batch_stats, train, test, key):
    params = interpolate(params_a, params_b, t)
    statistics = recalibrate(apply_fn, params, batch_stats, train, key, batch_size=batch_size,
                             augment=augment)
    metrics = train_lib.evaluate(apply_fn, params, statistics, test, batch_size=eval_batch_size)
    return 1.0 - metrics["accuracy"]

  points = jnp.linspace(0.0, 1.0, num_points, dtype=jnp.float32)
  run_points = population.run(point_error, **run_options)
  return jax.jit(lambda *args: run_points(points, *args))


def barrier(errors: Sequence[float] | np.ndarray) -> float:
  """AWS's error barrier ``max_t err(t) - (err(0) + err(1)) / 2`` of one curve f[num_points]."""
  errors = np.asarray(errors, np.float64)
  if errors.ndim != 1 or errors.size < 2:  # a stack of curves would broadcast silently
    raise ValueError(f"barrier takes one error curve f[num_points >= 2], got shape "
                     f"{errors.shape}")
  return float(np.max(errors - (errors[0] + errors[-1]) / 2))


def connectivity(curve: ErrorCurve, params_a: PyTree, mask_a: PyTree, params_b: PyTree,
                 mask_b: PyTree, batch_stats: PyTree, train: train_lib.Data,
                 test: train_lib.Data, key: jax.Array) -> Mapping[str, Any]:
  """``{"errors": [num_points floats], "barrier": float}`` between two networks of one mask.

  Args:
    curve: from :func:`make_error_curve`.
    params_a, params_b: the two networks' (masked) params.
    mask_a, mask_b: their concrete bool masks; ValueError unless equal.
    batch_stats: statistics of the networks' shape (recomputed per point).
    train: the split of the recalibration pass; test: the evaluated split.
    key: PRNG key of the recalibration batches.
  """
  differing = jax.tree.map(lambda a, b: int(np.count_nonzero(np.asarray(a) != np.asarray(b))),
                           mask_a, mask_b)
  for path, count in jax.tree.leaves_with_path(differing):
    if count:  # the curve would still give numbers, labelled with mask_a's density
      raise ValueError(f"linear mode connectivity needs one mask; leaf {paths.joined(path)!r} "
                       f"differs in {count} entries")
  errors = np.asarray(curve(params_a, params_b, batch_stats, train, test, key), np.float64)
  return {"errors": errors.tolist(), "barrier": barrier(errors)}
