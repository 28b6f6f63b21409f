"""A Winning Sign: LRR and AWS pruning, transfer to fresh inits, linear mode connectivity.

``python -m experiments.aws --config experiments/configs/aws.py:digits --workdir runs/aws``
runs three stages, each resumable in its subdirectory of the workdir, and writes
``results.json`` (``"study": "aws"``; ``experiments/reports/aws.py`` renders it):

1. ``pruning/round_RR/``: ``config.methods`` (LRR, AWS) from one init as one population: a dense
   warm-up (round 00), then ``pruning.rounds`` rounds that each remove ``pruning.fraction`` of
   the survivors and train; round r's trained network (density ~(1 - fraction)^r) is a ticket.
2. ``transfer/group_GG/``: the tickets of ``transfer.densities`` moved to fresh inits (one per
   seed) by sign, by mask or retrained, plus the fresh dense network, in populations.
3. ``lmc/``: error curves: each round's network vs itself with initialized norms; sign transfer
   vs retrained and two seeds' sign transfers (:func:`transfer_pairs`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments import build, cli
from experiments.configs import aws as configs
from jaxtickets import aws, checkpoint, files, lmc, population, tickets
from jaxtickets import data as data_lib
from jaxtickets import train as train_lib
from jaxtickets.errors import UserError
from jaxtickets.metrics import jsonable

PyTree = Any
# What each stream of randomness derived from the seed is for (``build.seed_key``).
_KEY_PURPOSES = ("model_init", "pruning", "transfer_init", "transfer", "lmc")


def seed_key(config: ml_collections.ConfigDict, purpose: str, *indices: int) -> jax.Array:
  return build.seed_key(config.seed, _KEY_PURPOSES, purpose, *indices)


@dataclasses.dataclass
class Context:
  """Everything the stages share."""
  config: ml_collections.ConfigDict
  workdir: pathlib.Path
  dataset: data_lib.Dataset
  train: train_lib.Data
  test: train_lib.Data
  steps_per_epoch: int
  model_apply_fn: train_lib.ApplyFn
  params: PyTree  # The model's initialization (the pruning runs start here).
  batch_stats: PyTree
  fresh: dict[int, tuple[PyTree, PyTree]]  # Per transfer seed, its (params, batch_stats).
  prunable: PyTree
  run_options: dict[str, Any]
  accuracy: Callable[..., jax.Array]  # ((params, batch_stats) of N members, test) -> f32[N]
  progress: bool


def make_context(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
                 progress: bool) -> Context:
  """Loads the data, builds and initializes the model (UserError for what the stages cannot
  use), then claims ``workdir``."""
  dataset = build.dataset(config)
  for split, share in (("train", config.train_subset), ("test", config.test_subset)):
    if share is not None:
      subset = data_lib.subsample(getattr(dataset, split), share, seed=config.seed)
      dataset = dataclasses.replace(dataset, **{split: subset})
  num_train = len(dataset.train.labels)
  if (config.lmc.init_norm or config.lmc.transfer_pairs) and config.lmc.batch_size > num_train:
    raise UserError(f"lmc.batch_size={config.lmc.batch_size} exceeds the {num_train} training "
                    "images its BatchNorm recalibration passes over")
  model = build.model(config, dataset.num_classes)
  seeds = tuple(config.transfer.seeds)
  keys = [seed_key(config, "model_init")] + [seed_key(config, "transfer_init", s) for s in seeds]
  # One compiled initialization for the pruning runs' network and every fresh one.
  variables = population.init(
      lambda key: train_lib.init_variables(key, model, dataset.image_shape), jnp.stack(keys))
  (params, batch_stats), *fresh = population.unstack(variables)
  if "aws" in config.methods and not any(jax.tree.leaves(aws.norm_leaves(params))):
    raise UserError(f"AWS interpolates norm params, and model {config.model!r} with "
                    f"norm={config.model_options.get('norm')!r} has none")
  model_apply_fn = train_lib.model_apply_fn(model, dataset.mean, dataset.std)
  run_options = build.population_options(config, params)

  def member_accuracy(variables, test):
    params, batch_stats = variables
    return train_lib.evaluate(model_apply_fn, params, batch_stats, test)["accuracy"]

  accuracy = jax.jit(population.run(member_accuracy, **run_options))
  # Claimed only now: a config the data or the model refuses leaves no workdir behind.
  workdir = checkpoint.claim_workdir(workdir, config.to_dict())
  return Context(
      config=config, workdir=workdir, dataset=dataset,
      train=train_lib.device_data(dataset.train), test=train_lib.device_data(dataset.test),
      steps_per_epoch=data_lib.steps_per_epoch(num_train, config.batch_size),
      model_apply_fn=model_apply_fn, params=params, batch_stats=batch_stats,
      fresh=dict(zip(seeds, fresh)), prunable=aws.prunable_leaves(params),
      run_options=run_options, accuracy=accuracy, progress=progress)


def fit(context: Context, name: str, states: aws.SparseState, optimizer: Any,
        epochs: int) -> tuple[aws.SparseState, list[dict[str, Any]]]:
  """Trains a population of sparse states for ``epochs`` in ``workdir / name`` (resumable)."""
  config = context.config
  step = aws.make_sparse_step(context.model_apply_fn, optimizer, batch_size=config.batch_size,
                              augment=build.augment(config))

  def evaluate(states):
    variables = (states.train.params, states.train.batch_stats)
    return {"test_accuracy": context.accuracy(variables, context.test)}

  return build.fit_population(
      config, step, states, context.train, num_steps=epochs * context.steps_per_epoch,
      eval_every=min(config.eval_every_epochs, epochs) * context.steps_per_epoch,
      evaluate=evaluate, workdir=context.workdir / name, progress=context.progress,
      description=name, params=context.params)


def densities_of(masks: PyTree, prunable: PyTree) -> list[float]:
  """Overall density of each member's mask (a population of masks)."""
  return [tickets.sparsity_report(mask, prunable)["density"]
          for mask in population.unstack(masks)]


