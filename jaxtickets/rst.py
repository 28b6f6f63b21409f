"""Robust Scratch Tickets (Fu et al., NeurIPS 2021) and the Random RST Switch (R2S).

A ticket is ``Ticket(weights, scores, keep_ratio)``: frozen random weights (shared by every ticket
drawn from the same dense net: one weight key), one score per weight, and the fraction of each
layer it keeps. Its subnetwork is ``weights * topk_mask(|scores|, keep_ratio)`` per layer
(:mod:`jaxtickets.tickets`); every conv, the shortcuts and the bias-free classifier are masked, on
a model built with :data:`MODEL_OPTIONS` (non-affine BatchNorm with running statistics).

Searching a ticket trains the scores only. The trained pytree is ``{"scores", "weights"}`` (see
:func:`search_params`); :func:`score_optimizer` freezes the weights with
``optax.multi_transform``, and the forward pass of :func:`ticket_apply_fn` stops their gradient,
so the straight-through estimator sends ``sign(s) * w * dL/dW_eff`` to the scores alone.

The RST search step (:func:`make_search_step` with a :class:`TrainingAttack`) is Madry PGD
adversarial training on ``train.make_train_step``: the subnetwork is formed once per step, every
PGD iteration attacks those fixed weights (running BatchNorm in train mode and advancing its running
statistics, as the reference code does), and the training forward/backward on the adversarial batch
reaches the scores through the straight-through mask. Without an attack it is edge-popup's natural
search. The training forward forms the same ``masked_params`` from the same scores as the attack,
so the compiled step sorts each layer's scores once (XLA merges the two identical sorts; the
reference sorts in every one of its 8 forwards).

Keep ratios may be traced, so ``K`` tickets of different ratios train as one population
(:func:`make_population_step`). R2S then answers each batch (or each example) with a ticket
drawn at random (:func:`switch_apply_fn`). :func:`transfer_matrix` gives the paper's white-box
and transfer evaluations; :func:`switch_accuracy` scores R2S against any attacker, e.g. the
adaptive one that averages its gradients over the switch (``eot_samples`` of ``attacks.pgd``).

Also here: the dense adversarial baseline (:func:`make_adversarial_train_step` on a plain
network) and fine-tuning a found ticket with its mask fixed (:func:`make_finetune_step`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxtickets import attacks
from jaxtickets import data as data_lib
from jaxtickets import errors
from jaxtickets import population
from jaxtickets import tickets
from jaxtickets import train as train_lib
from jaxtickets.errors import UserError

PyTree = Any
KeepRatio = float | jax.Array
Step = Callable[..., tuple[train_lib.TrainState, dict[str, jax.Array]]]

# Model options of an RST network: no affine norm parameters, no biases, so that every parameter
# is a masked kernel (the reference's classifier is a bias-free 1x1 conv).
MODEL_OPTIONS: Mapping[str, Any] = {"norm": "batch_noaffine", "head_bias": False,
                                    "use_bias": False}
# What BatchNorm does during the training attack: "update" runs in train mode and advances the
# running statistics on every attack pass (the reference); "batch" uses batch statistics but
# leaves the running ones to the training pass; "eval" uses the running statistics.
ATTACK_BATCH_NORM = ("update", "batch", "eval")
FINETUNE_INITS = ("inherited", "reinit")


class Ticket(NamedTuple):
  """A ticket drawn from a random dense net; a population has a leading axis on every leaf.

  Attributes:
    weights: the frozen random params (the model's param tree).
    scores: one score per weight, shaped like ``weights``.
    keep_ratio: fraction of each prunable layer kept (RST's remaining ratio), in (0, 1]; f32[K]
      for a population.
  """
  weights: PyTree
  scores: PyTree
  keep_ratio: KeepRatio


# ----------------------------------------------------------------------------------------------
# Validation


def check_ticket(ticket: Ticket, params: PyTree) -> None:
  """Raises UserError unless ``ticket`` fits a model whose params are ``params``.

  Args:
    ticket: a single ticket (no member axis).
    params: the model's param tree (arrays or ``jax.ShapeDtypeStruct``).
  """
  tickets.check_matches(params, ticket.weights, what="ticket weights",
                        reference_name="the model's params")
  tickets.check_matches(params, ticket.scores, what="ticket scores",
                        reference_name="the model's params")
  tickets.check_keep_ratio(ticket.keep_ratio)


@dataclasses.dataclass(frozen=True)
class TrainingAttack:
  """The PGD of adversarial training (Madry et al.); the defaults are RST's.

  Attributes:
    eps: Linf radius on pixels in [0, 1].
    step_size: per-pixel step.
    num_steps: gradient steps (each one forward/backward of the network).
    random_start: start uniformly in the ball.
    batch_norm: one of :data:`ATTACK_BATCH_NORM`.
  """
  eps: float = 8 / 255
  step_size: float = 2 / 255
  num_steps: int = 7
  random_start: bool = True
  batch_norm: str = "update"

  def __post_init__(self):
    errors.check_number("attack eps", self.eps, 0)
    errors.check_number("attack step_size", self.step_size, 0, strict=True)
    errors.check_int("attack num_steps", self.num_steps)
    if self.batch_norm not in ATTACK_BATCH_NORM:
      raise UserError(f"unknown attack batch_norm {self.batch_norm!r}; known: "
                      f"{', '.join(ATTACK_BATCH_NORM)}")


# ----------------------------------------------------------------------------------------------
# Tickets


def init_ticket(weight_key: jax.Array, score_key: jax.Array, params: PyTree,
                keep_ratio: KeepRatio, prunable: PyTree, *,
                weight_init: str = "signed_kaiming_constant") -> Ticket:
  """Draws a ticket: frozen weights from ``weight_key``, scores from ``score_key``.

  Args:
    weight_key: the dense net's key; tickets sharing it share their weights.
    score_key: key of the kaiming-uniform(a=sqrt(5)) scores.
    params: the model's freshly initialized params (shapes; non-prunable leaves are kept).
    keep_ratio: fraction kept per layer, in (0, 1].
    prunable: Python bools from ``tickets.prunable(params)`` (all kernels for RST).
    weight_init: the frozen weights' initializer: "signed_kaiming_constant" (RST's default) or
      the paper's ablations "kaiming_normal", "kaiming_uniform", "xavier_normal" (any
      ``get_initializer`` name works).

  Returns:
    The ticket. Vmappable over keys and ratios.

  Raises:
    UserError: a keep ratio outside (0, 1], an unknown initializer, a non-kernel prunable leaf.
  """
  tickets.check_keep_ratio(keep_ratio)
  weights = tickets.reinit_weights(weight_key, params, prunable, weight_init)
  return Ticket(weights, tickets.init_scores(score_key, params, prunable), keep_ratio)


def ticket_mask(ticket: Ticket, prunable: PyTree) -> PyTree:
  """bool tree: the per-layer top-k of ``|ticket.scores|`` (all-True on non-prunable leaves)."""
  return tickets.topk_mask(ticket.scores, ticket.keep_ratio, prunable)


def subnetwork(ticket: Ticket, prunable: PyTree) -> PyTree:
  """The ticket's forward weights ``weights * mask``, as a plain param tree (no gradient)."""
  return jax.lax.stop_gradient(
      tickets.masked_params(ticket.weights, ticket.scores, ticket.keep_ratio, prunable))


