"""Acc-DD's model augmentation: early-stage models and filter-normalized parameter perturbation.

(a) Early-stage models: a pool of P networks trained on the real data for a few epochs (CIFAR:
2 epochs, SGD 0.01 / 0.9 / 5e-4, batch 64, per-sample DSA color + crop and CutMix, the reference's
``pretrain.py`` through ``train_epoch``). The pool trains as ONE population (leading axis P);
:func:`init_nets` builds it, ``train.make_train_step`` with ``dsa.dsa_cutmix`` trains it.

(b) Perturbation (:func:`perturb`): two Gaussian directions ``dx, dy`` shaped like the params;
in every kernel (a leaf with >= 2 axes; flax layout ``[..., in, out]``) each output filter of a
direction is rescaled to the norm of the same filter of ``w`` (the loss-landscape code's
``filter`` normalization); 1-D leaves (biases, norm params) get no direction (``biasbn``). Then
``w' = w + a * dx + b * dy`` with ``a, b = +-U(0.01, 0.09)`` (random signs), once per outer
iteration.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxtickets import population
from jaxtickets import train as train_lib

PyTree = Any

DEFAULT_MAGNITUDE = (0.01, 0.09)
_NORM_EPSILON = 1e-10


def _filter_norms(leaf: jax.Array) -> jax.Array:
  """f32[out]: the norm of every output filter of a kernel ``[..., in, out]``."""
  return jnp.sqrt(jnp.sum(leaf * leaf, axis=tuple(range(leaf.ndim - 1))))


def filter_normalized_direction(key: jax.Array, params: PyTree) -> PyTree:
  """A Gaussian direction whose every output filter has the norm of ``params``' filter.

  Args:
    key: PRNG key.
    params: the network's params.

  Returns:
    A tree shaped like ``params``: kernels rescaled filter-wise, zeros on 1-D leaves.
  """
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  directions = []
  for leaf_key, leaf in zip(keys, leaves):
    if leaf.ndim < 2:
      directions.append(jnp.zeros_like(leaf))
      continue
    direction = jax.random.normal(leaf_key, leaf.shape, leaf.dtype)
    directions.append(direction * (_filter_norms(leaf) /
                                   (_filter_norms(direction) + _NORM_EPSILON)))
  return jax.tree.unflatten(treedef, directions)


def perturb(key: jax.Array, params: PyTree, *,
            magnitude: Sequence[float] = DEFAULT_MAGNITUDE) -> PyTree:
  """``w + a * dx + b * dy``: Acc-DD's perturbation of a network (see module docstring).

  Args:
    key: PRNG key.
    params: the network's params.
    magnitude: (low, high) of ``|a|`` and ``|b|``, 0 <= low <= high, drawn uniformly with a
      random sign.

  Returns:
    Perturbed params; biases and norm params are unchanged. Jittable and vmappable.
  """
  low, high = magnitude
  x_key, y_key, coefficient_key, sign_key = jax.random.split(key, 4)
  coefficients = jax.random.uniform(coefficient_key, (2,), minval=low, maxval=high)
  coefficients = coefficients * jax.random.rademacher(sign_key, (2,), jnp.float32)
  dx = filter_normalized_direction(x_key, params)
  dy = filter_normalized_direction(y_key, params)
  return jax.tree.map(lambda w, x, y: w + coefficients[0] * x + coefficients[1] * y,
                      params, dx, dy)


def init_net(key: jax.Array, model: nn.Module, image_shape: Sequence[int],
             optimizer: optax.GradientTransformation) -> train_lib.TrainState:
  """A freshly initialized net's TrainState (its own init and data/augmentation key).

  Pure and vmappable over keys, so fresh nets can be drawn inside a compiled step.
  """
  init_key, state_key = jax.random.split(key)
  variables = model.init(init_key, jnp.zeros((1, *image_shape), jnp.float32), train=False)
  return train_lib.create_train_state(state_key, variables["params"],
                                      variables.get("batch_stats", {}), optimizer)


def init_nets(key: jax.Array, model: nn.Module, image_shape: Sequence[int], count: int,
              optimizer: optax.GradientTransformation) -> train_lib.TrainState:
  """``count`` fresh nets (:func:`init_net`) as one population (leading axis ``count``)."""
  return population.init(
      functools.partial(init_net, model=model, image_shape=tuple(image_shape),
                        optimizer=optimizer), jax.random.split(key, count))
