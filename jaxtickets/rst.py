"""Robust Scratch Tickets (Fu et al., NeurIPS 2021) and the Random RST Switch (R2S).

The paper, in functions:

- A ticket: frozen random weights (signed Kaiming constants, shared by every ticket of one dense
  net), one score per weight, and the entries kept per layer; its subnetwork is the weights under
  the per-layer top-``kept`` of ``|scores|`` (:class:`Ticket`, :func:`init_ticket`,
  :func:`ticket_mask`, :func:`subnetwork`). Every conv, the shortcuts and the bias-free classifier
  are masked, on a model built with :data:`MODEL_OPTIONS` (non-affine BatchNorm).
- RST search: PGD adversarial training (Madry et al.) of the scores alone, which the
  straight-through mask reaches as ``sign(s) * w * dL/dW_eff`` (:class:`SearchState`,
  :func:`make_search_step`, :func:`score_optimizer`); with ``attack=None`` it is edge-popup's
  natural search.
- Fine-tuning a found RST's weights with its mask fixed (:class:`FinetuneState`,
  :func:`make_finetune_step`, :func:`finetune_weights`); the dense adversarial baseline
  (:func:`make_adversarial_train_step`).
- R2S: K tickets of different keep ratios drawn from one random net, searched as one population
  (their kept counts live in the state), each input answered by a ticket drawn at random
  (:func:`switch_apply_fn`); the paper's white-box, transfer and adaptive evaluations
  (:func:`transfer_matrix`, :func:`switch_accuracy` with an EOT attack, :func:`r2s_summary`).
- The white-box test attacks (:func:`evaluation_attacks`, :func:`population_robust_accuracy`).

Kept counts are host values (``tickets.kept_counts``, counted as the reference's ``GetSubnet``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxtickets import attacks
from jaxtickets import data as data_lib
from jaxtickets import metrics as metrics_lib
from jaxtickets import population
from jaxtickets import tickets
from jaxtickets import train as train_lib

PyTree = Any

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
    kept: i32[] per leaf, entries kept (``tickets.kept_counts``); i32[K] in a population.
  """
  weights: PyTree
  scores: PyTree
  kept: PyTree


@dataclasses.dataclass(frozen=True)
class TrainingAttack:
  """The PGD of adversarial training (Madry et al.); the defaults are RST's.

  Attributes:
    eps: Linf radius on pixels in [0, 1], >= 0.
    step_size: per-pixel step, > 0.
    num_steps: gradient steps (each one forward/backward of the network), >= 1.
    random_start: start uniformly in the ball.
    batch_norm: one of :data:`ATTACK_BATCH_NORM`.
  """
  eps: float = 8 / 255
  step_size: float = 2 / 255
  num_steps: int = 7
  random_start: bool = True
  batch_norm: str = "update"

  def __post_init__(self):
    if self.batch_norm not in ATTACK_BATCH_NORM:  # Any other name would act as "batch".
      raise ValueError(f"unknown attack batch_norm {self.batch_norm!r}; known: "
                       f"{', '.join(ATTACK_BATCH_NORM)}")


def _perturb(attack: TrainingAttack, apply_fn: train_lib.ApplyFn, key: jax.Array,
             params: PyTree, batch_stats: PyTree, x: jax.Array,
             labels: jax.Array) -> tuple[jax.Array, PyTree]:
  """PGD examples of ``x: f32[B, H, W, C]`` against the fixed ``params`` (not differentiated),
  and the running statistics the training pass starts from."""
  result = attacks.pgd(apply_fn, jax.lax.stop_gradient(params), batch_stats, x, labels, key,
                       eps=attack.eps, step_size=attack.step_size, num_steps=attack.num_steps,
                       random_start=attack.random_start, train=attack.batch_norm != "eval")
  return result.x_adv, result.batch_stats if attack.batch_norm == "update" else batch_stats


# ----------------------------------------------------------------------------------------------
# Tickets