def subnetworks(tickets_population: Ticket, prunable: PyTree) -> PyTree:
  """:func:`subnetwork` of every member of a ticket population (leading axis K)."""
  return jax.vmap(functools.partial(subnetwork, prunable=prunable))(tickets_population)


def search_params(ticket: Ticket) -> dict[str, PyTree]:
  """The pytree a search trains: ``{"scores": ..., "weights": ...}`` (weights stay frozen)."""
  return {"scores": ticket.scores, "weights": ticket.weights}


def ticket_of(params: Mapping[str, PyTree], keep_ratio: KeepRatio) -> Ticket:
  """The ticket held by search params ``{"scores", "weights"}``."""
  return Ticket(params["weights"], params["scores"], keep_ratio)


def score_optimizer(learning_rate: float | optax.Schedule, *, momentum: float = 0.9,
                    weight_decay: float = 5e-4) -> optax.GradientTransformation:
  """SGD with coupled weight decay on ``scores``; ``weights`` never change (exactly)."""
  return optax.multi_transform(
      {"scores": train_lib.sgd(learning_rate, momentum=momentum, weight_decay=weight_decay),
       "frozen": optax.set_to_zero()},
      {"scores": "scores", "weights": "frozen"})


def ticket_apply_fn(model_apply_fn: train_lib.ApplyFn, keep_ratio: KeepRatio,
                    prunable: PyTree) -> train_lib.ApplyFn:
  """The ``ApplyFn`` of a ticket under search, on params ``{"scores", "weights"}``.

  Forward: ``model_apply_fn`` with ``weights * ste_mask(scores, keep_ratio)``; the gradient
  reaches the scores (straight-through) and not the weights.

  Args:
    model_apply_fn: the network on plain params (``train.model_apply_fn`` of the model).
    keep_ratio: Python float or traced f32[] (a population member's ratio).
    prunable: Python bools (closed over, never traced).
  """

  def apply_fn(params, batch_stats, x, train, key=None):
    weights = tickets.masked_params(jax.lax.stop_gradient(params["weights"]), params["scores"],
                                    keep_ratio, prunable)
    return model_apply_fn(weights, batch_stats, x, train, key)

  return apply_fn


