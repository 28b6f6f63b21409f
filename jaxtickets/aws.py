"""A Winning Sign (Oh, Baik, Lee; ICLR 2025): iterative pruning with norm interpolation, transfer.

Official code: JungHunOh/AWS_ICLR2025. Everything here is a pure function of explicit arguments.

**Sparse training.** A network under pruning is a :class:`SparseState`: a ``train.TrainState``,
its bool mask and whether it trains with AWS. :func:`make_sparse_step` is
``train.make_train_step`` on :func:`aws_apply_fn`, whose forward pass multiplies the weights by
the mask (the reference's ``weight * fixed_m``, so pruned weights receive no gradient), and which
then re-applies the mask to the updated params, so pruned weights stay exactly zero whatever the
optimizer does (the reference leaves them to drift under weight decay, unused). LRR and AWS
members differ only in ``SparseState.aws`` and can share one population.

**AWS.** On every training step one ``alpha ~ U(0, 1)`` (drawn from the step's model key) is
shared by all norm layers, whose forward pass uses ``gamma_eff = alpha + (1 - alpha) * gamma``
and ``beta_eff = (1 - alpha) * beta``: the point at ``alpha`` on the line from the trained norm
params to their initial values (1, 0). Running statistics keep updating under that forward
pass; evaluation (``train=False``) uses ``alpha = 0``. With ``aws=False`` the step is exactly
plain training. This is a param transform (:func:`interpolate_norms`), so it works for any
norm layer whose module name contains ``norm`` (BatchNorm, GroupNorm, LayerNorm alike).

**Pruning** (:func:`next_round`): learning-rate rewinding (LRR): each round removes ``fraction``
(0.2) of the surviving prunable weights by one global magnitude threshold
(``tickets.prune_by_magnitude``; of S survivors ``int(S * 0.8)`` stay), training continues from
the current weights (optionally rewound to init: IMP), the optimizer state is reset. Prunable:
every conv (first, shortcut and depthwise ones too) and every dense layer except the classifier
(:func:`prunable_leaves`); biases, norms and the classifier stay dense.

**Transfer** (:func:`transfer`) of a pruned network to a fresh initialization: ``"sign"``
(``|w_init| * sign(w_T * m)`` with mask ``sign != 0``; biases and the classifier get
``|init| * sign(trained)``; norm params and statistics reset), ``"mask"`` (``w_init * m``),
``"retrain"`` (``w_T * m`` with the trained norms and statistics) and ``"dense"`` (the fresh
network unpruned, the baseline).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxtickets import paths, tickets
from jaxtickets import train as train_lib
from jaxtickets.errors import UserError

PyTree = Any

METHODS = ("lrr", "aws")
TRAINED_TRANSFERS = ("sign", "mask", "retrain")  # transfers of a pruned network
TRANSFERS = (*TRAINED_TRANSFERS, "dense")
REWINDS = ("none", "init")
# The share of the surviving weights each round removes (the reference's pruning_ratio).
DEFAULT_FRACTION = 0.2
# Initial values of norm affine params: the end of AWS's interpolation line.
_NORM_INIT = {"scale": 1.0, "bias": 0.0}


# ----------------------------------------------------------------------------------------------
# Norm interpolation


def _is_norm_leaf(path: Sequence[Any]) -> bool:
  return paths.is_norm_param(paths.names(path))


def norm_leaves(params: PyTree) -> PyTree:
  """Python bools marking the norm affine params (``scale``/``bias`` of ``*norm*`` modules)."""
  return jax.tree.map_with_path(lambda path, _: _is_norm_leaf(path), params)


def interpolate_norms(params: PyTree, alpha: float | jax.Array) -> PyTree:
  """AWS's norm params at ``alpha``: ``scale -> alpha + (1 - alpha) * scale``,
  ``bias -> (1 - alpha) * bias``; every other leaf unchanged.

  ``alpha = 0`` returns the params exactly; ``alpha = 1`` the initialized norms (1, 0).

  Args:
    params: float tree (the model's params).
    alpha: f32[] in [0, 1] (may be traced).
  """

  def interpolate(path: Sequence[Any], leaf: jax.Array) -> jax.Array:
    if not _is_norm_leaf(path):
      return leaf
    alpha_ = jnp.asarray(alpha, leaf.dtype)
    initial = _NORM_INIT[paths.key_name(path[-1])]
    return alpha_ * initial + (1 - alpha_) * leaf

  return jax.tree.map_with_path(interpolate, params)


def initialized_norms(params: PyTree) -> PyTree:
  """``params`` with every norm ``scale`` 1 and ``bias`` 0 (the paper's diagnostic partner)."""
  return interpolate_norms(params, 1.0)


def aws_apply_fn(model_apply_fn: train_lib.ApplyFn, mask: PyTree,
                 aws: bool | jax.Array) -> train_lib.ApplyFn:
  """The ``ApplyFn`` of a masked network that trains with AWS when ``aws`` is true.

  Forward: ``model_apply_fn(interpolate_norms(where(mask, params, 0), alpha))`` with
  ``alpha ~ U(0, 1)`` drawn from ``key`` in train mode when ``aws``, else ``alpha = 0`` (then
  the norms are the params exactly). Eval mode never interpolates.

  Args:
    model_apply_fn: the plain network (``train.model_apply_fn``).
    mask: bool tree shaped like the params.
    aws: bool[] (may be traced: a population member's flag) or a Python bool.

  Returns:
    ``apply_fn(params, batch_stats, x, train, key=None)``; ``key`` is needed in train mode
    unless ``aws`` is a Python False (e.g. for ``lmc.recalibrate``).
  """

  def apply_fn(params, batch_stats, x, train, key=None):
    params = tickets.apply_mask(params, mask)
    if train and aws is not False:
      if key is None:
        raise UserError("an AWS network draws its interpolation point from a key in train "
                        "mode; pass one")
      alpha = jnp.where(aws, jax.random.uniform(key), 0.0)
      params = interpolate_norms(params, alpha)
    return model_apply_fn(params, batch_stats, x, train, key)

  return apply_fn


# ----------------------------------------------------------------------------------------------
# Sparse training


class SparseState(NamedTuple):
  """A masked network in training; a population has a leading member axis on every leaf.

  Attributes:
    train: the ``TrainState``; its params are exactly zero where ``mask`` is False.
    mask: bool tree shaped like the params (all-True on leaves that are not prunable).
    aws: bool[]: train with AWS's norm interpolation (False: plain training, e.g. LRR).
  """
  train: train_lib.TrainState
  mask: PyTree
  aws: jax.Array

  @property
  def step(self) -> jax.Array:
    """Optimizer steps taken (what ``loop.fit`` counts)."""
    return self.train.step


SparseStep = Callable[[SparseState, train_lib.Data], tuple[SparseState, dict[str, jax.Array]]]


def prunable_leaves(params: PyTree) -> PyTree:
  """What AWS/LRR prune: every conv and dense kernel except the classifier's (Python bools)."""
  return tickets.prunable(params, first_conv=True, shortcut=True, classifier=False)


def dense_mask(params: PyTree) -> PyTree:
  """An all-True mask shaped like ``params``."""
  return jax.tree.map(lambda leaf: jnp.ones(jnp.shape(leaf), bool), params)


def init_sparse_state(key: jax.Array, params: PyTree, batch_stats: PyTree, mask: PyTree,
                      aws: bool | jax.Array, optimizer: optax.GradientTransformation
                      ) -> SparseState:
  """A fresh sparse member: ``params`` masked, a new optimizer state, step 0.

  Args:
    key: the member's PRNG key (data order, augmentation, AWS's alpha draws).
    params: float tree.
    batch_stats: BatchNorm statistics ({} without BatchNorm).
    mask: bool tree shaped like ``params``.
    aws: whether the member trains with AWS.
    optimizer: its optimizer.
  """
  params = tickets.apply_mask(params, mask)
  return SparseState(train_lib.create_train_state(key, params, batch_stats, optimizer), mask,
                     jnp.asarray(aws, bool))


def make_sparse_step(model_apply_fn: train_lib.ApplyFn, optimizer: optax.GradientTransformation,
                     *, batch_size: int,
                     augment: train_lib.Augment | None = train_lib.crop_flip) -> SparseStep:
  """One optimizer step of a :class:`SparseState` (LRR, AWS, or fine-tuning a fixed mask).

  Args:
    model_apply_fn: the plain network on pixels in [0, 1].
    optimizer: e.g. ``train.sgd`` (coupled weight decay on all params, as the reference).
    batch_size: examples per step.
    augment: data augmentation, or None.

  Returns:
    ``step(state, data) -> (state, {"loss", "accuracy"})``, pure and vmappable (the mask and
    the AWS flag are read from the state, so members of a population may differ in both).
  """

  def step(state: SparseState, data: train_lib.Data):
    apply_fn = aws_apply_fn(model_apply_fn, state.mask, state.aws)
    train_step = train_lib.make_train_step(apply_fn, optimizer, batch_size=batch_size,
                                           augment=augment)
    trained, metrics = train_step(state.train, data)
    # The masked forward already zeroes the gradient of pruned weights; re-masking makes them
    # exactly zero after any update (momentum, weight decay), so sign(w) == 0 marks the pruned.
    params = tickets.apply_mask(trained.params, state.mask)
    return state._replace(train=trained._replace(params=params)), metrics

  return step


# ----------------------------------------------------------------------------------------------
# Pruning


def check_fraction(fraction: Any) -> float:
  """The per-round pruning fraction as a float; UserError unless a number in (0, 1)."""
  if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not (
      0 < fraction < 1):
    raise UserError(f"pruning fraction must be a number in (0, 1), got {fraction!r}")
  return float(fraction)


def check_rounds(rounds: Any) -> int:
  """The number of pruning rounds; UserError unless an int >= 1."""
  if isinstance(rounds, bool) or not isinstance(rounds, numbers.Integral) or rounds < 1:
    raise UserError(f"pruning rounds must be an int >= 1, got {rounds!r}")
  return int(rounds)


def nominal_densities(rounds: int, fraction: float = DEFAULT_FRACTION) -> list[float]:
  """``(1 - fraction) ** k`` for k = 1..rounds: the density after each round (the exact counts
  of ``tickets.prune_by_magnitude`` land at most one weight per round below it).

  Raises:
    UserError: ``rounds`` < 1 or ``fraction`` outside (0, 1).
  """
  rounds, fraction = check_rounds(rounds), check_fraction(fraction)
  return [(1 - fraction) ** k for k in range(1, rounds + 1)]


def rounds_for_densities(densities: Sequence[float], rounds: int,
                         fraction: float = DEFAULT_FRACTION) -> tuple[int, ...]:
  """The pruning round whose density ``(1 - fraction) ** k`` is nearest each wanted density.

  Args:
    densities: wanted densities, each in (0, 1].
    rounds: rounds the schedule runs.
    fraction: share of survivors each round removes.

  Returns:
    Round numbers k in [1, rounds], one per density, in the given order.

  Raises:
    UserError: a density outside (0, 1] or nearer to a round outside [1, rounds] (1.0 is the
      dense network), two densities nearest one round, or bad ``rounds``/``fraction``.
  """
  rounds, fraction = check_rounds(rounds), check_fraction(fraction)
  if np.ndim(densities) != 1 or not len(densities):
    raise UserError(f"densities={densities!r}; expected a non-empty sequence in (0, 1]")
  chosen = []
  for density in densities:
    if isinstance(density, bool) or not isinstance(density, numbers.Real) or not (
        0 < density <= 1):
      raise UserError(f"density must be in (0, 1], got {density!r}")
    k = round(math.log(density) / math.log(1 - fraction))
    if not 1 <= k <= rounds:
      raise UserError(f"density {density!r} is nearest round {k} of a schedule of rounds "
                      f"1..{rounds} (densities {(1 - fraction):.3g}..{(1 - fraction)**rounds:.3g})")
    if k in chosen:
      raise UserError(f"densities {densities[chosen.index(k)]!r} and {density!r} are both "
                      f"nearest round {k}; each would train the same ticket twice")
    chosen.append(k)
  return tuple(chosen)


def prune(params: PyTree, mask: PyTree, prunable: PyTree, fraction: float) -> tuple[PyTree, PyTree]:
  """One pruning step: the global-magnitude mask and the params masked by it.

  Args:
    params: float tree (trained weights; entries outside ``mask`` are ignored).
    mask: the current bool mask.
    prunable: Python bools, :func:`prunable_leaves`.
    fraction: share of the surviving prunable weights removed, in [0, 1] (0 keeps the mask).

  Returns:
    ``(masked params, new mask)``. Jittable and vmappable (masks may be traced).
  """
  new_mask = tickets.prune_by_magnitude(params, mask, fraction, prunable, scope="global")
  return tickets.apply_mask(params, new_mask), new_mask


def next_round(state: SparseState, optimizer: optax.GradientTransformation, prunable: PyTree, *,
               fraction: float, key: jax.Array, rewind: SparseState | None = None
               ) -> SparseState:
  """The start of the next pruning round after ``state`` finished training.

  Prunes ``fraction`` of the survivors (:func:`prune`), resets the optimizer state and the step
  count (the reference rebuilds its optimizer each round) and gives the round its own key.

  Args:
    state: the member at the end of a round.
    optimizer: the round's optimizer.
    prunable: Python bools, :func:`prunable_leaves`.
    fraction: share of surviving weights removed (0.0: keep the mask, e.g. after the warm-up).
    key: PRNG key of the new round (data order, AWS draws).
    rewind: None for LRR (training continues from the current weights); a state whose params
      and statistics the new round starts from instead (IMP rewinding, e.g. the initial state).

  Returns:
    The new round's first state. Jittable and vmappable.
  """
  params, mask = prune(state.train.params, state.mask, prunable, fraction)
  batch_stats = state.train.batch_stats
  if rewind is not None:
    params, batch_stats = rewind.train.params, rewind.train.batch_stats
  return init_sparse_state(key, params, batch_stats, mask, state.aws, optimizer)


# ----------------------------------------------------------------------------------------------
# Transfer


def check_transfer(variant: str) -> str:
  """``variant`` if it is one of :data:`TRANSFERS`, else UserError."""
  if variant not in TRANSFERS:
    raise UserError(f"unknown transfer {variant!r}; known: {', '.join(TRANSFERS)}")
  return variant


def transfer(variant: str, trained_params: PyTree, trained_stats: PyTree, mask: PyTree,
             fresh_params: PyTree, fresh_stats: PyTree,
             prunable: PyTree) -> tuple[PyTree, PyTree, PyTree]:
  """The starting point of one transfer experiment (see module docstring).

  Args:
    variant: one of :data:`TRANSFERS`.
    trained_params: the pruned network's params (entries outside ``mask`` ignored).
    trained_stats: its BatchNorm statistics.
    mask: its bool mask.
    fresh_params: a fresh initialization of the same model (new key).
    fresh_stats: its (initial) statistics.
    prunable: Python bools, :func:`prunable_leaves`.

  Returns:
    ``(params, batch_stats, mask)`` to train from; params are zero outside the mask.
    Jittable and vmappable.

  Raises:
    UserError: unknown variant or mismatched trees.
  """
  check_transfer(variant)
  if variant == "retrain":
    return tickets.apply_mask(trained_params, mask), trained_stats, mask
  if variant == "mask":
    return tickets.apply_mask(fresh_params, mask), fresh_stats, mask
  if variant == "dense":
    return fresh_params, fresh_stats, dense_mask(fresh_params)
  signs = tickets.signs_of(tickets.apply_mask(trained_params, mask))
  sign_mask = tickets.mask_from_signs(signs, prunable)
  # Kernels and biases of every conv/dense layer, the classifier included; norms stay fresh.
  where = tickets.prunable(fresh_params, biases=True)
  return (tickets.transfer_signs(fresh_params, signs, sign_mask, where=where), fresh_stats,
          sign_mask)
