"""A Winning Sign (Oh, Baik, Lee; ICLR 2025); official code JungHunOh/AWS_ICLR2025.

The paper, mapped to this module:

- Sparse training (the reference's ``weight * fixed_m``): a :class:`SparseState` trained by
  :func:`make_sparse_step`, which masks the weights in the forward pass and re-masks them after
  every update, so pruned weights stay exactly zero (``sign(w) == 0`` marks them).
- AWS: on every training step one ``alpha ~ U(0, 1)`` moves all norm layers to
  ``gamma = alpha + (1 - alpha) * gamma``, ``beta = (1 - alpha) * beta``, the point at ``alpha``
  on the line to their initial values (1, 0) (:func:`interpolate_norms`, :func:`aws_apply_fn`);
  evaluation uses ``alpha = 0``. LRR and AWS members differ only in ``SparseState.aws``.
- LRR (learning-rate rewinding): :func:`next_round` removes a share of the survivors by one
  global magnitude threshold (:func:`prune`) and resets the optimizer; of S survivors
  ``int(S * (1 - fraction))`` stay (:func:`survivor_counts`, host-side). Prunable: every conv and
  dense kernel except the classifier's (:func:`prunable_leaves`).
- Transfer of a pruned network to a fresh init (:func:`transfer`): ``"sign"``
  (``|w_init| * sign(w_T * m)`` with mask ``sign != 0``; biases and the classifier get
  ``|init| * sign(trained)``; norms reset), ``"mask"`` (``w_init * m``), ``"retrain"`` (``w_T * m``
  with the trained norms and statistics), ``"dense"`` (the fresh network unpruned).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxtickets import metrics as metrics_lib
from jaxtickets import paths, tickets
from jaxtickets import train as train_lib

PyTree = Any

METHODS = ("lrr", "aws")
TRAINED_TRANSFERS = ("sign", "mask", "retrain")  # transfers of a pruned network
TRANSFERS = (*TRAINED_TRANSFERS, "dense")
REWINDS = ("none", "init")
# Initial values of norm affine params: the end of AWS's interpolation line.
_NORM_INIT = {"scale": 1.0, "bias": 0.0}


def _is_norm_leaf(path: Sequence[Any]) -> bool:
  return paths.is_norm_param(paths.names(path))


def norm_leaves(params: PyTree) -> PyTree:
  """Python bools marking the norm affine params (``scale``/``bias`` of ``*norm*`` modules)."""
  return jax.tree.map_with_path(lambda path, _: _is_norm_leaf(path), params)


def interpolate_norms(params: PyTree, alpha: float | jax.Array) -> PyTree:
  """Norm params at ``alpha`` (f32[], may be traced): ``scale -> alpha + (1 - alpha) * scale``,
  ``bias -> (1 - alpha) * bias``; other leaves unchanged. ``alpha = 0`` returns ``params``."""

  def interpolate(path: Sequence[Any], leaf: jax.Array) -> jax.Array:
    if not _is_norm_leaf(path):
      return leaf
    alpha_ = jnp.asarray(alpha, leaf.dtype)
    return alpha_ * _NORM_INIT[paths.key_name(path[-1])] + (1 - alpha_) * leaf

  return jax.tree.map_with_path(interpolate, params)


def initialized_norms(params: PyTree) -> PyTree:
  """``params`` with every norm ``scale`` 1 and ``bias`` 0 (the paper's diagnostic partner)."""
  return interpolate_norms(params, 1.0)


def aws_apply_fn(model_apply_fn: train_lib.ApplyFn, mask: PyTree,
                 aws: bool | jax.Array) -> train_lib.ApplyFn:
  """The masked network, training with AWS when ``aws`` (bool[] or Python bool) is true.

  Returns:
    ``apply_fn(params, batch_stats, x, train, key=None)``: ``model_apply_fn`` on
    ``interpolate_norms(where(mask, params, 0), alpha)``, ``alpha ~ U(0, 1)`` from ``key`` in
    train mode when ``aws``, else 0. ``key`` is required in train mode unless ``aws`` is a
    Python False.
  """

  def apply_fn(params, batch_stats, x, train, key=None):
    params = tickets.apply_mask(params, mask)
    if train and aws is not False:
      params = interpolate_norms(params, jnp.where(aws, jax.random.uniform(key), 0.0))
    return model_apply_fn(params, batch_stats, x, train, key)

  return apply_fn


class SparseState(NamedTuple):
  """A masked network in training; a population has a leading member axis on every leaf."""
  train: train_lib.TrainState  # params exactly zero where mask is False
  mask: PyTree  # bool, shaped like the params (all-True on leaves that are not prunable)
  aws: jax.Array  # bool[]: train with AWS's norm interpolation (False: plain training, LRR)

  @property
  def step(self) -> jax.Array:
    """Optimizer steps taken (what ``loop.fit`` counts)."""
    return self.train.step


SparseStep = Callable[[SparseState, train_lib.Data], tuple[SparseState, dict[str, jax.Array]]]


def prunable_leaves(params: PyTree) -> PyTree:
  """What AWS/LRR prune: every conv and dense kernel except the classifier's (Python bools)."""
  return tickets.prunable(params, first_conv=True, shortcut=True, classifier=False)


def num_prunable(params: PyTree, prunable: PyTree) -> int:
  """Entries of the prunable leaves: the survivors of a dense network."""
  return sum(int(np.size(leaf)) for leaf, flag in zip(jax.tree.leaves(params),
                                                      jax.tree.leaves(prunable)) if flag)


def survivor_counts(survivors: int, rounds: int, fraction: float) -> list[int]:
  """Survivors before round 1 (``survivors``) and after each of ``rounds`` rounds that remove
  ``fraction`` of them: of S, ``int(S * (1 - fraction))`` stay (the reference's float64 count,
  so with fraction 0.2 ``ceil(0.2 S)`` go)."""
  counts = [survivors]
  for _ in range(rounds):
    counts.append(int(counts[-1] * (1 - fraction)))
  return counts


def dense_mask(params: PyTree) -> PyTree:
  """An all-True mask shaped like ``params``."""
  return jax.tree.map(lambda leaf: jnp.ones(jnp.shape(leaf), bool), params)


def init_sparse_state(key: jax.Array, params: PyTree, batch_stats: PyTree, mask: PyTree,
                      aws: bool | jax.Array, optimizer: optax.GradientTransformation
                      ) -> SparseState:
  """A fresh member: ``params`` masked by ``mask``, a new optimizer state, step 0; ``key`` draws
  its data order, augmentation and AWS's alphas."""
  params = tickets.apply_mask(params, mask)
  return SparseState(train_lib.create_train_state(key, params, batch_stats, optimizer), mask,
                     jnp.asarray(aws, bool))


def make_sparse_step(model_apply_fn: train_lib.ApplyFn, optimizer: optax.GradientTransformation,
                     *, batch_size: int,
                     augment: train_lib.Augment | None = train_lib.crop_flip) -> SparseStep:
  """``step(state, data) -> (state, {"loss", "accuracy"})``: one optimizer step of a
  :class:`SparseState` (LRR, AWS, or fine-tuning a fixed mask), pure and vmappable.

  Args:
    model_apply_fn: the plain network on pixels in [0, 1].
    optimizer: e.g. ``train.sgd`` (coupled weight decay on all params, as the reference).
    batch_size: examples per step.
    augment: ``(key, u8[B, H, W, C]) -> u8[B, H, W, C]``, or None.
  """

  def step(state: SparseState, data: train_lib.Data):
    train = state.train
    x, labels, model_key = train_lib.sample_batch(train, data, batch_size, augment)
    apply_fn = aws_apply_fn(model_apply_fn, state.mask, state.aws)

    def loss_fn(params):
      logits, batch_stats = apply_fn(params, train.batch_stats, x, True, model_key)
      return train_lib.cross_entropy(logits, labels), (logits, batch_stats)

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        train.params)
    train = train_lib.apply_gradients(train, grads, optimizer, batch_stats)
    # The masked forward already zeroes the gradient of pruned weights; re-masking keeps them
    # exactly zero under momentum and weight decay.
    train = train._replace(params=tickets.apply_mask(train.params, state.mask))
    return state._replace(train=train), {"loss": loss,
                                         "accuracy": metrics_lib.accuracy(logits, labels)}

  return step