def masked_apply_fn(model_apply_fn: train_lib.ApplyFn, mask: PyTree) -> train_lib.ApplyFn:
  """The ``ApplyFn`` of a fixed subnetwork being fine-tuned: ``model_apply_fn(where(mask, w, 0))``.

  Pruned weights get no gradient from the loss (weight decay still shrinks them; they stay unused).
  """

  def apply_fn(params, batch_stats, x, train, key=None):
    return model_apply_fn(tickets.apply_mask(params, mask), batch_stats, x, train, key)

  return apply_fn


# ----------------------------------------------------------------------------------------------
# Train steps


def make_adversarial_train_step(
    apply_fn: train_lib.ApplyFn, optimizer: optax.GradientTransformation, *, batch_size: int,
    augment: train_lib.Augment | None = train_lib.crop_flip,
    attack: TrainingAttack = TrainingAttack(),
    attack_apply_fn: train_lib.ApplyFn | None = None,
    attack_params: Callable[[PyTree], PyTree] | None = None) -> Step:
  """``train.make_train_step`` on PGD adversarial examples of each batch (Madry et al.).

  Args:
    apply_fn: the trained network on ``state.params``.
    optimizer: updates ``state.params``.
    batch_size: examples per step.
    augment: applied before the attack.
    attack: the PGD settings.
    attack_apply_fn: the network the attack runs (default ``apply_fn``) on ``attack_params``.
    attack_params: ``state.params -> params of attack_apply_fn``, evaluated once per step and
      held fixed through every attack iteration (for a ticket: its masked weights, so no top-k
      runs inside the attack). Default: the params themselves.

  Returns:
    ``step(state, data) -> (state, {"loss", "accuracy"})`` (loss and accuracy on the adversarial
    batch), pure and vmappable.
  """
  attack_apply_fn = apply_fn if attack_apply_fn is None else attack_apply_fn

  def perturb(key, params, batch_stats, x, labels):
    fixed = params if attack_params is None else attack_params(params)
    result = attacks.pgd(attack_apply_fn, jax.lax.stop_gradient(fixed), batch_stats, x, labels,
                         key, eps=attack.eps, step_size=attack.step_size,
                         num_steps=attack.num_steps, random_start=attack.random_start,
                         train=attack.batch_norm != "eval")
    return result.x_adv, result.batch_stats if attack.batch_norm == "update" else batch_stats

  return train_lib.make_train_step(apply_fn, optimizer, batch_size=batch_size, augment=augment,
                                   perturb=perturb)


def _step_maker(attack: TrainingAttack | None, **kwargs: Any) -> Callable[..., Step]:
  """``(apply_fn, attack_apply_fn, attack_params) -> step``: adversarial, or natural if None."""

  def make(apply_fn, attack_apply_fn, attack_params):
    if attack is None:
      return train_lib.make_train_step(apply_fn, **kwargs)
    return make_adversarial_train_step(apply_fn, attack=attack, attack_apply_fn=attack_apply_fn,
                                       attack_params=attack_params, **kwargs)

  return make


def make_search_step(model_apply_fn: train_lib.ApplyFn, optimizer: optax.GradientTransformation,
                     prunable: PyTree, *, batch_size: int,
                     augment: train_lib.Augment | None = train_lib.crop_flip,
                     attack: TrainingAttack | None = TrainingAttack()) -> Step:
  """One score-search step of a ticket: RST (adversarial) or, with ``attack=None``, edge-popup.

  Args:
    model_apply_fn: the network on plain params.
    optimizer: usually :func:`score_optimizer`.
    prunable: Python bools of the masked leaves.
    batch_size: examples per step.
    augment: data augmentation, or None.
    attack: the training attack, or None for the natural search.

  Returns:
    ``step(state, data, keep_ratio) -> (state, metrics)`` on ``state.params`` =
    :func:`search_params`; ``keep_ratio`` may be traced (see :func:`make_population_step`).
  """
  make = _step_maker(attack, optimizer=optimizer, batch_size=batch_size, augment=augment)

  def step(state, data, keep_ratio):
    def attack_params(params):
      return subnetwork(ticket_of(params, keep_ratio), prunable)

    apply_fn = ticket_apply_fn(model_apply_fn, keep_ratio, prunable)
    return make(apply_fn, model_apply_fn, attack_params)(state, data)

  return step


