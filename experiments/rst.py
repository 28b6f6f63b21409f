"""Robust Scratch Tickets + Random RST Switch: config -> stages -> ``results.json``.

``python -m experiments.rst --config experiments/configs/rst.py:digits --workdir runs/rst`` runs
these stages, each resumable in its own subdirectory of the workdir: ``rst/``, the K tickets of
``config.keep_ratios`` (one random net) searched adversarially as one population; ``natural/``,
the same searched without an attack; ``dense/``, the dense net adversarially trained;
``finetune/``, the selected RSTs' weights adversarially fine-tuned with their masks fixed.

Each stage keeps its last state and, per member, the one of best validation PGD accuracy
(``best/``); both are evaluated on the test split, the selected RSTs also by R2S's four
evaluations. ``experiments/reports/rst.py`` writes the report.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments import build, cli
from experiments.configs import rst as configs
from jaxtickets import attacks, checkpoint, files, population, rst, tickets
from jaxtickets import data as data_lib
from jaxtickets import train as train_lib
from jaxtickets.metrics import jsonable

PyTree = Any
# What each stream of randomness derived from the seed is for (see :func:`seed_key`).
_KEY_PURPOSES = ("model_init", "tickets", "search", "dense", "finetune", "evaluation")


def seed_key(config: ml_collections.ConfigDict, purpose: str) -> jax.Array:
  return build.seed_key(config.seed, _KEY_PURPOSES, purpose)


class Evaluator:
  """Compiled ``rst.population_robust_accuracy`` of one model's subnetworks, per attack."""

  def __init__(self, model_apply_fn: train_lib.ApplyFn, config: ml_collections.ConfigDict,
               num_classes: int):
    evaluation = config.eval
    available = rst.evaluation_attacks(
        eps=evaluation.eps, step_size=evaluation.step_size, pgd_steps=evaluation.pgd_steps,
        apgd_steps=evaluation.apgd_steps, num_classes=num_classes)
    self.attacks = {name: available[name] for name in evaluation.attacks if name in available}
    self.robust = {name: jax.jit(functools.partial(
        rst.population_robust_accuracy, model_apply_fn, attack=attack,
        batch_size=evaluation.batch_size)) for name, attack in self.attacks.items()}

  def tickets(self, params: PyTree, batch_stats: PyTree, data: train_lib.Data,
              key: jax.Array) -> dict[str, list[float]]:
    """Per member: clean accuracy and accuracy under every white-box attack."""
    results = {}
    for name, robust in self.robust.items():
      metrics = robust(params, batch_stats, data, key)
      results.setdefault("clean", metrics["clean_accuracy"])
      results[name] = metrics["robust_accuracy"]
    return jsonable(results)


def _selection(states: train_lib.TrainState, score: jax.Array) -> dict[str, Any]:
  return {"params": states.params, "batch_stats": states.batch_stats, "score": score,
          "step": states.step}


class BestStates:
  """Per population member, the params and statistics of its best validation evaluation,
  checkpointed in ``directory`` whenever a member improves (a resumed run keeps the selection).
  """

  def __init__(self, directory: pathlib.Path, states: train_lib.TrainState):
    self._checkpointer = checkpoint.Checkpointer(directory, max_to_keep=1)
    self.best = _selection(states, jnp.full((population.size(states.step),), -jnp.inf))
    if self._checkpointer.latest_step() is not None:
      self.best = self._checkpointer.restore(self.best)

  def update(self, states: train_lib.TrainState, score: jax.Array) -> None:
    improved = np.asarray(score > self.best["score"])
    if not improved.any():
      return
    self.best = jax.tree.map(
        lambda new, old: jnp.where(improved.reshape((-1,) + (1,) * (new.ndim - 1)), new, old),
        _selection(states, score), self.best)
    step = int(np.asarray(states.step)[0])
    # A resumed run re-evaluates the step the selection was last saved at, identically.
    if self._checkpointer.latest_step() != step:
      self._checkpointer.save(step, self.best)

  def close(self) -> None:
    self._checkpointer.close()


