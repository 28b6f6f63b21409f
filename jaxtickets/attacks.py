"""Adversarial attacks in pixel space: FGSM, PGD (Linf / L2, CE or CW-margin loss), APGD, EOT.

Every attack is a pure function

    attack(apply_fn, params, batch_stats, x, y, key, **options) -> AttackResult

on pixels ``x: f32[B, H, W, C]`` in [0, 1] with labels ``y: i32[B]``, where ``apply_fn`` is the
network as an :data:`jaxtickets.train.ApplyFn` (normalization happens inside it, so epsilon balls
and the [0, 1] box are those of pixel space). Steps run in ``lax.fori_loop`` and restarts in
``lax.scan``; options are static Python values, arrays may be traced, so an attack can be jitted
and vmapped over a population of ``(params, batch_stats)``. Build attacks by name with
:func:`get_attack`; evaluate a whole split with :func:`robust_accuracy`.

Masked networks: the attack calls ``apply_fn`` once per gradient step (``eot_samples`` times with
EOT), so the mask must not be computed inside it from scores (a top-k sort per step). Pass
``params`` with the mask already applied, or an ``apply_fn`` that closes over a mask computed once
per training step; the attack only differentiates with respect to ``x``.

Train mode (RST's training attack): with ``train=True`` every pass runs the network in training
mode (BatchNorm uses batch statistics) and its running statistics are threaded through all passes
in order, as PyTorch updates them on every forward of the reference code; the result carries the
updated ``batch_stats``. With ``train=False`` it carries the input ``batch_stats`` unchanged.

Randomized networks (R2S): ``apply_fn`` draws its randomness from its ``key`` argument. With
``eot_samples=S`` every gradient step averages the gradients of S passes with independent keys
(Expectation over Transformation, see :func:`expected_gradient`), the adaptive attack such models
must be evaluated with (AutoAttack's "rand" version uses APGD-CE and APGD-DLR with 20 samples).

``AttackResult.success`` is one more forward pass on the final ``x_adv`` (in the attack's mode,
its batch-statistics update discarded); under ``jit`` it costs nothing when unused.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxtickets import data as data_lib
from jaxtickets.errors import UserError
from jaxtickets.train import ApplyFn

PyTree = Any
LossFn = Callable[[jax.Array, jax.Array], jax.Array]

NORMS = ("linf", "l2")
LOSSES = ("ce", "cw", "dlr")


class AttackResult(NamedTuple):
  """What every attack returns.

  Attributes:
    x_adv: f32[B, H, W, C] adversarial pixels, in [0, 1] and within the epsilon ball of ``x``.
    success: bool[B] whether the network misclassifies ``x_adv``.
    batch_stats: running statistics after the attack's passes (train mode), else the input ones.
  """
  x_adv: jax.Array
  success: jax.Array
  batch_stats: PyTree


Attack = Callable[..., AttackResult]


# ----------------------------------------------------------------------------------------------
# Losses (per example; the attacker ascends them)


def margin_loss(logits: jax.Array, labels: jax.Array, *, kappa: float = 0.0) -> jax.Array:
  """Carlini-Wagner margin ``min(max_{j != y} z_j - z_y, kappa)`` of ``logits: f32[B, K]``.

  This is minus CW's ``max(z_y - max_{j != y} z_j, -kappa)``: once an example is misclassified
  with confidence ``kappa`` its loss (and gradient) stops growing.

  Returns:
    f32[B].
  """
  true_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
  is_true = jax.nn.one_hot(labels, logits.shape[-1], dtype=bool)
  best_other = jnp.max(jnp.where(is_true, -jnp.inf, logits), axis=-1)
  return jnp.minimum(best_other - true_logit, kappa)


def dlr_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Difference of Logits Ratio (Croce & Hein 2020) of ``logits: f32[B, K]``, K >= 3.

  ``-(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3 + 1e-12)`` with ``z_pi1 >= z_pi2 >= z_pi3`` the
  largest logits; invariant to shifting and scaling the logits.

  Returns:
    f32[B].

  Raises:
    UserError: fewer than 3 classes.
  """
  if logits.shape[-1] < 3:
    raise UserError(f"the DLR loss needs >= 3 classes; the logits have {logits.shape[-1]}")
  top3 = jax.lax.top_k(logits, 3)[0]
  true_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
  # The best other logit is the runner-up exactly when the true class is on top.
  best_other = jnp.where(true_logit >= top3[:, 0], top3[:, 1], top3[:, 0])
  return -(true_logit - best_other) / (top3[:, 0] - top3[:, 2] + 1e-12)