def init_ticket(weight_key: jax.Array, score_key: jax.Array, params: PyTree, kept: PyTree,
                prunable: PyTree, *, weight_init: str = "signed_kaiming_constant") -> Ticket:
  """Draws a ticket: frozen weights from ``weight_key``, scores from ``score_key``.

  Args:
    weight_key: the dense net's key; tickets sharing it share their weights.
    score_key: key of the kaiming-uniform(a=sqrt(5)) scores.
    params: the model's freshly initialized params (shapes; non-prunable leaves are kept).
    kept: ``tickets.kept_counts(params, keep_ratio, prunable)``.
    prunable: Python bools from ``tickets.prunable(params)``; every prunable leaf a kernel.
    weight_init: the frozen weights' initializer (a ``get_initializer`` name):
      "signed_kaiming_constant" (RST's default) or the paper's ablations "kaiming_normal",
      "kaiming_uniform", "xavier_normal".
  """
  weights = tickets.reinit_weights(weight_key, params, prunable, weight_init)
  return Ticket(weights, tickets.init_scores(score_key, params, prunable), kept)


def ticket_mask(ticket: Ticket, prunable: PyTree) -> PyTree:
  """bool tree: the per-layer top-k of ``|ticket.scores|`` (all-True on non-prunable leaves)."""
  return tickets.topk_mask(ticket.scores, ticket.kept, prunable)


def subnetwork(ticket: Ticket, prunable: PyTree) -> PyTree:
  """The ticket's forward weights ``weights * mask``, as a plain param tree (no gradient)."""
  return jax.lax.stop_gradient(
      tickets.masked_params(ticket.weights, ticket.scores, ticket.kept, prunable))


def subnetworks(tickets_population: Ticket, prunable: PyTree) -> PyTree:
  """:func:`subnetwork` of every member of a ticket population (leading axis K)."""
  return jax.vmap(functools.partial(subnetwork, prunable=prunable))(tickets_population)


def ticket_of(params: Mapping[str, PyTree], kept: PyTree) -> Ticket:
  """The ticket held by search params ``{"scores", "weights"}``."""
  return Ticket(params["weights"], params["scores"], kept)


def score_optimizer(learning_rate: float | optax.Schedule, *, momentum: float = 0.9,
                    weight_decay: float = 5e-4) -> optax.GradientTransformation:
  """SGD with coupled weight decay on ``scores``; ``weights`` never change (exactly)."""
  return optax.multi_transform(
      {"scores": train_lib.sgd(learning_rate, momentum=momentum, weight_decay=weight_decay),
       "frozen": optax.set_to_zero()},
      {"scores": "scores", "weights": "frozen"})


# ----------------------------------------------------------------------------------------------
# Train steps


class SearchState(NamedTuple):
  """A ticket under search; a population has a leading member axis on every leaf.

  Attributes:
    train: params ``{"scores", "weights"}`` (see :func:`init_search_state`).
    kept: i32[] per leaf: the ticket's kept counts (``tickets.kept_counts``).
  """
  train: train_lib.TrainState
  kept: PyTree

  @property
  def step(self) -> jax.Array:
    """Optimizer steps taken (what ``loop.fit`` counts)."""
    return self.train.step


class FinetuneState(NamedTuple):
  """A found subnetwork's weights in training; a population has a leading member axis.

  Attributes:
    train: params = the weights (pruned entries included; the mask hides them).
    mask: bool tree shaped like the weights, fixed.
  """
  train: train_lib.TrainState
  mask: PyTree

  @property
  def step(self) -> jax.Array:
    """Optimizer steps taken (what ``loop.fit`` counts)."""
    return self.train.step


def init_search_state(key: jax.Array, ticket: Ticket, batch_stats: PyTree,
                      optimizer: optax.GradientTransformation) -> SearchState:
  """The search state of ``ticket`` at step 0 (``key``: its data order and attack draws)."""
  params = {"scores": ticket.scores, "weights": ticket.weights}
  return SearchState(train_lib.create_train_state(key, params, batch_stats, optimizer),
                     ticket.kept)