def make_finetune_step(model_apply_fn: train_lib.ApplyFn,
                       optimizer: optax.GradientTransformation, *, batch_size: int,
                       augment: train_lib.Augment | None = train_lib.crop_flip,
                       attack: TrainingAttack | None = TrainingAttack()) -> Step:
  """One step of training a found subnetwork's weights with its mask fixed.

  Returns:
    ``step(state, data, mask) -> (state, metrics)`` on ``state.params`` = the weights (inherited
    from the ticket or re-drawn, see :func:`finetune_weights`); ``mask`` is a bool tree shaped
    like them, per member in a population.
  """
  make = _step_maker(attack, optimizer=optimizer, batch_size=batch_size, augment=augment)

  def step(state, data, mask):
    apply_fn = masked_apply_fn(model_apply_fn, mask)
    return make(apply_fn, model_apply_fn, lambda params: tickets.apply_mask(params, mask))(
        state, data)

  return step


def finetune_weights(ticket: Ticket, prunable: PyTree, *, init: str = "inherited",
                     key: jax.Array | None = None,
                     weight_init: str = "kaiming_normal") -> PyTree:
  """Starting weights for fine-tuning ``ticket``'s subnetwork.

  Args:
    ticket: a single ticket.
    prunable: Python bools.
    init: "inherited" (the ticket's own random weights) or "reinit" (fresh ones).
    key: PRNG key of the fresh weights ("reinit" only).
    weight_init: initializer of the fresh weights.

  Returns:
    Param tree shaped like ``ticket.weights`` (masked entries included; the mask hides them).

  Raises:
    UserError: unknown ``init``, or "reinit" without a key.
  """
  if init not in FINETUNE_INITS:
    raise UserError(f"unknown fine-tuning init {init!r}; known: {', '.join(FINETUNE_INITS)}")
  if init == "inherited":
    return ticket.weights
  if key is None:
    raise UserError("fine-tuning init 'reinit' needs a PRNG key")
  return tickets.reinit_weights(key, ticket.weights, prunable, weight_init)


def make_population_step(step: Step, member_inputs: PyTree, **run_options: Any) -> Step:
  """A population step ``(states, data) -> (states, metrics)`` for ``loop.fit``.

  Args:
    step: ``step(state, data, member_input)`` (from :func:`make_search_step` or
      :func:`make_finetune_step`).
    member_inputs: per-member third argument with leading axis K: the keep ratios f32[K] (R2S:
      K ratios searched as one population) or the masks of K tickets.
    **run_options: ``population.run`` options (strategy, chunk_size, mesh).
  """
  population_step = population.run(step, member_axes=(0, None, 0), **run_options)
  return lambda states, data: population_step(states, data, member_inputs)


# ----------------------------------------------------------------------------------------------
# Evaluation


def evaluation_attacks(*, eps: float = 8 / 255, step_size: float = 2 / 255,
                       pgd_steps: int = 20, apgd_steps: int = 100,
                       num_classes: int = 10) -> dict[str, attacks.Attack]:
  """The white-box attacks of the evaluation tables, by column name.

  ``pgd`` is RST's evaluation (PGD-20, random start, only still-correct inputs updated); ``cw``
  the same on the CW margin; ``apgd_ce`` and (with >= 3 classes) ``apgd_dlr`` AutoAttack's APGD.
  """
  # The attacks check their options when called; a config's typo should fail before training.
  errors.check_number("eps", eps, 0)
  errors.check_number("step_size", step_size, 0, strict=True)
  errors.check_int("pgd_steps", pgd_steps)
  errors.check_int("apgd_steps", apgd_steps)
  common = {"eps": eps, "step_size": step_size, "num_steps": pgd_steps, "early_stop": True}
  named = {"pgd": attacks.get_attack("pgd", **common), "cw": attacks.get_attack("cw", **common),
           "apgd_ce": attacks.get_attack("apgd-ce", eps=eps, num_steps=apgd_steps)}
  if num_classes >= 3:
    named["apgd_dlr"] = attacks.get_attack("apgd-dlr", eps=eps, num_steps=apgd_steps)
  return named