def _check_budget(eps: Any, num_steps: Any, step_size: Any = 1.0) -> None:
  """ValueError for a Python ``eps`` < 0, ``step_size`` <= 0 or ``num_steps`` < 1: the attack
  would run, not move, and report an inflated robust accuracy. Traced values pass."""
  values = (eps, step_size, num_steps)
  if all(isinstance(v, (int, float)) for v in values) and not (
      eps >= 0 and step_size > 0 and num_steps >= 1):
    raise ValueError(f"attack eps={eps!r}, step_size={step_size!r}, num_steps={num_steps!r}; "
                     "expected eps >= 0, step_size > 0, num_steps >= 1")


def _loss_fn(loss: str, kappa: float) -> LossFn:
  if loss == "ce":
    return optax.softmax_cross_entropy_with_integer_labels
  if loss == "cw":
    return functools.partial(margin_loss, kappa=kappa)
  if loss == "dlr":
    return dlr_loss
  raise UserError(f"unknown attack loss {loss!r}; known: {', '.join(LOSSES)}")


# ----------------------------------------------------------------------------------------------
# Geometry of the threat model


def _per_example(mask: jax.Array, like: jax.Array) -> jax.Array:
  """bool/f32[B] -> broadcastable against ``like: [B, ...]``."""
  return mask.reshape(mask.shape + (1,) * (like.ndim - 1))


def _l2_norm(x: jax.Array) -> jax.Array:
  """Per-example L2 norm of ``x: f32[B, ...]`` as f32[B, 1, ..., 1]."""
  return jnp.sqrt(jnp.sum(jnp.square(x), axis=tuple(range(1, x.ndim)), keepdims=True))


def _project(x_adv: jax.Array, x: jax.Array, eps: float, norm: str) -> jax.Array:
  """Nearest point to ``x_adv`` in the eps ball around ``x``, clipped to the [0, 1] box.

  Clipping after the L2 projection keeps the point in the ball: each coordinate only moves
  towards ``x``, which lies in the box.
  """
  if norm == "linf":
    x_adv = jnp.clip(x_adv, x - eps, x + eps)
  else:
    delta = x_adv - x
    x_adv = x + delta * jnp.minimum(1.0, eps / jnp.maximum(_l2_norm(delta), 1e-12))
  return jnp.clip(x_adv, 0.0, 1.0)


def _ascent_direction(grad: jax.Array, norm: str) -> jax.Array:
  """Steepest-ascent unit step of the norm: sign(g) for Linf, g / ||g||_2 for L2."""
  if norm == "linf":
    return jnp.sign(grad)
  return grad / jnp.maximum(_l2_norm(grad), 1e-12)


def _random_start(key: jax.Array, x: jax.Array, eps: float, norm: str) -> jax.Array:
  """A point drawn uniformly from the eps ball around ``x``, clipped to [0, 1]."""
  if norm == "linf":
    noise = jax.random.uniform(key, x.shape, minval=-eps, maxval=eps)
  else:
    direction_key, radius_key = jax.random.split(key)
    direction = jax.random.normal(direction_key, x.shape)
    direction = direction / jnp.maximum(_l2_norm(direction), 1e-12)
    dimension = np.prod(x.shape[1:])
    # Radius ~ eps * U^(1/d) makes the point uniform in the d-dimensional ball's volume.
    radius = eps * jax.random.uniform(radius_key, _l2_norm(x).shape) ** (1.0 / dimension)
    noise = direction * radius
  return jnp.clip(x + noise, 0.0, 1.0)


# ----------------------------------------------------------------------------------------------
# Gradients, EOT and restarts shared by every attack


