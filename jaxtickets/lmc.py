"""Linear mode connectivity: test error along the straight line between two networks.

Two networks with the same sparsity mask are interpolated point by point,
``theta(t) = theta_a + t * (theta_b - theta_a)`` for ``t`` in ``linspace(0, 1, num_points)``
(every param: conv/dense weights and biases, norm affine params). At each point the BatchNorm
running statistics are recomputed from reset (mean 0, variance 1) by one pass of train-mode
forwards over augmented training batches, exactly as AWS's ``calculate_error_barrier.py`` does
(with the model's own momentum, PyTorch's 0.1); then the point's test error is measured in eval
mode. The error barrier is AWS's

    barrier = max_t [err(t) - (err(0) + err(1)) / 2].

The ``num_points`` points (11 by default) are one population (``population.run``): one compiled
program recalibrates and evaluates them all. The form ``a + t * (b - a)`` makes a network's
curve with itself exactly flat (every point is ``a``, bit for bit), and keeps pruned weights
exactly zero on the whole line.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxtickets import data as data_lib
from jaxtickets import errors, paths, population, tickets
from jaxtickets import train as train_lib
from jaxtickets.errors import UserError

PyTree = Any
# (params_a, params_b, batch_stats, train, test, key) -> f32[num_points] test errors
ErrorCurve = Callable[..., jax.Array]

# What a reset BatchNorm holds: flax's initial running mean and variance.
_RESET_STATISTICS = {"mean": 0.0, "var": 1.0}


def interpolate(params_a: PyTree, params_b: PyTree, t: float | jax.Array) -> PyTree:
  """``a + t * (b - a)`` leaf by leaf: ``a`` at t = 0, ``b`` at t = 1 (to one rounding).

  Args:
    params_a: float tree.
    params_b: float tree shaped like ``params_a``.
    t: f32[] position on the line (may be traced).
  """
  return jax.tree.map(lambda a, b: a + jnp.asarray(t, a.dtype) * (b - a), params_a, params_b)


def reset_batch_stats(batch_stats: PyTree) -> PyTree:
  """BatchNorm running statistics as freshly initialized: every ``mean`` 0, every ``var`` 1.

  Raises:
    UserError: a leaf that is neither ``mean`` nor ``var`` (not flax BatchNorm statistics).
  """

  def reset(path: Sequence[Any], leaf: jax.Array) -> jax.Array:
    name = paths.key_name(path[-1])
    if name not in _RESET_STATISTICS:
      raise UserError(f"batch_stats leaf {paths.joined(path)!r} is not a BatchNorm "
                      f"'mean' or 'var'")
    return jnp.full_like(leaf, _RESET_STATISTICS[name])

  return jax.tree.map_with_path(reset, batch_stats)


def recalibrate(apply_fn: train_lib.ApplyFn, params: PyTree, batch_stats: PyTree,
                data: train_lib.Data, key: jax.Array, *, batch_size: int,
                augment: train_lib.Augment | None = None) -> PyTree:
  """BatchNorm running statistics recomputed from reset by one pass over ``data``.

  The pass visits ``N // batch_size`` full batches in the order :func:`data.get_batch` gives
  ``key`` (the remainder is dropped), augments each with its own key, and runs ``apply_fn`` in
  train mode, which updates the statistics with the model's momentum, batch after batch.
  Parameters are not touched (no gradient).

  Args:
    apply_fn: the network on pixels in [0, 1] (``train.model_apply_fn``); it must not draw
      randomness in train mode (use the plain network, not AWS's interpolating one).
    params: the network's params.
    batch_stats: statistics of its shape (their values are discarded).
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
  """The compiled test-error curve between two networks, its points run as one population.

  Args:
    apply_fn: the plain network on pixels in [0, 1] (params hold the masked weights).
    num_points: points on the line, ``t = linspace(0, 1, num_points)``; at least 2.
    batch_size: batch size of the BatchNorm recalibration pass.
    augment: the training augmentation used in that pass, or None.
    eval_batch_size: batch size of the test evaluation.
    **run_options: ``population.run`` options (strategy, chunk_size, mesh).

  Returns:
    ``curve(params_a, params_b, batch_stats, train, test, key) -> f32[num_points]``: the test
    error (1 - accuracy) at each point. ``batch_stats`` gives the statistics' shapes; every
    point uses the same recalibration batches (``key``).

  Raises:
    UserError: ``num_points`` < 2, or bad ``run_options``.
  """
  errors.check_int("num_points", num_points, 2)  # the two endpoints at least

  def point_error(t, params_a, params_b, batch_stats, train, test, key):
    params = interpolate(params_a, params_b, t)
    statistics = recalibrate(apply_fn, params, batch_stats, train, key, batch_size=batch_size,
                             augment=augment)
    metrics = train_lib.evaluate(apply_fn, params, statistics, test, batch_size=eval_batch_size)
    return 1.0 - metrics["accuracy"]

  points = jnp.linspace(0.0, 1.0, num_points, dtype=jnp.float32)
  run_points = population.run(point_error, member_axes=(0,), **run_options)
  return jax.jit(lambda *args: run_points(points, *args))


def check_same_mask(mask_a: PyTree, mask_b: PyTree) -> None:
  """Raises UserError unless two (concrete) masks are equal, naming the first differing leaf."""
  tickets.check_matches(mask_a, mask_b, what="mask_b", reference_name="mask_a")
  for (path, keep_a), keep_b in zip(jax.tree.leaves_with_path(mask_a), jax.tree.leaves(mask_b)):
    differ = int(np.count_nonzero(np.asarray(keep_a) != np.asarray(keep_b)))
    if differ:
      raise UserError(f"linear mode connectivity needs one mask; leaf {paths.joined(path)!r} "
                      f"differs in {differ} entries")


def barrier(errors: Sequence[float] | np.ndarray) -> float:
  """AWS's error barrier ``max_t err(t) - (err(0) + err(1)) / 2`` of a curve (endpoints included).

  Raises:
    UserError: not one curve (f[num_points]), or fewer than 2 points.
  """
  errors = np.asarray(errors, np.float64)
  if errors.ndim != 1:
    raise UserError(f"barrier takes one error curve f[num_points], got shape {errors.shape}")
  if errors.size < 2:
    raise UserError(f"an error curve needs at least 2 points, got {errors.size}")
  return float(np.max(errors - (errors[0] + errors[-1]) / 2))


def connectivity(curve: ErrorCurve, params_a: PyTree, mask_a: PyTree, params_b: PyTree,
                 mask_b: PyTree, batch_stats: PyTree, train: train_lib.Data,
                 test: train_lib.Data, key: jax.Array) -> Mapping[str, Any]:
  """The error curve and barrier between two networks that share one mask.

  Args:
    curve: from :func:`make_error_curve`.
    params_a, params_b: the two networks' (masked) params.
    mask_a, mask_b: their bool masks (concrete), which must be equal.
    batch_stats: statistics of the networks' shape (values unused: recomputed per point).
    train: the split of the recalibration pass; test: the evaluated split.
    key: PRNG key of the recalibration batches.

  Returns:
    ``{"errors": [num_points floats], "barrier": float}``.

  Raises:
    UserError: the masks differ (or have other leaves).
  """
  check_same_mask(mask_a, mask_b)
  errors = np.asarray(curve(params_a, params_b, batch_stats, train, test, key), np.float64)
  return {"errors": errors.tolist(), "barrier": barrier(errors)}
