"""Pure train and eval steps shared by every study.

A study describes its network as an ``ApplyFn`` — ``(params, batch_stats, x, train, key) ->
(logits, batch_stats)`` on pixels in [0, 1] — so a dense net, a masked net (scores + frozen
weights) or a net with interpolated norm layers all train through the same step. A step is a
pure function ``(TrainState, Data) -> (TrainState, metrics)``: it draws its own batch from the
whole split with the member's key, so a population of states is just a leading axis for
``jax.vmap`` / ``lax.map`` (see ``population.py``).
"""

from __future__ import annotations

import collections
import functools

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxtickets import data as data_lib
from jaxtickets import metrics as metrics_lib

PyTree = Any
ApplyFn = Callable[..., tuple[jax.Array, PyTree]]
Augment = Callable[[jax.Array, jax.Array], jax.Array]
# (key, params, batch_stats, x f32[B, H, W, C], labels i32[B]) -> (x f32[B, H, W, C], batch_stats)
Perturb = Callable[[jax.Array, PyTree, PyTree, jax.Array, jax.Array], tuple[jax.Array, PyTree]]
# (key, x f32[B, H, W, C], labels i32[B]) -> (x f32[B, H, W, C], other_labels i32[B], weight f32[])
Mix = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array, jax.Array]]


class TrainState(NamedTuple):
  """Everything that changes during training; one member of a population.

  Attributes:
    step: i32[] number of optimizer steps taken.
    params: the trained pytree (weights, or scores + frozen weights, ...).
    batch_stats: BatchNorm running statistics ({} for models without BatchNorm).
    opt_state: optax state of ``params``.
    key: this member's PRNG key (a raw u32[2] or a typed key[]); fixes its data order and
      augmentation draws.
  """
  step: jax.Array
  params: PyTree
  batch_stats: PyTree
  opt_state: optax.OptState
  key: jax.Array


class Data(NamedTuple):
  """A whole split in device memory.

  Attributes:
    images: u8[N, H, W, C].
    labels: i32[N].
  """
  images: jax.Array
  labels: jax.Array


def device_data(split: data_lib.Split) -> Data:
  """The split on the default device: u8 images, i32 labels."""
  return Data(jnp.asarray(split.images), jnp.asarray(split.labels, jnp.int32))


def model_apply_fn(model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> ApplyFn:
  """The ``ApplyFn`` of a plain Flax model: normalization happens inside, on [0, 1] pixels.

  Keeping normalization inside the function lets attacks work in pixel space, where epsilon
  balls and the [0, 1] box are defined.
  """

  def apply_fn(params, batch_stats, x, train, key=None):
    del key  # Plain models are deterministic given their inputs.
    variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
    x = data_lib.normalize(x, mean, std)
    if train and batch_stats:
      logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
      return logits, updates["batch_stats"]
    return model.apply(variables, x, train=train), batch_stats

  return apply_fn


def init_variables(key: jax.Array, model: nn.Module,
                   image_shape: Sequence[int]) -> tuple[PyTree, PyTree]:
  """Returns ``(params, batch_stats)`` of ``model`` for images of ``image_shape`` (H, W, C)."""
  # One compiled program instead of one per initializer call (each costs a compile on CPU).
  init = jax.jit(functools.partial(model.init, train=False))
  variables = init(key, jnp.zeros((1, *image_shape), jnp.float32))
  return variables["params"], variables.get("batch_stats", {})


def create_train_state(key: jax.Array, params: PyTree, batch_stats: PyTree,
                       optimizer: optax.GradientTransformation) -> TrainState:
  """The state before the first step: step 0, ``optimizer``'s fresh state, the member's key."""
  return TrainState(jnp.zeros((), jnp.int32), params, batch_stats, optimizer.init(params), key)


def sgd(learning_rate: float | optax.Schedule, *, momentum: float = 0.9,
        weight_decay: float = 5e-4, nesterov: bool = False) -> optax.GradientTransformation:
  """SGD with PyTorch's coupled weight decay (the decay term enters the momentum buffer)."""
  return optax.chain(
      optax.add_decayed_weights(weight_decay),
      optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov))


def multistep_schedule(base_lr: float, steps_per_epoch: int, milestones: Sequence[int],
                       gamma: float = 0.1) -> optax.Schedule:
  """PyTorch's MultiStepLR: ``base_lr * gamma**i`` after the i-th milestone epoch (a milestone
  listed twice decays twice, as PyTorch counts them)."""
  counts = collections.Counter(int(m) * steps_per_epoch for m in milestones)
  return optax.piecewise_constant_schedule(
      base_lr, {step: gamma**count for step, count in counts.items()})


def cosine_schedule(base_lr: float, total_steps: int) -> optax.Schedule:
  """PyTorch's CosineAnnealingLR to 0 over ``total_steps``."""
  return optax.cosine_decay_schedule(base_lr, total_steps)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy of ``logits: f32[B, K]`` against ``labels: i32[B]``."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def crop_flip(key: jax.Array, images: jax.Array) -> jax.Array:
  """The CIFAR augmentation (random crop with 4-pixel padding + horizontal flip)."""
  return data_lib.random_crop_flip(key, images, pad=4)