def expected_gradient(apply_fn: ApplyFn, params: PyTree, batch_stats: PyTree, x: jax.Array,
                      y: jax.Array, key: jax.Array, *, loss_fn: LossFn, train: bool = False,
                      eot_samples: int = 1) -> tuple[jax.Array, jax.Array, jax.Array, PyTree]:
  """Loss and input gradient averaged over ``eot_samples`` passes (EOT).

  Pass ``s`` calls ``apply_fn`` with key ``jax.random.split(key, eot_samples)[s]``; in train mode
  the passes run in order, each starting from the running statistics the previous one returned.

  Args:
    x: f32[B, H, W, C] pixels.
    y: i32[B] labels.
    loss_fn: ``(logits f32[B, K], labels i32[B]) -> f32[B]``, ascended by the attacker.

  Returns:
    (loss f32[B], grad f32[B, H, W, C], logits f32[B, K], batch_stats), loss, gradient and logits
    averaged over the passes; batch_stats updated by them in train mode, else the input ones.
  """

  def one_pass(stats, sample_key):
    def total_loss(x):
      logits, new_stats = apply_fn(params, stats, x, train, sample_key)
      per_example = loss_fn(logits, y)
      return per_example.sum(), (per_example, logits, new_stats)

    (_, (per_example, logits, new_stats)), grad = jax.value_and_grad(
        total_loss, has_aux=True)(x)
    return (new_stats if train else stats), (per_example, grad, logits)

  def accumulate(carry, sample_key):
    stats, sums = carry
    stats, outputs = one_pass(stats, sample_key)
    return (stats, jax.tree.map(jnp.add, sums, outputs)), None

  sample_keys = jax.random.split(key, eot_samples)
  first = one_pass(batch_stats, sample_keys[0])
  (stats, sums), _ = jax.lax.scan(accumulate, first, sample_keys[1:])
  loss, grad, logits = jax.tree.map(lambda total: total / eot_samples, sums)
  return loss, grad, logits, stats


def _with_restarts(run: Callable[[PyTree, jax.Array], tuple[jax.Array, PyTree]],
                   apply_fn: ApplyFn, params: PyTree, batch_stats: PyTree, x: jax.Array,
                   y: jax.Array, key: jax.Array, *, restarts: int, loss_fn: LossFn,
                   train: bool) -> AttackResult:
  """Runs ``run(batch_stats, key) -> (x_adv, batch_stats)`` ``restarts`` times.

  Keeps, per example, the first successful restart, else the one with the highest final loss.
  Restart r uses key ``jax.random.split(key, restarts)[r]``, so with the same key restart 0 is
  the single-restart attack.
  """

  def attempt(stats, restart_key):
    run_key, eval_key = jax.random.split(restart_key)
    x_adv, stats = run(stats, run_key)
    logits, _ = apply_fn(params, stats, x_adv, train, eval_key)
    return stats, (x_adv, jnp.argmax(logits, -1) != y, loss_fn(logits, y))

  def keep_best(carry, restart_key):
    stats, best = carry
    stats, candidate = attempt(stats, restart_key)
    _, best_success, best_loss = best
    _, success, loss = candidate
    take = ~best_success & (success | (loss > best_loss))
    best = jax.tree.map(lambda new, old: jnp.where(_per_example(take, new), new, old),
                        candidate, best)
    return (stats, best), None

  restart_keys = jax.random.split(key, restarts)
  if restarts == 1:
    # Kept out of the scan so that an unused ``success`` pass is dead code under jit.
    stats, (x_adv, success, _) = attempt(batch_stats, restart_keys[0])
  else:
    nothing = (x, jnp.zeros(y.shape, bool), jnp.full(y.shape, -jnp.inf))
    (stats, (x_adv, success, _)), _ = jax.lax.scan(keep_best, (batch_stats, nothing),
                                                    restart_keys)
  # The adversarial batch is a constant of any outer optimization (PyTorch's detach()).
  return AttackResult(jax.lax.stop_gradient(x_adv), success, stats if train else batch_stats)


# ----------------------------------------------------------------------------------------------
# PGD and FGSM