def even_batch_size(num_examples: int, batch_size: int) -> int:
  """The smallest batch size that splits ``num_examples`` into as few batches as ``batch_size``.

  Evaluations pad the last batch to a full one; this keeps the padding below one example per
  batch (359 examples at 500 per batch: one batch of 359, not 500).
  """
  errors.check_int("examples in the evaluated split", num_examples)
  num_batches = -(-num_examples // max(1, min(batch_size, num_examples)))
  return -(-num_examples // num_batches)


def population_robust_accuracy(model_apply_fn: train_lib.ApplyFn, params: PyTree,
                               batch_stats: PyTree, data: train_lib.Data, key: jax.Array,
                               attack: attacks.Attack, *,
                               batch_size: int = 500) -> dict[str, jax.Array]:
  """``attacks.robust_accuracy`` of every member of a population of subnetworks.

  Args:
    params: plain params with leading axis K (e.g. :func:`subnetworks`).
    batch_stats: their running statistics, leading axis K.

  Returns:
    {"clean_accuracy": f32[K], "robust_accuracy": f32[K]}; every member sees the same keys.
  """

  def one(member_params, member_stats):
    return attacks.robust_accuracy(
        model_apply_fn, member_params, member_stats, data.images, data.labels, key, attack,
        batch_size=even_batch_size(data.labels.shape[0], batch_size))

  return jax.vmap(one)(params, batch_stats)


def _mean_over_split(per_example: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
                     data: train_lib.Data, key: jax.Array, batch_size: int) -> jax.Array:
  """Mean over a split of ``per_example(x f32[B, H, W, C], y i32[B], key) -> f32[..., B]``.

  Batches of :func:`even_batch_size` are padded to one shape (one compilation for any split
  size) and run by ``lax.map``.

  Returns:
    f32[...].
  """
  num_examples = data.labels.shape[0]

  def batch_total(images, y, valid, batch_key):
    values = per_example(data_lib.to_unit(images), y, batch_key)
    return jnp.sum(jnp.where(valid, values, 0.0), axis=-1)

  totals = data_lib.map_batches(batch_total, data.images, data.labels,
                                even_batch_size(num_examples, batch_size), key)
  return jnp.sum(totals, axis=0) / num_examples


def _correct_per_member(model_apply_fn: train_lib.ApplyFn, params: PyTree, batch_stats: PyTree,
                        x: jax.Array, y: jax.Array) -> jax.Array:
  """f32[K, B]: whether member k (eval mode) classifies each of ``x: f32[B, ...]`` correctly."""

  def correct(member_params, member_stats):
    logits, _ = model_apply_fn(member_params, member_stats, x, False)
    return (jnp.argmax(logits, -1) == y).astype(jnp.float32)

  return jax.vmap(correct)(params, batch_stats)


def transfer_matrix(model_apply_fn: train_lib.ApplyFn, params: PyTree, batch_stats: PyTree,
                    data: train_lib.Data, key: jax.Array, attack: attacks.Attack, *,
                    batch_size: int = 500) -> jax.Array:
  """Accuracy of ticket j on adversarial examples crafted (white-box) on ticket i.

  Args:
    params: K subnetworks (plain params, leading axis K).
    batch_stats: their running statistics.
    data: the evaluation split.
    key: PRNG key; every source ticket is attacked with the same per-batch keys.
    attack: e.g. ``evaluation_attacks()["pgd"]``.

  Returns:
    f32[K, K], rows = source (attacked) ticket, columns = evaluated ticket; the diagonal is the
    white-box accuracy under attack.
  """

  def per_example(x, y, batch_key):
    def craft(member_params, member_stats):
      return attack(model_apply_fn, member_params, member_stats, x, y, batch_key).x_adv

    x_adv = jax.vmap(craft)(params, batch_stats)  # [K_source, B, H, W, C]
    num_sources = x_adv.shape[0]
    correct = _correct_per_member(model_apply_fn, params, batch_stats,
                                  x_adv.reshape(-1, *x.shape[1:]), jnp.tile(y, num_sources))
    return correct.reshape(-1, num_sources, y.shape[0]).swapaxes(0, 1)  # [source, target, B]

  return _mean_over_split(per_example, data, key, batch_size)


def _member(tree: PyTree, index: jax.Array) -> PyTree:
  """Member ``index`` (traced) of a population tree; empty trees (no statistics) pass."""
  return jax.tree.map(lambda leaf: leaf[index], tree)


def switch_apply_fn(model_apply_fn: train_lib.ApplyFn, *,
                    per_example: bool = False) -> train_lib.ApplyFn:
  """R2S: a randomized network answering with a ticket drawn uniformly from ``key``.

  Its params are K subnetworks (leading axis K) and their running statistics; one ticket answers
  the whole batch, or with ``per_example`` each example draws its own (every ticket then runs
  on the whole batch). Running statistics are never updated (an inference-time defense).

  Returns:
    ``apply_fn(params, batch_stats, x, train, key) -> (logits f32[B, classes], batch_stats)``.
  """

  def apply_fn(params, batch_stats, x, train, key):
    num_tickets = population.size(params)
    if per_example:
      logits, _ = jax.vmap(lambda p, s: model_apply_fn(p, s, x, train))(params, batch_stats)
      choice = jax.random.randint(key, (x.shape[0],), 0, num_tickets)
      return jnp.take_along_axis(logits, choice[None, :, None], axis=0)[0], batch_stats
    index = jax.random.randint(key, (), 0, num_tickets)
    logits, _ = model_apply_fn(_member(params, index), _member(batch_stats, index), x, train)
    return logits, batch_stats

  return apply_fn


def switch_accuracy(model_apply_fn: train_lib.ApplyFn, params: PyTree, batch_stats: PyTree,
                    data: train_lib.Data, key: jax.Array, attack: attacks.Attack | None = None,
                    *, attacked_apply_fn: train_lib.ApplyFn | None = None,
                    batch_size: int = 500) -> jax.Array:
  """Expected accuracy of R2S over its switch, on clean or attacked inputs.

  The switch draws each ticket with probability 1/K (per batch or per example alike), so its
  expected accuracy on an input is the fraction of the K tickets that classify it correctly;
  that expectation is computed exactly instead of sampled.

  Args:
    params: K subnetworks (leading axis K); batch_stats: theirs.
    data: the evaluation split.
    key: PRNG key of the attack.
    attack: run against ``attacked_apply_fn`` on ``(params, batch_stats)``; None: clean inputs.
    attacked_apply_fn: the network the attacker differentiates; default the per-batch
      :func:`switch_apply_fn` (with an attack of ``eot_samples > 1``: the adaptive EOT
      attacker).

  Returns:
    f32[] expected accuracy.
  """

  attacked_apply_fn = attacked_apply_fn or switch_apply_fn(model_apply_fn)

  def per_example(x, y, batch_key):
    if attack is not None:
      x = attack(attacked_apply_fn, params, batch_stats, x, y, batch_key).x_adv
    return jnp.mean(_correct_per_member(model_apply_fn, params, batch_stats, x, y), axis=0)

  return _mean_over_split(per_example, data, key, batch_size)


def r2s_summary(matrix: np.ndarray) -> dict[str, float]:
  """Scalars of a transfer matrix (rows source, columns target), as the paper reads them.

  Returns:
    ``white_box`` (diagonal mean), ``transfer`` (off-diagonal mean; equals ``white_box`` for
    K = 1) and ``random_source`` (whole-matrix mean: R2S's expected accuracy when the attacker
    attacks a ticket drawn uniformly and R2S independently draws the one that answers).
  """
  matrix = np.asarray(matrix, np.float64)
  num_tickets = matrix.shape[0]
  off_diagonal = matrix[~np.eye(num_tickets, dtype=bool)]
  return {"white_box": float(np.mean(np.diag(matrix))),
          "transfer": float(off_diagonal.mean()) if off_diagonal.size else
          float(np.mean(np.diag(matrix))),
          "random_source": float(matrix.mean())}


def keep_ratio_array(keep_ratios: Sequence[float]) -> jax.Array:
  """f32[K] keep ratios of a population, validated.

  Raises:
    UserError: empty, a ratio outside (0, 1], or a ratio given twice (its tickets would be
      identical: the same weights, score init and data order, so R2S's transfer table would
      count a ticket attacking itself as a transfer).
  """
  if np.ndim(keep_ratios) != 1 or not len(keep_ratios):
    raise UserError(f"keep_ratios={keep_ratios!r}; expected a non-empty sequence in (0, 1]")
  for ratio in keep_ratios:
    tickets.check_keep_ratio(ratio)
  try:
    concrete = np.asarray(keep_ratios, np.float64).tolist()
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    concrete = []  # Traced ratios go unchecked, as check_keep_ratio leaves them.
  errors.check_distinct("keep_ratios", concrete, "its tickets would be identical")
  return jnp.asarray(keep_ratios, jnp.float32)
