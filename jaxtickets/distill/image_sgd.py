"""SGD with momentum of the stored synthetic images, one inner iteration per update.

DC, DSA and DM take one step per inner iteration on the loss summed over the classes. IDC (and
Acc-DD) take K: their one optimizer over the whole synthetic tensor steps once per class, in
class order, each time with the gradient of that class's loss alone, so every step also moves
the other classes' images along their decaying momentum. A class's loss reads only its own
images and the net is fixed during the K steps, so those steps have a closed form that takes
every class's gradient in one program: with lr eta, momentum mu and buffer b, class c's images

1. have moved by ``eta * b * (mu + ... + mu^c)`` (steps 0..c-1) when its gradient g is taken
   (:attr:`ImageSGD.lookahead`),
2. take their own step with the buffer ``mu^(c+1) * b + g``,
3. move on with it for the remaining ``K - 1 - c`` steps (factor ``1 + mu + ... + mu^(K-1-c)``),
   leaving the buffer ``mu^(K-1-c)`` times it for the next inner iteration.

With one step per inner iteration (K = 1 for every class) this is plain SGD with momentum
(``optax.sgd``'s trace), which the summed methods use.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class MomentumState(NamedTuple):
  """trace: f32[K, ...] the momentum buffer after the last step, shaped like the images."""
  trace: jax.Array


class ImageSGD(NamedTuple):
  """A pure ``(init, lookahead, update)`` triple over images f32[K, ...] (K classes first).

  Attributes:
    init: ``images -> state`` (a zero buffer).
    lookahead: ``(images, state) -> images`` at which an inner iteration's gradients are taken.
    update: ``(grads, state, images) -> (images, state)``: one inner iteration, ``grads`` taken
      at ``lookahead(images, state)``.
  """
  init: Callable[[jax.Array], MomentumState]
  lookahead: Callable[[jax.Array, MomentumState], jax.Array]
  update: Callable[[jax.Array, MomentumState, jax.Array], tuple[jax.Array, MomentumState]]


def _coefficients(momentum: float, num_classes: int, per_class: bool) -> tuple[np.ndarray, ...]:
  """(moved before, buffer decay to the own step, steps' total after, carried), each f32[K]."""
  steps = num_classes if per_class else 1
  position = np.arange(num_classes) if per_class else np.zeros(num_classes, np.int64)
  powers = momentum ** np.arange(steps + 1, dtype=np.float64)
  partial_sums = np.concatenate([[0.0], np.cumsum(powers)])  # partial_sums[n] = sum mu^0..n-1
  before = partial_sums[position + 1] - 1.0
  decay = powers[position + 1]
  after = partial_sums[steps - position]
  carried = powers[steps - 1 - position]
  return tuple(np.asarray(value, np.float32) for value in (before, decay, after, carried))


def image_sgd(learning_rate: float, momentum: float, *, per_class: bool) -> ImageSGD:
  """SGD with momentum of images f32[K, ...]: one step per inner iteration on the summed loss
  (``per_class`` False), or IDC's K sequential per-class steps (``per_class`` True)."""

  def coefficients(images: jax.Array) -> tuple[jax.Array, ...]:
    broadcast = (-1,) + (1,) * (images.ndim - 1)
    return tuple(jnp.asarray(value).reshape(broadcast)
                 for value in _coefficients(momentum, images.shape[0], per_class))

  def init(images: jax.Array) -> MomentumState:
    return MomentumState(jnp.zeros_like(images))

  def lookahead(images: jax.Array, state: MomentumState) -> jax.Array:
    before = coefficients(images)[0]
    return images - learning_rate * before * state.trace

  def update(grads: jax.Array, state: MomentumState,
             images: jax.Array) -> tuple[jax.Array, MomentumState]:
    _, decay, after, carried = coefficients(images)
    trace = decay * state.trace + grads
    images = lookahead(images, state) - learning_rate * after * trace
    return images, MomentumState(carried * trace)

  return ImageSGD(init, lookahead, update)