def pgd(apply_fn: ApplyFn, params: PyTree, batch_stats: PyTree, x: jax.Array, y: jax.Array,
        key: jax.Array, *, eps: float, step_size: float, num_steps: int, norm: str = "linf",
        random_start: bool = True, restarts: int = 1, loss: str = "ce", kappa: float = 0.0,
        early_stop: bool = False, eot_samples: int = 1, train: bool = False) -> AttackResult:
  """Projected gradient ascent (Madry et al. 2018) on the loss, in an Linf or L2 ball.

  RST's training attack is ``eps=8/255, step_size=2/255, num_steps=7, train=True``; its
  evaluation is ``num_steps=20, early_stop=True``.

  Args:
    apply_fn: the network (see module docstring).
    params: its parameters (masks already applied, see module docstring).
    batch_stats: its BatchNorm running statistics ({} when it has none).
    x: f32[B, H, W, C] clean pixels in [0, 1].
    y: i32[B] labels.
    key: PRNG key (random start, and the network's randomness).
    eps: radius of the ball, >= 0.
    step_size: length of each step (Linf: per pixel; L2: of the whole step), > 0.
    num_steps: gradient steps, >= 1.
    norm: "linf" or "l2".
    random_start: start from a point uniform in the ball (else from ``x``).
    restarts: independent runs, >= 1; per example the first successful one (else the one of
      highest loss) is kept.
    loss: "ce" (cross-entropy), "cw" (:func:`margin_loss`: CW-margin PGD) or "dlr".
    kappa: confidence of the "cw" loss.
    early_stop: freeze each example once it is misclassified (only still-correct inputs are
      updated, as in RST's evaluation), so an example once fooled stays fooled.
    eot_samples: passes averaged per gradient step, >= 1 (see :func:`expected_gradient`).
    train: run the network in train mode and update its running statistics on every pass.

  Returns:
    The :class:`AttackResult`.

  Raises:
    UserError: unknown norm or loss; DLR with fewer than 3 classes.
  """
  if norm not in NORMS:  # Any other name would silently be taken for L2.
    raise UserError(f"unknown norm {norm!r}; known: {', '.join(NORMS)}")
  _check_budget(eps, num_steps, step_size)
  loss_fn = _loss_fn(loss, kappa)

  def run(batch_stats, key):
    start_key, step_key = jax.random.split(key)
    x_start = _random_start(start_key, x, eps, norm) if random_start else x

    def step(i, carry):
      x_adv, frozen, stats = carry
      _, grad, logits, stats = expected_gradient(
          apply_fn, params, stats, x_adv, y, jax.random.fold_in(step_key, i), loss_fn=loss_fn,
          train=train, eot_samples=eot_samples)
      if early_stop:
        frozen = frozen | (jnp.argmax(logits, -1) != y)
      moved = _project(x_adv + step_size * _ascent_direction(grad, norm), x, eps, norm)
      return jnp.where(_per_example(frozen, x_adv), x_adv, moved), frozen, stats

    x_adv, _, stats = jax.lax.fori_loop(
        0, num_steps, step, (x_start, jnp.zeros(y.shape, bool), batch_stats))
    return x_adv, stats

  return _with_restarts(run, apply_fn, params, batch_stats, x, y, key, restarts=restarts,
                        loss_fn=loss_fn, train=train)


def fgsm(apply_fn: ApplyFn, params: PyTree, batch_stats: PyTree, x: jax.Array, y: jax.Array,
         key: jax.Array, *, eps: float, norm: str = "linf", loss: str = "ce", kappa: float = 0.0,
         eot_samples: int = 1, train: bool = False) -> AttackResult:
  """Fast Gradient Sign Method (Goodfellow et al. 2015): one full-eps step from ``x``.

  Arguments as in :func:`pgd`.
  """
  return pgd(apply_fn, params, batch_stats, x, y, key, eps=eps, step_size=eps, num_steps=1,
             norm=norm, random_start=False, loss=loss, kappa=kappa, eot_samples=eot_samples,
             train=train)


# ----------------------------------------------------------------------------------------------
# APGD (Croce & Hein 2020, the AutoAttack components)