@dataclasses.dataclass
class StageResult:
  """What one stage produced (populations with leading axis K)."""
  last: Any  # The final states: rst.SearchState, rst.FinetuneState or (dense) TrainState.
  best: dict[str, Any]  # {"params", "batch_stats", "score", "step"} of each member's best.
  records: list[dict[str, Any]]  # The per-evaluation log.
  subnetworks: Callable[[PyTree], PyTree]  # TrainState.params -> plain subnetwork params.
  tables: dict[str, dict[str, Any]]  # Test accuracies of the "last" and "best" states.


@dataclasses.dataclass
class Context:
  """Everything the stages share: the data, and the RST network (``params`` at init)."""
  config: ml_collections.ConfigDict
  workdir: pathlib.Path
  dataset: data_lib.Dataset
  train: train_lib.Data
  val: train_lib.Data
  test: train_lib.Data
  steps_per_epoch: int
  eval_key: jax.Array
  progress: bool
  apply_fn: train_lib.ApplyFn
  params: PyTree
  batch_stats: PyTree
  prunable: PyTree
  kept: PyTree  # i32[K] per leaf: the kept counts of the K tickets.
  evaluator: Evaluator


def train_state(states: Any) -> train_lib.TrainState:
  return getattr(states, "train", states)  # The dense stage's states are TrainStates.