def pruning_stage(context: Context) -> tuple[list[aws.SparseState], list[list[dict[str, Any]]]]:
  """``config.methods`` pruned as one population from one init: per round r = 0..R, the states
  after its training (round 0: the dense warm-up; r >= 1: the ticket of density
  ~(1 - fraction)^r, the reference's ``checkpoint_iter{r}``) and its training log."""
  config, pruning = context.config, context.config.pruning
  optimizer = train_lib.sgd(pruning.learning_rate, momentum=config.momentum,
                            weight_decay=config.weight_decay)
  is_aws = jnp.asarray([method == "aws" for method in config.methods])
  initial = jax.jit(jax.vmap(lambda aws_flag: aws.init_sparse_state(
      seed_key(config, "pruning", 0), context.params, context.batch_stats,
      aws.dense_mask(context.params), aws_flag, optimizer)))(is_aws)
  survivors = aws.survivor_counts(aws.num_prunable(context.params, context.prunable),
                                  pruning.rounds, pruning.fraction)

  @jax.jit
  def start_round(states, key, kept):
    def start(state, start_of_run):
      rewind = start_of_run if pruning.rewind == "init" else None
      return aws.next_round(state, optimizer, context.prunable, kept=kept, key=key,
                            rewind=rewind)

    return jax.vmap(start)(states, initial)

  trained, all_records, states = [], [], initial
  for round_index in range(pruning.rounds + 1):
    if round_index:
      # As the reference's released train.py: prune what the last round trained, then train.
      states = start_round(states, seed_key(config, "pruning", round_index),
                           np.int32(survivors[round_index]))
    epochs = pruning.epochs_per_round if round_index else pruning.warmup_epochs
    records = []
    if epochs:
      states, records = fit(context, f"pruning/round_{round_index:02d}", states, optimizer, epochs)
    trained.append(states)
    all_records.append(records)
  return trained, all_records


class Member(NamedTuple):
  """One member of the transfer sweep: which ticket, which transfer, which fresh init."""
  source: str  # a method, or "dense"
  variant: str
  round: int  # 0 for the dense baseline
  seed: int