def apgd_checkpoints(num_steps: int) -> tuple[int, ...]:
  """Iteration counts after which APGD decides whether to halve its step size.

  ``w_j = p_j * num_steps`` with ``p_0 = 0``, ``p_1 = 0.22`` and
  ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``, in the integer form of the reference code
  (the first interval ``int(0.22 N)``, shrinking by ``int(0.03 N)`` down to ``int(0.06 N)``, each
  at least 1). For N = 100: 22, 41, 57, 70, 80, 87, 93, 99.
  """
  interval = max(int(0.22 * num_steps), 1)
  shrink = max(int(0.03 * num_steps), 1)
  min_interval = max(int(0.06 * num_steps), 1)
  checkpoints, position = [], interval
  while position <= num_steps:
    checkpoints.append(position)
    interval = max(interval - shrink, min_interval)
    position += interval
  return tuple(checkpoints)


class ApgdStepSize(NamedTuple):
  """APGD's per-example step-size controller.

  Attributes:
    step_size: f32[B] current step size (Linf, per pixel).
    loss_prev: f32[B] loss at the previous iterate.
    loss_best: f32[B] highest loss so far.
    increases: i32[B] steps since the last checkpoint whose loss beat the previous iterate's.
    loss_best_at_checkpoint: f32[B] ``loss_best`` at the last checkpoint.
    halved_at_checkpoint: bool[B] whether the step size was halved at the last checkpoint.
  """
  step_size: jax.Array
  loss_prev: jax.Array
  loss_best: jax.Array
  increases: jax.Array
  loss_best_at_checkpoint: jax.Array
  halved_at_checkpoint: jax.Array

  @classmethod
  def create(cls, eps: float, loss: jax.Array) -> ApgdStepSize:
    """Step size 2 * eps at the start point of loss ``loss: f32[B]``.

    No halving at the previous checkpoint is recorded as True, so condition 2 cannot fire at the
    first checkpoint (as in the reference code).
    """
    return cls(jnp.full(loss.shape, 2.0 * eps, jnp.float32), loss, loss,
               jnp.zeros(loss.shape, jnp.int32), loss, jnp.ones(loss.shape, bool))


def apgd_step_size_update(state: ApgdStepSize, loss: jax.Array, is_checkpoint: jax.Array,
                          interval: jax.Array, *,
                          rho: float = 0.75) -> tuple[ApgdStepSize, jax.Array]:
  """Records the loss of a new iterate; at a checkpoint halves the step size where needed.

  At a checkpoint closing an interval of ``interval`` steps the step size is halved where
  condition 1 (at most ``rho * interval`` of the steps increased the loss; the reference code
  uses <=, the paper <) or condition 2 (no halving at the previous checkpoint and no new best loss
  since then) holds. The caller then restarts those examples from their best point. The first
  comparison is against the start point's loss (the reference code compares it with 0, an
  indexing quirk).

  Args:
    state: the controller before this iterate.
    loss: f32[B] loss of the new iterate.
    is_checkpoint: bool[] whether this iterate closes an interval.
    interval: i32[] steps in that interval.
    rho: threshold of condition 1.

  Returns:
    (state, halved bool[B]).
  """
  increases = state.increases + (loss > state.loss_prev)
  loss_best = jnp.maximum(state.loss_best, loss)
  oscillating = increases <= rho * interval
  stalled = ~state.halved_at_checkpoint & (loss_best <= state.loss_best_at_checkpoint)
  halved = is_checkpoint & (oscillating | stalled)
  state = ApgdStepSize(
      step_size=jnp.where(halved, state.step_size / 2, state.step_size),
      loss_prev=loss,
      loss_best=loss_best,
      increases=jnp.where(is_checkpoint, 0, increases),
      loss_best_at_checkpoint=jnp.where(is_checkpoint, loss_best, state.loss_best_at_checkpoint),
      halved_at_checkpoint=jnp.where(is_checkpoint, halved, state.halved_at_checkpoint))
  return state, halved


def _checkpoint_table(num_steps: int) -> tuple[jax.Array, jax.Array]:
  """(bool[N] whether step i closes an interval, i32[N] that interval's length)."""
  is_checkpoint = np.zeros(num_steps, bool)
  interval = np.zeros(num_steps, np.int32)
  previous = 0
  for checkpoint in apgd_checkpoints(num_steps):
    is_checkpoint[checkpoint - 1] = True
    interval[checkpoint - 1] = checkpoint - previous
    previous = checkpoint
  return jnp.asarray(is_checkpoint), jnp.asarray(interval)