def sample_batch(state: TrainState, data: Data, batch_size: int, augment: Augment | None
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Step ``state.step``'s batch, drawn from ``(state.key, state.step)``.

  Returns:
    ``(x f32[B, H, W, C] in [0, 1], labels i32[B], model_key)``; ``model_key`` is the step's
    key for anything else random (dropout, an attack, a mix).
  """
  perm_key, noise_key = jax.random.split(state.key)
  images, labels = data_lib.get_batch(perm_key, state.step, data.images, data.labels, batch_size)
  aug_key, model_key = jax.random.split(jax.random.fold_in(noise_key, state.step))
  if augment is not None:
    images = augment(aug_key, images)
  return data_lib.to_unit(images), labels, model_key


def apply_gradients(state: TrainState, grads: PyTree, optimizer: optax.GradientTransformation,
                    batch_stats: PyTree) -> TrainState:
  """``state`` one optimizer step on: ``grads`` (shaped like ``state.params``) applied by
  ``optimizer``, the forward pass's new ``batch_stats`` kept (flax's
  ``TrainState.apply_gradients``)."""
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  return state._replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                        batch_stats=batch_stats, opt_state=opt_state)


def make_train_step(apply_fn: ApplyFn, optimizer: optax.GradientTransformation, *,
                    batch_size: int, augment: Augment | None = crop_flip,
                    loss_fn: Callable[[jax.Array, jax.Array], jax.Array] = cross_entropy,
                    perturb: Perturb | None = None,
                    mix: Mix | None = None,
                    ) -> Callable[[TrainState, Data], tuple[TrainState, dict[str, jax.Array]]]:
  """One optimizer step on a batch the member draws itself.

  Args:
    apply_fn: the network, see module docstring.
    optimizer: updates ``state.params``; freeze parts of it with ``optax.multi_transform``.
    batch_size: examples per step; an epoch is ``N // batch_size`` steps (remainder dropped).
    augment: ``(key, u8[B, H, W, C]) -> u8[B, H, W, C]``, or None.
    loss_fn: ``(logits, labels) -> f32[]``.
    perturb: ``(key, params, batch_stats, x, labels) -> (x, batch_stats)``, applied to the
      augmented batch before the forward/backward pass (adversarial training: the attack, which
      may also advance the running statistics), or None. It sees the params before the update
      and is not differentiated through.
    mix: ``(key, x, labels) -> (x, other_labels, weight)``, applied last, for label-mixing
      augmentations such as CutMix: the loss becomes ``weight * loss_fn(logits, labels) +
      (1 - weight) * loss_fn(logits, other_labels)`` (accuracy still counts ``labels``), or None.

  Returns:
    ``step(state, data) -> (state, {"loss": f32[], "accuracy": f32[]})``, pure and vmappable.
  """

  def step(state: TrainState, data: Data):
    x, labels, model_key = sample_batch(state, data, batch_size, augment)
    batch_stats = state.batch_stats
    if perturb is not None:
      # Split only here, so that steps without a perturbation keep their random streams.
      model_key, perturb_key = jax.random.split(model_key)
      x, batch_stats = perturb(perturb_key, state.params, batch_stats, x, labels)
    if mix is not None:
      model_key, mix_key = jax.random.split(model_key)
      x, other_labels, weight = mix(mix_key, x, labels)

    def loss_of(params):
      logits, new_stats = apply_fn(params, batch_stats, x, True, model_key)
      loss = loss_fn(logits, labels)
      if mix is not None:
        loss = weight * loss + (1.0 - weight) * loss_fn(logits, other_labels)
      return loss, (logits, new_stats)

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
    metrics = {"loss": loss, "accuracy": metrics_lib.accuracy(logits, labels)}
    return apply_gradients(state, grads, optimizer, batch_stats), metrics

  return step


def repeat(step: Callable[[TrainState, Data], tuple[TrainState, Mapping[str, jax.Array]]],
           num_steps: int, *, unroll: int | bool = 1):
  """Runs ``step`` ``num_steps`` times in one ``lax.scan`` (one dispatch instead of many).

  ``unroll`` is ``lax.scan``'s (True: no loop at all).
  Returns ``run(state, data) -> (state, metrics)`` with metrics stacked on a leading axis.
  """

  def run(state, data):
    if num_steps == 1:
      state, metrics = step(state, data)
      return state, jax.tree_util.tree_map(lambda m: m[None], metrics)
    return jax.lax.scan(lambda s, _: step(s, data), state, None, length=num_steps,
                        unroll=unroll)

  return run


def predict(apply_fn: ApplyFn, params: PyTree, batch_stats: PyTree, images: jax.Array, *,
            batch_size: int = 500) -> jax.Array:
  """Eval-mode logits for a whole split.

  Args:
    images: u8[N, H, W, C].

  Returns:
    f32[N, K]. Batches are padded to one fixed shape and run by ``lax.map``, so a split of any
    size compiles once.
  """
  num_examples = images.shape[0]

  def logits_of(batch, *_):
    return apply_fn(params, batch_stats, data_lib.to_unit(batch), False)[0]

  logits = data_lib.map_batches(logits_of, images, jnp.zeros((num_examples,), jnp.int32),
                                min(batch_size, num_examples))
  return logits.reshape(-1, logits.shape[-1])[:num_examples]


def evaluate(apply_fn: ApplyFn, params: PyTree, batch_stats: PyTree, data: Data, *,
             batch_size: int = 500) -> dict[str, jax.Array]:
  """Eval-mode ``{"loss", "accuracy"}`` over a whole split (exact, no dropped remainder)."""
  logits = predict(apply_fn, params, batch_stats, data.images, batch_size=batch_size)
  return {"loss": cross_entropy(logits, data.labels),
          "accuracy": metrics_lib.accuracy(logits, data.labels)}
