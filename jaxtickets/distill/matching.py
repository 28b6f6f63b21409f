"""Matching objectives of dataset distillation, per (model, class) and vmapped over both.

* Gradient matching (DC, DSA, IDC, Acc-DD): the distance between the parameter gradients of the
  cross-entropy on a class's real batch and on that class's synthetic images
  (:func:`gradient_match`), with a per-layer distance summed over layers:

  - :func:`dc_distance` (DC/DSA): per layer with more than one axis, the weight gradient seen as
    rows = output units (a conv's ``[kh, kw, in, out]`` as ``out`` rows of ``kh*kw*in``), the sum
    over rows of ``1 - cos`` (``1e-6`` in the denominator); 1-D tensors (biases, norm params)
    contribute 0;
  - :func:`idc_distance` (IDC/Acc-DD): the sum of squared differences (``"mse"``; ``"l1"``: of
    absolute differences) over conv kernels only (no classifier, biases or norm params).

* Distribution matching (DM): the squared distance between the mean embeddings (the features the
  classifier reads, for ConvNet-3; see :func:`embedding_fn`) of the real batch and of the
  synthetic images (:func:`distribution_match`).

A class objective is ``(params, batch_stats, real_x, real_y, syn_x, syn_y) -> f32[]``; the real
gradient (or embedding) is a constant, the synthetic one is differentiated through (second
order for gradient matching). :func:`matching_losses` evaluates it for M models x K classes in one
program (by default models vmapped, classes unrolled); :func:`matching_loss` averages over the
models and sums over the classes. The reference updates the synthetic set with ONE model per
outer iteration; averaging over M models makes each update see M models at once, so M models per
outer iteration and 1/M as many outer iterations keep the number of model-steps (models x inner
iterations) the same.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxtickets import data as data_lib
from jaxtickets import models
from jaxtickets import train as train_lib
from jaxtickets.errors import UserError

PyTree = Any
ClassObjective = Callable[..., jax.Array]
EmbedFn = Callable[[PyTree, PyTree, jax.Array], jax.Array]

COSINE_EPSILON = 1e-6
IDC_METRICS = ("mse", "l1")


def _as_rows(gradient: jax.Array) -> jax.Array:
  """A flax kernel ``[..., in, out]`` as ``[out, prod(...) * in]`` (one row per output unit)."""
  return jnp.moveaxis(gradient, -1, 0).reshape(gradient.shape[-1], -1)


def _safe_norm(rows: jax.Array) -> jax.Array:
  """Row norms whose gradient stays finite at an all-zero row."""
  return jnp.sqrt(jnp.maximum(jnp.sum(rows * rows, axis=-1), 1e-30))


def dc_distance(real_grads: PyTree, synthetic_grads: PyTree) -> jax.Array:
  """DC's layer-wise distance: sum over layers and output units of ``1 - cos``.

  Args:
    real_grads: gradient tree of the real batch (flax layout, kernels ``[..., in, out]``).
    synthetic_grads: the same tree for the synthetic images.

  Returns:
    f32[]; leaves with fewer than 2 axes are ignored.
  """
  total = jnp.float32(0.0)
  for real, synthetic in zip(jax.tree.leaves(real_grads), jax.tree.leaves(synthetic_grads)):
    if real.ndim < 2:
      continue
    real_rows, synthetic_rows = _as_rows(real), _as_rows(synthetic)
    cosine = jnp.sum(real_rows * synthetic_rows, axis=-1) / (
        _safe_norm(real_rows) * _safe_norm(synthetic_rows) + COSINE_EPSILON)
    total = total + jnp.sum(1.0 - cosine)
  return total


def idc_distance(real_grads: PyTree, synthetic_grads: PyTree, *,
                 metric: str = "mse") -> jax.Array:
  """IDC's distance: squared (``"mse"``) or absolute (``"l1"``) differences over conv kernels.

  Conv kernels are the leaves with 4 axes; the classifier, biases and norm params are ignored.

  Returns:
    f32[].
  """
  if metric not in IDC_METRICS:  # Any other name would silently compute "l1".
    raise ValueError(f"unknown IDC metric {metric!r}; known: {', '.join(IDC_METRICS)}")
  total = jnp.float32(0.0)
  for real, synthetic in zip(jax.tree.leaves(real_grads), jax.tree.leaves(synthetic_grads)):
    if real.ndim != 4:
      continue
    difference = real - synthetic
    total = total + jnp.sum(difference * difference if metric == "mse" else jnp.abs(difference))
  return total


GRADIENT_DISTANCES: dict[str, Callable[[PyTree, PyTree], jax.Array]] = {
    "dc": dc_distance,
    "mse": functools.partial(idc_distance, metric="mse"),
    "l1": functools.partial(idc_distance, metric="l1"),
}


def get_gradient_distance(name: str) -> Callable[[PyTree, PyTree], jax.Array]:
  """The distance of :data:`GRADIENT_DISTANCES` named ``name``; UserError for another name."""
  if name not in GRADIENT_DISTANCES:
    raise UserError(f"unknown gradient distance {name!r}; known: "
                    f"{', '.join(GRADIENT_DISTANCES)}")
  return GRADIENT_DISTANCES[name]


def gradient_match(apply_fn: train_lib.ApplyFn, distance: Callable[[PyTree, PyTree], jax.Array]
                   ) -> ClassObjective:
  """The gradient-matching objective of one (model, class).

  Args:
    apply_fn: the network (``train.model_apply_fn``), run in train mode as the reference does;
      running statistics, if any, are not advanced.
    distance: e.g. :func:`dc_distance` or :func:`idc_distance`.

  Returns:
    ``objective(params, batch_stats, real_x f32[Br, H, W, C], real_y i32[Br], syn_x f32[Bs, H, W,
    C], syn_y i32[Bs]) -> f32[]``, differentiable in ``syn_x``.
  """

  def gradients(params, batch_stats, x, y):
    def loss(params):
      return train_lib.cross_entropy(apply_fn(params, batch_stats, x, True)[0], y)
    return jax.grad(loss)(params)

  def objective(params, batch_stats, real_x, real_y, syn_x, syn_y):
    real = jax.lax.stop_gradient(gradients(params, batch_stats, real_x, real_y))
    return distance(real, gradients(params, batch_stats, syn_x, syn_y))

  return objective


def embedding_fn(model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> EmbedFn:
  """``(params, batch_stats, x f32[B, H, W, C] pixels) -> f32[B, D]``: DM's embedding.

  The output of the last top-level module before ``head`` (``model.block_names[-2]``),
  flattened; train-mode norms, running statistics not advanced. For ConvNet-3 (DM's net) that
  is exactly what the classifier reads; for a model that pools globally in its head (ResNets)
  it is the feature map before that pooling.
  """
  feature_block = model.block_names[-2]

  def embed(params, batch_stats, x):
    variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
    outputs = models.block_outputs(model, variables, data_lib.normalize(x, mean, std),
                                   train=True)
    features = outputs[feature_block]
    return features.reshape(features.shape[0], -1)

  return embed


def distribution_match(embed: EmbedFn) -> ClassObjective:
  """DM's objective of one (model, class): ``||mean embed(real) - mean embed(syn)||^2``.

  Returns:
    A class objective (labels unused), differentiable in ``syn_x``.
  """

  def objective(params, batch_stats, real_x, real_y, syn_x, syn_y):
    del real_y, syn_y
    real = jax.lax.stop_gradient(jnp.mean(embed(params, batch_stats, real_x), axis=0))
    difference = real - jnp.mean(embed(params, batch_stats, syn_x), axis=0)
    return jnp.sum(difference * difference)

  return objective


MAP_STRATEGIES = ("vmap", "unroll", "map")


def _map_over(fn: Callable[..., jax.Array], in_axes: tuple[int | None, ...], size: int,
              strategy: str) -> Callable[..., jax.Array]:
  """``fn`` over a leading axis of ``size``: vmapped, ``lax.map``-ped, or unrolled and stacked."""
  if strategy == "vmap":
    return jax.vmap(fn, in_axes=in_axes)
  if strategy == "map":
    def mapped(*args):
      shared = [arg if axis is None else None for arg, axis in zip(args, in_axes)]
      members = tuple(arg for arg, axis in zip(args, in_axes) if axis is not None)
      def one(member):
        it = iter(member)
        return fn(*[next(it) if axis is not None else arg for arg, axis in zip(shared, in_axes)])
      return jax.lax.map(one, members)
    return mapped
  if strategy != "unroll":
    raise ValueError(f"unknown matching map {strategy!r}; known: {', '.join(MAP_STRATEGIES)}")

  def unrolled(*args):
    def member(index):
      return [arg if axis is None else jax.tree.map(lambda leaf: leaf[index], arg)
              for arg, axis in zip(args, in_axes)]
    return jnp.stack([fn(*member(index)) for index in range(size)])

  return unrolled


def matching_losses(objective: ClassObjective, params: PyTree, batch_stats: PyTree,
                    real_x: jax.Array, real_y: jax.Array, syn_x: jax.Array,
                    syn_y: jax.Array, *, model_map: str = "vmap",
                    class_map: str = "unroll") -> jax.Array:
  """The class objective of every (model, class) pair.

  The classes share their model's weights, so vmapping over them batches each class's weight
  gradient into one batch-grouped convolution, which XLA runs slower than separate ones: the
  classes are unrolled by default. The models are a population of different weights; vmapping
  them gives grouped convolutions like any population of small nets.

  Args:
    objective: a class objective (:func:`gradient_match`, :func:`distribution_match`).
    params: M models' params (leading axis M).
    batch_stats: their statistics (leading axis M, or an empty dict).
    real_x: f32[M, K, Br, H, W, C] real batches (already augmented; per model and class).
    real_y: i32[K, Br] their labels.
    syn_x: f32[M, K, Bs, H, W, C] synthetic images (augmented with the real batch's draw).
    syn_y: i32[K, Bs] their labels.
    model_map: how the M models run (:data:`MAP_STRATEGIES`: "vmap", "map" one after another
      in a loop, "unroll").
    class_map: how the K classes run (same choices); every choice gives the same values.

  Returns:
    f32[M, K].
  """
  num_models, num_classes = real_x.shape[:2]
  per_class = _map_over(objective, (None, None, 0, 0, 0, 0), num_classes, class_map)
  per_model = _map_over(per_class, (0, 0 if batch_stats else None, 0, None, 0, None),
                        num_models, model_map)
  return per_model(params, batch_stats, real_x, real_y, syn_x, syn_y)


def matching_loss(objective: ClassObjective, params: PyTree, batch_stats: PyTree,
                  real_x: jax.Array, real_y: jax.Array, syn_x: jax.Array,
                  syn_y: jax.Array, **maps: str) -> jax.Array:
  """f32[]: :func:`matching_losses` (``maps``: its ``model_map``/``class_map``) summed over
  classes and averaged over the M models."""
  losses = matching_losses(objective, params, batch_stats, real_x, real_y, syn_x, syn_y, **maps)
  return jnp.mean(jnp.sum(losses, axis=1))