def prune(params: PyTree, mask: PyTree, prunable: PyTree,
          kept: int | jax.Array) -> tuple[PyTree, PyTree]:
  """One global magnitude cut: ``(params masked by the new mask, new mask)``.

  Args:
    params: float tree (entries outside ``mask`` are ignored).
    mask: the current bool mask.
    prunable: Python bools, :func:`prunable_leaves`.
    kept: int or i32[] (may be traced): survivors that stay, at most those of ``mask``
      (:func:`survivor_counts`); the largest |w| stay, ties by index.
  """
  new_mask = tickets.prune_by_magnitude(params, mask, kept, prunable, scope="global")
  return tickets.apply_mask(params, new_mask), new_mask


def next_round(state: SparseState, optimizer: optax.GradientTransformation, prunable: PyTree, *,
               kept: int | jax.Array, key: jax.Array,
               rewind: SparseState | None = None) -> SparseState:
  """The first state of the next pruning round after ``state`` finished training: pruned to
  ``kept`` survivors (:func:`prune`), a fresh optimizer state, step 0 and key ``key``.

  Args:
    rewind: None for LRR (continue from the pruned weights); for IMP, a state whose params and
      statistics the round restarts from under the new mask.
  """
  params, mask = prune(state.train.params, state.mask, prunable, kept)
  batch_stats = state.train.batch_stats
  if rewind is not None:
    params, batch_stats = rewind.train.params, rewind.train.batch_stats
  return init_sparse_state(key, params, batch_stats, mask, state.aws, optimizer)


def transfer(variant: str, trained_params: PyTree, trained_stats: PyTree, mask: PyTree,
             fresh_params: PyTree, fresh_stats: PyTree,
             prunable: PyTree) -> tuple[PyTree, PyTree, PyTree]:
  """``(params, batch_stats, mask)`` that a transfer ``variant`` (one of :data:`TRANSFERS`)
  trains from: the pruned network (``trained_*``, ``mask``) moved onto a fresh initialization of
  the same model (``fresh_*``); params are zero outside the returned mask."""
  if variant == "retrain":
    return tickets.apply_mask(trained_params, mask), trained_stats, mask
  if variant == "mask":
    return tickets.apply_mask(fresh_params, mask), fresh_stats, mask
  if variant == "dense":
    return fresh_params, fresh_stats, dense_mask(fresh_params)
  if variant != "sign":  # anything else would silently run as a sign transfer
    raise ValueError(f"unknown transfer {variant!r}; known: {', '.join(TRANSFERS)}")
  signs = tickets.signs_of(tickets.apply_mask(trained_params, mask))
  sign_mask = tickets.mask_from_signs(signs, prunable)
  # Kernels and biases of every conv/dense layer, the classifier included; norms stay fresh.
  where = tickets.prunable(fresh_params, biases=True)
  return (tickets.transfer_signs(fresh_params, signs, sign_mask, where=where), fresh_stats,
          sign_mask)