def _make_step(model_apply_fn: train_lib.ApplyFn, optimizer: optax.GradientTransformation,
               network_params: Callable[[PyTree, Any], PyTree], *, batch_size: int,
               augment: train_lib.Augment | None, attack: TrainingAttack | None):
  """``step(state, data)`` of a state with a ``train`` field, training the network whose plain
  params are ``network_params(state.train.params, state)``.

  Batches, keys and updates are ``train.make_train_step``'s with ``perturb`` = the attack: the
  attack runs on the plain params formed once per step and held fixed, then the training
  forward/backward runs on the adversarial batch.
  """

  def step(state, data: train_lib.Data):
    train = state.train
    x, labels, model_key = train_lib.sample_batch(train, data, batch_size, augment)
    batch_stats = train.batch_stats
    if attack is not None:
      model_key, attack_key = jax.random.split(model_key)
      x, batch_stats = _perturb(attack, model_apply_fn, attack_key,
                                network_params(train.params, state), batch_stats, x, labels)

    def loss_fn(params):
      logits, new_stats = model_apply_fn(network_params(params, state), batch_stats, x, True,
                                         model_key)
      return train_lib.cross_entropy(logits, labels), (logits, new_stats)

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        train.params)
    train = train_lib.apply_gradients(train, grads, optimizer, batch_stats)
    return state._replace(train=train), {"loss": loss,
                                         "accuracy": metrics_lib.accuracy(logits, labels)}

  return step


def make_search_step(model_apply_fn: train_lib.ApplyFn, optimizer: optax.GradientTransformation,
                     prunable: PyTree, *, batch_size: int,
                     augment: train_lib.Augment | None = train_lib.crop_flip,
                     attack: TrainingAttack | None = TrainingAttack()):
  """One score-search step of a ticket: RST (adversarial) or, with ``attack=None``, edge-popup.

  The attack and the training forward form the same masked weights from the same scores (so the
  compiled step sorts each layer's scores once: XLA merges the two sorts); the attack's are
  fixed, the training forward's reach the scores straight-through and stop at the weights.

  Args:
    model_apply_fn: the network on plain params (``train.model_apply_fn``).
    optimizer: usually :func:`score_optimizer`.
    prunable: Python bools of the masked leaves.
    batch_size: examples per step.
    augment: data augmentation, or None.
    attack: the training attack, or None for the natural search.

  Returns:
    ``step(state: SearchState, data) -> (state, {"loss", "accuracy"})`` (on the adversarial
    batch), pure and vmappable.
  """

  def ticket_params(params, state):
    return tickets.masked_params(jax.lax.stop_gradient(params["weights"]), params["scores"],
                                 state.kept, prunable)

  return _make_step(model_apply_fn, optimizer, ticket_params, batch_size=batch_size,
                    augment=augment, attack=attack)


def make_finetune_step(model_apply_fn: train_lib.ApplyFn,
                       optimizer: optax.GradientTransformation, *, batch_size: int,
                       augment: train_lib.Augment | None = train_lib.crop_flip,
                       attack: TrainingAttack | None = TrainingAttack()):
  """One step of training a found subnetwork's weights with its mask fixed.

  The forward uses ``where(mask, w, 0)``: pruned weights get no gradient from the loss (weight
  decay still shrinks them; they stay unused).

  Returns:
    ``step(state: FinetuneState, data) -> (state, {"loss", "accuracy"})``.
  """
  return _make_step(model_apply_fn, optimizer,
                    lambda params, state: tickets.apply_mask(params, state.mask),
                    batch_size=batch_size, augment=augment, attack=attack)