def transfer_members(config: ml_collections.ConfigDict, rounds: Sequence[int]) -> list[Member]:
  """Per seed: the fresh dense network (if ``transfer.dense``), then every method x round x
  variant (``configs.check_config`` counts them so)."""
  members = []
  for seed in config.transfer.seeds:
    if config.transfer.dense:
      members.append(Member("dense", "dense", 0, seed))
    members += [Member(method, variant, round_index, seed) for method in config.methods
                for round_index in rounds for variant in config.transfer.variants]
  return members


def transfer_stage(context: Context, trained: Sequence[aws.SparseState], rounds: Sequence[int]
                   ) -> tuple[list[Member], aws.SparseState, list[float]]:
  """The transfer sweep in populations of ``transfer.population_size``: the members, their final
  states (one population, in member order) and final test accuracies."""
  config = context.config
  members = transfer_members(config, rounds)
  optimizer = build.optimizer(config, context.steps_per_epoch)
  tickets_by_round = [(states.train.params, states.train.batch_stats, states.mask)
                      for states in trained[1:]]

  @functools.partial(jax.jit, static_argnums=0)
  def initial_states(group: tuple[Member, ...], tickets_by_round, fresh):
    states = []
    for member in group:
      fresh_params, fresh_stats = fresh[member.seed]
      if member.source == "dense":
        trained = (fresh_params, fresh_stats, aws.dense_mask(fresh_params))
      else:
        ticket = tickets_by_round[member.round - 1]
        trained = population.select(ticket, config.methods.index(member.source))
      params, batch_stats, mask = aws.transfer(member.variant, *trained, fresh_params,
                                               fresh_stats, context.prunable)
      states.append(aws.init_sparse_state(seed_key(config, "transfer", member.seed), params,
                                          batch_stats, mask, False, optimizer))
    return population.stack(states)

  size = config.transfer.population_size or len(members)
  finals, accuracies = [], []
  for group, begin in enumerate(range(0, len(members), size)):
    states = initial_states(tuple(members[begin:begin + size]), tickets_by_round, context.fresh)
    states, records = fit(context, f"transfer/group_{group:02d}", states, optimizer,
                          config.epochs)
    finals.append(states)
    accuracies += list(records[-1]["test_accuracy"])
  return members, jax.tree.map(lambda *parts: np.concatenate(parts), *finals), accuracies


def transfer_pairs(config: ml_collections.ConfigDict) -> dict[str, tuple[tuple[str, int], ...]]:
  """``(variant, seed)`` of both ends of the transfer paths ``lmc.transfer_pairs`` measures, by
  family: ``sign_vs_retrain`` (first seed) and ``sign_seeds`` (the first two seeds' sign
  transfers: the reference's SGD-noise stability check)."""
  variants, seeds = config.transfer.variants, config.transfer.seeds
  pairs = {}
  if config.lmc.transfer_pairs and "sign" in variants:
    if "retrain" in variants:
      pairs["sign_vs_retrain"] = (("sign", seeds[0]), ("retrain", seeds[0]))
    if len(seeds) > 1:
      pairs["sign_seeds"] = (("sign", seeds[0]), ("sign", seeds[1]))
  return pairs