def run_stage(context: Context, name: str, step: Callable, states: Any, evaluator: Evaluator,
              subnetworks: Callable[[PyTree], PyTree], epochs: int,
              params: PyTree) -> StageResult:
  """Trains ``states`` for ``epochs``, selecting by validation PGD every ``eval.every_epochs``,
  then tests the last and best states (``params``: one member's, for the population strategy)."""
  directory = context.workdir / name
  best = BestStates(directory / "best", train_state(states))
  subnetworks_of = jax.jit(subnetworks)

  def evaluate(states):
    train = train_state(states)
    metrics = evaluator.robust["pgd"](subnetworks_of(train.params), train.batch_stats,
                                      context.val, context.eval_key)
    best.update(train, metrics["robust_accuracy"])
    return {"val_accuracy": metrics["clean_accuracy"],
            "val_pgd_accuracy": metrics["robust_accuracy"]}

  states, records = build.fit_population(
      context.config, step, states, context.train, num_steps=epochs * context.steps_per_epoch,
      eval_every=context.config.eval.every_epochs * context.steps_per_epoch, workdir=directory,
      evaluate=evaluate, progress=context.progress, description=name, params=params)
  best.close()
  last, best = train_state(states), best.best
  tables = {"last": evaluator.tickets(subnetworks_of(last.params), last.batch_stats,
                                      context.test, context.eval_key)}
  steps = np.asarray(best["step"])
  if np.array_equal(steps, np.asarray(last.step)):  # Every member was best at the end.
    tables["best"] = dict(tables["last"])
  else:
    tables["best"] = evaluator.tickets(subnetworks_of(best["params"]), best["batch_stats"],
                                       context.test, context.eval_key)
  tables["best"].update(epoch=(steps // context.steps_per_epoch).tolist(),
                        val_pgd_accuracy=np.asarray(best["score"]).tolist())
  return StageResult(states, best, records, subnetworks, tables)


def network(config: ml_collections.ConfigDict, dataset: data_lib.Dataset, key: jax.Array,
            **options: Any) -> tuple[train_lib.ApplyFn, PyTree, PyTree]:
  """``(model_apply_fn, params, batch_stats)`` of ``config.model`` with ``options``, at init."""
  model = build.model(config, dataset.num_classes, **options)
  params, batch_stats = train_lib.init_variables(key, model, dataset.image_shape)
  return train_lib.model_apply_fn(model, dataset.mean, dataset.std), params, batch_stats


def initial_tickets(config: ml_collections.ConfigDict, params: PyTree,
                    prunable: PyTree) -> rst.Ticket:
  """The K tickets of ``config.keep_ratios`` before search (a population): one weight key (one
  random dense net) and one score init, as K reference runs of one seed and K ratios have."""
  weight_key, score_key = jax.random.split(seed_key(config, "tickets"))

  def draw(kept, params):
    return rst.init_ticket(weight_key, score_key, params, kept, prunable,
                           weight_init=config.weight_init)

  kept = tickets.kept_counts(params, config.keep_ratios, prunable)
  return jax.jit(jax.vmap(draw, in_axes=(0, None)))(kept, params)


def search_stage(context: Context, name: str, attack: rst.TrainingAttack | None) -> StageResult:
  """K tickets (one per keep ratio, see :func:`initial_tickets`) searched as one population."""
  config, prunable = context.config, context.prunable
  state_key = seed_key(config, "search")
  optimizer = rst.score_optimizer(build.schedule(config, context.steps_per_epoch),
                                  momentum=config.momentum, weight_decay=config.weight_decay)
  states = jax.jit(jax.vmap(functools.partial(rst.init_search_state, state_key,
                                              optimizer=optimizer), in_axes=(0, None)))(
      initial_tickets(config, context.params, prunable), context.batch_stats)
  step = rst.make_search_step(context.apply_fn, optimizer, prunable,
                              batch_size=config.batch_size, augment=build.augment(config),
                              attack=attack)

  def subnetworks(search_params):
    return rst.subnetworks(rst.ticket_of(search_params, context.kept), prunable)

  return run_stage(context, name, step, states, context.evaluator, subnetworks, config.epochs,
                   context.params)


def dense_stage(context: Context, attack: rst.TrainingAttack) -> StageResult:
  """The dense network of the same architecture, PGD adversarially trained (one member)."""
  config = context.config
  init_key, state_key = jax.random.split(seed_key(config, "dense"))
  model_apply_fn, params, batch_stats = network(
      config, context.dataset, init_key, **config.dense_baseline.model_options.to_dict())
  optimizer = build.optimizer(config, context.steps_per_epoch)
  states = population.stack([train_lib.create_train_state(state_key, params, batch_stats,
                                                          optimizer)])
  step = rst.make_adversarial_train_step(model_apply_fn, optimizer,
                                         batch_size=config.batch_size,
                                         augment=build.augment(config), attack=attack)
  evaluator = Evaluator(model_apply_fn, config, context.dataset.num_classes)
  return run_stage(context, "dense", step, states, evaluator, lambda p: p, config.epochs, params)


def finetune_stage(context: Context, attack: rst.TrainingAttack,
                   selected: StageResult) -> StageResult:
  """The selected tickets' weights trained adversarially with their masks fixed, from the
  search's running statistics (the reference's ``main.py`` loads them with the scores, and for
  "reinit" redraws the conv weights only)."""
  config, prunable = context.config, context.prunable
  settings = config.finetune
  selected_tickets = rst.ticket_of(selected.best["params"], context.kept)
  masks = jax.jit(jax.vmap(functools.partial(rst.ticket_mask, prunable=prunable)))(
      selected_tickets)
  init_key, state_key = jax.random.split(seed_key(config, "finetune"))
  optimizer = build.optimizer(settings, context.steps_per_epoch)

  def init_member(ticket, mask, batch_stats):
    weights = rst.finetune_weights(ticket, prunable, init=settings.init, key=init_key,
                                   weight_init=settings.weight_init)
    return rst.FinetuneState(
        train_lib.create_train_state(state_key, weights, batch_stats, optimizer), mask)

  states = jax.jit(jax.vmap(init_member))(selected_tickets, masks, selected.best["batch_stats"])
  step = rst.make_finetune_step(context.apply_fn, optimizer, batch_size=config.batch_size,
                                augment=build.augment(config), attack=attack)
  subnetworks = jax.vmap(tickets.apply_mask)
  return run_stage(context, "finetune", step, states, context.evaluator,
                   lambda weights: subnetworks(weights, masks), settings.epochs, context.params)


def evaluate_r2s(context: Context, selected: StageResult) -> dict[str, Any]:
  """R2S's evaluations (a)-(d) of the K selected tickets on the test split."""
  evaluation = context.config.eval
  args = (jax.jit(selected.subnetworks)(selected.best["params"]), selected.best["batch_stats"],
          context.test, context.eval_key)

  def run(evaluate, **options):
    return jax.jit(functools.partial(evaluate, context.apply_fn,
                                     batch_size=evaluation.batch_size, **options))(*args)

  eot_attack = attacks.get_attack("pgd", eps=evaluation.eps, step_size=evaluation.step_size,
                                  num_steps=evaluation.pgd_steps,
                                  eot_samples=evaluation.eot_samples)
  matrix = run(rst.transfer_matrix, attack=context.evaluator.attacks["pgd"])
  clean = run(rst.switch_accuracy)
  eot = run(rst.switch_accuracy, attack=eot_attack, attacked_apply_fn=rst.switch_apply_fn(
      context.apply_fn, per_example=evaluation.per_example_switch))
  summary = rst.r2s_summary(np.asarray(matrix))
  return jsonable({
      "clean": clean,
      "white_box": np.diag(np.asarray(matrix)),
      "transfer_matrix": matrix,
      "white_box_mean": summary["white_box"],
      "transfer_mean": summary["transfer"],
      "random_ticket_attacker": summary["random_source"],
      "eot_attacker": eot,
      "eot_samples": evaluation.eot_samples,
      "switch": "per example" if evaluation.per_example_switch else "per batch",
  })


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
                       progress: bool = True) -> dict[str, Any]:
  """Runs every stage of ``config`` (see module docstring); resumes from ``workdir``.

  Returns:
    What it wrote to ``workdir/results.json``, plus ``"stages"``: each stage's StageResult.
  """
  configs.check_config(config)
  attack = rst.TrainingAttack(**config.attack.to_dict())
  dataset = data_lib.with_validation(build.dataset(config), config.val_fraction,
                                     seed=config.seed)
  workdir = checkpoint.claim_workdir(workdir, config.to_dict())
  model_apply_fn, params, batch_stats = network(config, dataset, seed_key(config, "model_init"),
                                                **rst.MODEL_OPTIONS)
  prunable = tickets.prunable(params)
  context = Context(
      config=config, workdir=workdir, dataset=dataset,
      train=train_lib.device_data(dataset.train), val=train_lib.device_data(dataset.val),
      test=train_lib.device_data(dataset.test),
      steps_per_epoch=data_lib.steps_per_epoch(len(dataset.train.labels), config.batch_size),
      eval_key=seed_key(config, "evaluation"), progress=progress, apply_fn=model_apply_fn,
      params=params, batch_stats=batch_stats, prunable=prunable,
      kept=tickets.kept_counts(params, config.keep_ratios, prunable),
      evaluator=Evaluator(model_apply_fn, config, dataset.num_classes))

  stages = {"rst": search_stage(context, "rst", attack)}
  if config.natural_baseline:
    stages["natural"] = search_stage(context, "natural", None)
  if config.dense_baseline.enabled:
    stages["dense"] = dense_stage(context, attack)
  if config.finetune.epochs > 0:
    stages["finetune"] = finetune_stage(context, attack, stages["rst"])

  results = {
      "study": "rst",
      "dataset": dataset.name, "model": config.model, "keep_ratios": list(config.keep_ratios),
      "num_params": int(sum(leaf.size for leaf in jax.tree.leaves(params))),
      "steps_per_epoch": context.steps_per_epoch, "epochs": config.epochs,
      "attack": {"train": dataclasses.asdict(attack), "eval": config.eval.to_dict()},
      "split_sizes": {split: int(len(getattr(dataset, split).labels))
                      for split in ("train", "val", "test")},
      "tickets": {name: stage.tables for name, stage in stages.items()},
      "r2s": evaluate_r2s(context, stages["rst"]),
  }
  files.write_json(workdir / "results.json", results)
  return {**results, "stages": stages}


def main(argv: Sequence[str] | None = None) -> None:
  cli.main("rst", train_and_evaluate, argv)


if __name__ == "__main__":
  main()