class _ApgdCarry(NamedTuple):
  x_adv: jax.Array
  x_prev: jax.Array
  grad: jax.Array
  x_best: jax.Array
  grad_best: jax.Array
  x_fooled: jax.Array
  ever_fooled: jax.Array
  schedule: ApgdStepSize
  batch_stats: PyTree


def apgd(apply_fn: ApplyFn, params: PyTree, batch_stats: PyTree, x: jax.Array, y: jax.Array,
         key: jax.Array, *, eps: float, num_steps: int = 100, loss: str = "ce",
         kappa: float = 0.0, restarts: int = 1, rho: float = 0.75, momentum: float = 0.75,
         eot_samples: int = 1, train: bool = False) -> AttackResult:
  """Auto-PGD (Croce & Hein 2020), Linf: APGD-CE with ``loss="ce"``, APGD-DLR with "dlr".

  Starts at ``x + eps * t / max|t|``, ``t ~ U(-1, 1)`` (as AutoAttack), with step size 2 * eps.
  Each step ``z = P(x_k + eta * sign(g))``, ``x_{k+1} = P(x_k + momentum * (z - x_k) +
  (1 - momentum) * (x_k - x_{k-1}))`` (no momentum in the first step). At the checkpoints of
  :func:`apgd_checkpoints` the step size halves per :func:`apgd_step_size_update`, and halved
  examples restart from their best point. Returns, per example, the last misclassified iterate,
  else the highest-loss one. Uses ``num_steps + 1`` gradient evaluations per restart.

  Args:
    num_steps: iterations, >= 1 (AutoAttack: 100).
    loss: "ce", "dlr" (needs >= 3 classes) or "cw".
    rho: threshold of the step-size condition 1.
    momentum: weight of the new step against the previous displacement (alpha in the paper).
    Others as in :func:`pgd`.

  Returns:
    The :class:`AttackResult`.

  Raises:
    UserError: unknown loss; DLR with fewer than 3 classes.
  """
  _check_budget(eps, num_steps)
  loss_fn = _loss_fn(loss, kappa)
  is_checkpoint, interval = _checkpoint_table(num_steps)

  def run(batch_stats, key):
    start_key, step_key = jax.random.split(key)
    noise = jax.random.uniform(start_key, x.shape, minval=-1.0, maxval=1.0)
    max_abs = jnp.max(jnp.abs(noise), axis=tuple(range(1, x.ndim)), keepdims=True)
    x_start = jnp.clip(x + eps * noise / (max_abs + 1e-12), 0.0, 1.0)
    gradient = functools.partial(expected_gradient, apply_fn, params, loss_fn=loss_fn,
                                 train=train, eot_samples=eot_samples)
    loss0, grad0, logits0, stats = gradient(batch_stats, x_start, y,
                                            jax.random.fold_in(step_key, 0))

    def step(i, c: _ApgdCarry) -> _ApgdCarry:
      weight = jnp.where(i == 0, 1.0, momentum)
      step_size = _per_example(c.schedule.step_size, x)
      z = _project(c.x_adv + step_size * jnp.sign(c.grad), x, eps, "linf")
      x_new = _project(c.x_adv + weight * (z - c.x_adv) + (1 - weight) * (c.x_adv - c.x_prev),
                       x, eps, "linf")
      loss_new, grad, logits, stats = gradient(c.batch_stats, x_new, y,
                                               jax.random.fold_in(step_key, i + 1))
      fooled = jnp.argmax(logits, -1) != y
      improved = _per_example(loss_new > c.schedule.loss_best, x)
      x_best = jnp.where(improved, x_new, c.x_best)
      grad_best = jnp.where(improved, grad, c.grad_best)
      schedule, halved = apgd_step_size_update(c.schedule, loss_new, is_checkpoint[i],
                                               interval[i], rho=rho)
      halved = _per_example(halved, x)
      return _ApgdCarry(
          x_adv=jnp.where(halved, x_best, x_new), x_prev=c.x_adv,
          grad=jnp.where(halved, grad_best, grad), x_best=x_best, grad_best=grad_best,
          x_fooled=jnp.where(_per_example(fooled, x), x_new, c.x_fooled),
          ever_fooled=c.ever_fooled | fooled, schedule=schedule, batch_stats=stats)

    start = _ApgdCarry(x_start, x_start, grad0, x_start, grad0, x_start,
                       jnp.argmax(logits0, -1) != y, ApgdStepSize.create(eps, loss0), stats)
    c = jax.lax.fori_loop(0, num_steps, step, start)
    return jnp.where(_per_example(c.ever_fooled, x), c.x_fooled, c.x_best), c.batch_stats

  return _with_restarts(run, apply_fn, params, batch_stats, x, y, key, restarts=restarts,
                        loss_fn=loss_fn, train=train)