def lmc_stage(context: Context, trained: Sequence[aws.SparseState], members: Sequence[Member],
              finals: aws.SparseState) -> dict[str, Any]:
  """Error curves and barriers; each curve is cached in ``lmc/curves.json`` (resumable)."""
  config = context.config
  cache_path = context.workdir / "lmc" / "curves.json"
  cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
  curve = lmc.make_error_curve(context.model_apply_fn, num_points=config.lmc.num_points,
                               batch_size=config.lmc.batch_size,
                               augment=build.augment(config), **context.run_options)
  key = seed_key(config, "lmc")

  def row(name: str, round_index: int, params_a, mask_a, params_b, mask_b) -> dict[str, Any]:
    if name not in cache:
      cache[name] = lmc.connectivity(curve, params_a, mask_a, params_b, mask_b,
                                     context.batch_stats, context.train, context.test, key)
      cache_path.parent.mkdir(exist_ok=True)
      files.write_json(cache_path, cache, indent=1)
    return {"round": round_index,
            "density": tickets.sparsity_report(mask_a, context.prunable)["density"],
            **cache[name]}

  results: dict[str, Any] = {}
  if config.lmc.init_norm:
    results["init_norm"] = {}
    for index, method in enumerate(config.methods):
      rows = []
      for round_index, states in enumerate(trained[1:], start=1):
        params, mask = population.select((states.train.params, states.mask), index)
        rows.append(row(f"init_norm/{method}/{round_index}", round_index, params, mask,
                        aws.initialized_norms(params), mask))
      results["init_norm"][method] = rows
  final_pairs = (finals.train.params, finals.mask)
  for family, (first, second) in transfer_pairs(config).items():
    results[family] = {}
    for method in config.methods:
      rows = []
      for round_index in sorted({m.round for m in members if m.source == method}):
        a, b = (members.index(Member(method, variant, round_index, seed))
                for variant, seed in (first, second))
        rows.append(row(f"{family}/{method}/{round_index}", round_index,
                        *population.select(final_pairs, a), *population.select(final_pairs, b)))
      results[family][method] = rows
  return results


def transfer_results(members: Sequence[Member], densities: Sequence[float],
                     accuracies: Sequence[float]) -> dict[str, Any]:
  """Final test accuracy per curve (``dense``, ``<method>_<variant>``), by round: densities,
  per-seed accuracies and their mean."""
  curves: dict[str, dict[tuple[int, float], list[float]]] = {}
  for member, density, accuracy in zip(members, densities, accuracies):
    name = "dense" if member.source == "dense" else f"{member.source}_{member.variant}"
    curves.setdefault(name, {}).setdefault((member.round, density), []).append(accuracy)
  results = {}
  for name, points in curves.items():
    keys, values = zip(*sorted(points.items(), key=lambda item: item[0][0]))
    results[name] = {"round": [r for r, _ in keys], "density": [d for _, d in keys],
                     "accuracy": list(values), "mean_accuracy": [float(np.mean(v)) for v in values]}
  return results


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
                       progress: bool = True) -> dict[str, Any]:
  """Runs every stage of ``config`` (see module docstring), resuming from ``workdir``; returns
  the results it writes to ``workdir/results.json``."""
  transfer_rounds = configs.check_config(config)
  context = make_context(config, workdir, progress)
  trained, records = pruning_stage(context)
  members, finals, accuracies = transfer_stage(context, trained, transfer_rounds)
  trained_densities = [densities_of(states.mask, context.prunable) for states in trained]
  results = {
      "study": "aws", "dataset": context.dataset.name, "model": config.model,
      "num_params": int(sum(leaf.size for leaf in jax.tree.leaves(context.params))),
      "prunable_params": aws.num_prunable(context.params, context.prunable),
      "methods": list(config.methods), "fraction": config.pruning.fraction,
      "rounds": config.pruning.rounds, "rewind": config.pruning.rewind,
      "steps_per_epoch": context.steps_per_epoch, "lmc_points": config.lmc.num_points,
      "split_sizes": {"train": int(context.train.labels.shape[0]),
                      "test": int(context.test.labels.shape[0])},
      "epochs": {"warmup": config.pruning.warmup_epochs,
                 "per_round": config.pruning.epochs_per_round, "transfer": config.epochs},
      "pruning": {method: {
          "density": [densities[index] for densities in trained_densities],
          "test_accuracy": [log[-1]["test_accuracy"][index] if log else None for log in records],
          "ticket_density": [densities[index] for densities in trained_densities[1:]],
      } for index, method in enumerate(config.methods)},
      "transfer": transfer_results(members, densities_of(finals.mask, context.prunable),
                                   accuracies),
      "barriers": lmc_stage(context, trained, members, finals),
  }
  results = jsonable(results)
  files.write_json(context.workdir / "results.json", results)
  return results


def main(argv: Sequence[str] | None = None) -> None:
  cli.main("aws", train_and_evaluate, argv)


if __name__ == "__main__":
  main()