def make_adversarial_train_step(
    apply_fn: train_lib.ApplyFn, optimizer: optax.GradientTransformation, *, batch_size: int,
    augment: train_lib.Augment | None = train_lib.crop_flip,
    attack: TrainingAttack = TrainingAttack()):
  """``train.make_train_step`` on PGD adversarial examples of each batch (a dense network).

  Returns:
    ``step(state: TrainState, data) -> (state, {"loss", "accuracy"})`` on the adversarial batch.
  """
  return train_lib.make_train_step(apply_fn, optimizer, batch_size=batch_size, augment=augment,
                                   perturb=functools.partial(_perturb, attack, apply_fn))


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
  """
  if init == "inherited":
    return ticket.weights
  if init != "reinit":
    raise ValueError(f"unknown fine-tuning init {init!r}; known: {', '.join(FINETUNE_INITS)}")
  return tickets.reinit_weights(key, ticket.weights, prunable, weight_init)


# ----------------------------------------------------------------------------------------------
# Evaluation


def evaluation_attacks(*, eps: float = 8 / 255, step_size: float = 2 / 255,
                       pgd_steps: int = 20, apgd_steps: int = 100,
                       num_classes: int = 10) -> dict[str, attacks.Attack]:
  """The white-box attacks of the evaluation tables, by column name.

  ``pgd`` is RST's evaluation (PGD-20, random start, only still-correct inputs updated); ``cw``
  the same on the CW margin; ``apgd_ce`` and (with >= 3 classes) ``apgd_dlr`` AutoAttack's APGD.
  """
  common = {"eps": eps, "step_size": step_size, "num_steps": pgd_steps, "early_stop": True}
  named = {"pgd": attacks.get_attack("pgd", **common), "cw": attacks.get_attack("cw", **common),
           "apgd_ce": attacks.get_attack("apgd-ce", eps=eps, num_steps=apgd_steps)}
  if num_classes >= 3:
    named["apgd_dlr"] = attacks.get_attack("apgd-dlr", eps=eps, num_steps=apgd_steps)
  return named


def even_batch_size(num_examples: int, batch_size: int) -> int:
  """The smallest batch size that splits ``num_examples`` (>= 1) into as few batches as
  ``batch_size``.

  Evaluations pad the last batch to a full one; this keeps the padding below one example per
  batch (359 examples at 500 per batch: one batch of 359, not 500).
  """
  num_batches = -(-num_examples // max(1, min(batch_size, num_examples)))
  return -(-num_examples // num_batches)


def population_robust_accuracy(model_apply_fn: train_lib.ApplyFn, params: PyTree,
                               batch_stats: PyTree, data: train_lib.Data, key: jax.Array,
                               attack: attacks.Attack, *,
                               batch_size: int = 500) -> dict[str, jax.Array]:
  """``{"clean_accuracy": f32[K], "robust_accuracy": f32[K]}`` (``attacks.robust_accuracy``) of
  K subnetworks ``params`` (e.g. :func:`subnetworks`) and their ``batch_stats``, all attacked
  with the same keys."""

  def one(member_params, member_stats):
    return attacks.robust_accuracy(
        model_apply_fn, member_params, member_stats, data.images, data.labels, key, attack,
        batch_size=even_batch_size(data.labels.shape[0], batch_size))

  return jax.vmap(one)(params, batch_stats)


def _mean_over_split(per_example: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
                     data: train_lib.Data, key: jax.Array, batch_size: int) -> jax.Array:
  """f32[...]: the mean over a split of ``per_example(x f32[B, H, W, C], y i32[B], key) ->
  f32[..., B]``, on batches of :func:`even_batch_size` padded to one shape (run by ``lax.map``)."""
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
  """f32[K, K]: accuracy of ticket j (column) on adversarial examples crafted white-box on
  ticket i (row), so the diagonal is the white-box accuracy.

  Args:
    params: K subnetworks (plain params, leading axis K); batch_stats: theirs.
    key: PRNG key; every source ticket is attacked with the same per-batch keys.
    attack: e.g. ``evaluation_attacks()["pgd"]``.
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
  """f32[]: the expected accuracy of R2S over its switch, on clean or attacked inputs.

  The switch draws each ticket with probability 1/K (per batch or per example alike), so its
  expected accuracy on an input is the fraction of the K tickets that classify it correctly,
  computed exactly instead of sampled.

  Args:
    params: K subnetworks (leading axis K); batch_stats: theirs.
    attack: run against ``attacked_apply_fn`` on ``(params, batch_stats)``; None: clean inputs.
    attacked_apply_fn: the network the attacker differentiates; default the per-batch
      :func:`switch_apply_fn` (with ``eot_samples > 1``: the adaptive EOT attacker).
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