# ----------------------------------------------------------------------------------------------
# Registry and evaluation


_ATTACKS: dict[str, tuple[Attack, dict[str, str]]] = {
    "fgsm": (fgsm, {}),
    "pgd": (pgd, {"loss": "ce"}),
    "cw": (pgd, {"loss": "cw"}),
    "apgd-ce": (apgd, {"loss": "ce"}),
    "apgd-dlr": (apgd, {"loss": "dlr"}),
}


def get_attack(name: str, **options: Any) -> Attack:
  """The attack ``name`` with its keyword options bound.

  Names: "fgsm", "pgd" (CE loss), "cw" (PGD on the CW margin), "apgd-ce", "apgd-dlr".

  Args:
    name: one of the names above.
    **options: keyword options of the attack's function (:func:`fgsm`, :func:`pgd` or
      :func:`apgd`) other than the ``loss`` its name fixes.

  Returns:
    ``attack(apply_fn, params, batch_stats, x, y, key) -> AttackResult``.

  Raises:
    UserError: unknown name.
  """
  if name not in _ATTACKS:
    raise UserError(f"unknown attack {name!r}; known: {', '.join(_ATTACKS)}")
  attack, fixed = _ATTACKS[name]
  return functools.partial(attack, **fixed, **options)


def robust_accuracy(apply_fn: ApplyFn, params: PyTree, batch_stats: PyTree,
                    images_u8: jax.Array, labels: jax.Array, key: jax.Array, attack: Attack,
                    batch_size: int = 500) -> dict[str, jax.Array]:
  """Clean and robust accuracy of a whole split, in fixed-size padded batches.

  An example counts as robust when the network, in the attack's mode, classifies its adversarial
  version correctly (RST's evaluation: ``model(X + pgd_delta)`` against ``y``); pass an
  eval-mode attack, as a train-mode one would judge with the padded batch's statistics. Batches
  run through ``lax.map``, so any split size compiles once; to reuse that compilation across
  calls, jit a function that closes over ``apply_fn`` and ``attack``.

  Args:
    apply_fn: the network.
    images_u8: u8[N, H, W, C].
    labels: i32[N].
    key: PRNG key; batch b is attacked with ``jax.random.split(key, num_batches)[b]``, and its
      clean pass gets that key folded with 1.
    attack: ``attack(apply_fn, params, batch_stats, x, y, key) -> AttackResult``, e.g. from
      :func:`get_attack`.
    batch_size: examples per batch (at most N).

  Returns:
    {"clean_accuracy": f32[], "robust_accuracy": f32[]}.
  """
  num_examples = images_u8.shape[0]

  def count_batch(images, y, valid, batch_key):
    x = data_lib.to_unit(images)
    logits, _ = apply_fn(params, batch_stats, x, False, jax.random.fold_in(batch_key, 1))
    correct = (jnp.argmax(logits, -1) == y) & valid
    fooled = attack(apply_fn, params, batch_stats, x, y, batch_key).success
    return jnp.sum(correct), jnp.sum(valid & ~fooled)

  correct, robust = data_lib.map_batches(count_batch, images_u8, labels,
                                         min(batch_size, num_examples), key)
  return {"clean_accuracy": jnp.sum(correct) / num_examples,
          "robust_accuracy": jnp.sum(robust) / num_examples}
