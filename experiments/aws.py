"""A Winning Sign: LRR and AWS pruning, transfer to fresh inits, linear mode connectivity.

``python -m experiments.aws --config digits --workdir runs/aws`` runs, each stage resumable in
its own subdirectory of the workdir:

1. ``pruning/round_RR/``: the methods of ``config.methods`` (LRR, AWS) from one initialization,
   side by side as one population: a dense warm-up (round 00), then ``pruning.rounds`` rounds
   that each remove ``pruning.fraction`` of the surviving weights and train at the new mask;
   round r's trained network (density ``(1 - fraction)^r``) is its ticket.
2. ``transfer/group_GG/``: every ticket of ``transfer.densities`` from every method, transferred
   to fresh initializations (one per seed) by sign, by mask, or retrained from its own weights,
   plus the fresh dense network; all trained as populations of ``transfer.population_size``.
3. ``lmc/``: error curves (11 points, BatchNorm recalibrated, one population per curve): the
   paper's diagnostic (each round's trained network vs the same network with initialized norm
   params); at each transferred density, sign-transferred vs retrained network and the sign
   transfers of two seeds (:func:`transfer_pairs`).

``results.json`` and ``report.md`` (accuracy-vs-density and barrier plots) go into the workdir;
:func:`demo_section` adds the same report section to the demo.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments import build, cli
from experiments.configs import aws as aws_configs
from jaxtickets import aws, checkpoint, errors, files, lmc, loop, population, tickets
from jaxtickets import data as data_lib
from jaxtickets import report as report_lib
from jaxtickets import train as train_lib
from jaxtickets.errors import UserError
from jaxtickets.metrics import jsonable

PyTree = Any
# What each stream of randomness derived from the seed is for (see :func:`seed_key`).
_KEY_PURPOSES = ("model_init", "pruning", "transfer_init", "transfer", "lmc")
# Curve names in results and plots, by (source, variant).
_TRANSFER_TITLES = {"sign": "sign transfer", "mask": "mask transfer", "retrain": "retrain"}


def seed_key(config: ml_collections.ConfigDict, purpose: str, *indices: int) -> jax.Array:
  """The raw PRNG key of ``config.seed`` for one of :data:`_KEY_PURPOSES` (and sub-indices)."""
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), _KEY_PURPOSES.index(purpose))
  for index in indices:
    key = jax.random.fold_in(key, index)
  return key


def check_config(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """Raises UserError for bad settings before anything is loaded.

  Returns:
    The pruning rounds whose tickets are transferred (one per ``transfer.densities`` entry).
  """
  build.check_training(config)
  errors.check_names("methods", config.methods, aws.METHODS, repeat="each runs once")
  build.check_population_options(config)
  pruning = config.pruning
  aws.check_rounds(pruning.rounds)
  aws.check_fraction(pruning.fraction)
  if pruning.rewind not in aws.REWINDS:
    raise UserError(f"unknown pruning.rewind {pruning.rewind!r}; known: {', '.join(aws.REWINDS)}")
  errors.check_int("pruning.warmup_epochs", pruning.warmup_epochs, minimum=0)
  errors.check_int("pruning.epochs_per_round", pruning.epochs_per_round)
  errors.check_number("pruning.learning_rate", pruning.learning_rate, 0, strict=True)
  errors.check_int("eval_every_epochs", config.eval_every_epochs)
  transfer = config.transfer
  errors.check_names("transfer.variants", transfer.variants, aws.TRAINED_TRANSFERS,
                     repeat="each runs once")
  errors.check_sequence("transfer.seeds", transfer.seeds)
  for seed in transfer.seeds:
    build.check_seed("transfer.seeds entry", seed)
  errors.check_distinct("transfer.seeds", transfer.seeds, "each seed is one member")
  if transfer.population_size is not None:
    errors.check_int("transfer.population_size", transfer.population_size)
  errors.check_int("lmc.num_points", config.lmc.num_points, minimum=2)
  errors.check_int("lmc.batch_size", config.lmc.batch_size)
  rounds = aws.rounds_for_densities(transfer.densities, pruning.rounds, pruning.fraction)
  num_members = len(transfer_members(config, rounds))
  group = min(transfer.population_size or num_members, num_members)
  build.check_population_sizes(config, {
      "the pruning population (methods)": len(config.methods), "a transfer group": group,
      "the last transfer group": num_members % group or group,
      "the error curve (lmc.num_points)": config.lmc.num_points})
  return rounds


# ----------------------------------------------------------------------------------------------
# Context


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
  accuracy: Callable[[PyTree, PyTree, train_lib.Data], jax.Array]  # population test accuracy
  progress: bool


def make_context(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
                 progress: bool) -> Context:
  """Loads the data, builds and initializes the model, then claims ``workdir``.

  Raises:
    UserError: data or a model that the config's stages cannot use (checked before the claim).
  """
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
  keys = [seed_key(config, "model_init")] + [seed_key(config, "transfer_init", seed)
                                             for seed in seeds]
  # One compiled initialization for the pruning runs' network and every fresh one.
  variables = population.init(
      lambda key: train_lib.init_variables(key, model, dataset.image_shape), jnp.stack(keys))
  (params, batch_stats), *fresh = population.unstack(variables)
  if "aws" in config.methods and not any(jax.tree.leaves(aws.norm_leaves(params))):
    raise UserError(f"AWS interpolates norm params, and model {config.model!r} with "
                    f"norm={config.model_options.get('norm')!r} has none")
  model_apply_fn = train_lib.model_apply_fn(model, dataset.mean, dataset.std)
  run_options = build.population_options(config, params)

  def member_accuracy(params, batch_stats, test):
    return train_lib.evaluate(model_apply_fn, params, batch_stats, test)["accuracy"]

  accuracy = jax.jit(population.run(member_accuracy, member_axes=(0, 0), **run_options))
  # Claimed only now: a config the data or the model refuses leaves no workdir behind.
  workdir = checkpoint.claim_workdir(workdir, config.to_dict())
  return Context(
      config=config, workdir=workdir, dataset=dataset,
      train=train_lib.device_data(dataset.train), test=train_lib.device_data(dataset.test),
      steps_per_epoch=data_lib.steps_per_epoch(len(dataset.train.labels), config.batch_size),
      model_apply_fn=model_apply_fn, params=params, batch_stats=batch_stats,
      fresh=dict(zip(seeds, fresh)),
      prunable=aws.prunable_leaves(params), run_options=run_options, accuracy=accuracy,
      progress=progress)


def fit(context: Context, name: str, states: aws.SparseState, optimizer: Any,
        epochs: int) -> tuple[aws.SparseState, list[dict[str, Any]]]:
  """Trains a population of sparse states for ``epochs`` in ``workdir / name`` (resumable)."""
  step = population.run(
      aws.make_sparse_step(context.model_apply_fn, optimizer, batch_size=context.config.batch_size,
                           augment=build.augment(context.config)), **context.run_options)

  def evaluate(states):
    return {"test_accuracy": context.accuracy(states.train.params, states.train.batch_stats,
                                              context.test)}

  eval_every = min(context.config.eval_every_epochs, epochs) * context.steps_per_epoch
  return loop.fit(step, states, context.train, num_steps=epochs * context.steps_per_epoch,
                  eval_every=eval_every, evaluate=evaluate, workdir=context.workdir / name,
                  progress=context.progress, description=name)


def densities_of(masks: PyTree, prunable: PyTree) -> list[float]:
  """Overall density of each member's mask (a population of masks)."""
  return [tickets.sparsity_report(mask, prunable)["density"]
          for mask in population.unstack(masks)]


# ----------------------------------------------------------------------------------------------
# Stages


@dataclasses.dataclass
class Pruning:
  """The pruning stage's populations (members in ``config.methods`` order).

  Attributes:
    trained: per round r = 0..R, the state at the end of its training (round 0: the dense
      warm-up; round r >= 1: pruned from round r - 1's network, then trained at its mask).
    tickets: per round r = 1..R (index r - 1), that round's trained ``(params, batch_stats,
      mask)``: the networks the transfers start from (the reference's ``checkpoint_iter{r}``).
    records: per round, the loop's log.
  """
  trained: list[aws.SparseState]
  tickets: list[tuple[PyTree, PyTree, PyTree]]
  records: list[list[dict[str, Any]]]


def pruning_stage(context: Context) -> Pruning:
  """LRR and AWS (``config.methods``) pruned as one population from one initialization."""
  config, pruning = context.config, context.config.pruning
  optimizer = train_lib.sgd(pruning.learning_rate, momentum=config.momentum,
                            weight_decay=config.weight_decay)
  is_aws = jnp.asarray([method == "aws" for method in config.methods])
  initial = jax.jit(jax.vmap(lambda aws_flag: aws.init_sparse_state(
      seed_key(config, "pruning", 0), context.params, context.batch_stats,
      aws.dense_mask(context.params), aws_flag, optimizer)))(is_aws)

  @jax.jit
  def start_round(states, key):
    def start(state, start_of_run):
      rewind = start_of_run if pruning.rewind == "init" else None
      return aws.next_round(state, optimizer, context.prunable, fraction=pruning.fraction,
                            key=key, rewind=rewind)

    return jax.vmap(start)(states, initial)

  trained, all_records, states = [], [], initial
  for round_index in range(pruning.rounds + 1):
    if round_index:
      # As the reference's released train.py: prune what the last round trained, then train.
      states = start_round(states, seed_key(config, "pruning", round_index))
    epochs = pruning.epochs_per_round if round_index else pruning.warmup_epochs
    if epochs:
      states, records = fit(context, f"pruning/round_{round_index:02d}", states, optimizer, epochs)
    else:
      records = []
    trained.append(states)
    all_records.append(records)
  tickets = [(states.train.params, states.train.batch_stats, states.mask)
             for states in trained[1:]]
  return Pruning(trained, tickets, all_records)


@dataclasses.dataclass(frozen=True)
class Member:
  """One member of the transfer sweep: which ticket, which transfer, which fresh init."""
  source: str  # a method, or "dense"
  variant: str
  round: int  # 0 for the dense baseline
  seed: int


def transfer_members(config: ml_collections.ConfigDict, rounds: Sequence[int]) -> list[Member]:
  members = []
  for seed in config.transfer.seeds:
    if config.transfer.dense:
      members.append(Member("dense", "dense", 0, seed))
    members += [Member(method, variant, round_index, seed) for method in config.methods
                for round_index in rounds for variant in config.transfer.variants]
  return members


def transfer_stage(context: Context, pruning: Pruning, rounds: Sequence[int]
                   ) -> tuple[list[Member], aws.SparseState, list[float]]:
  """The transfer sweep, trained as populations of ``transfer.population_size`` members.

  Returns:
    The members, their final states (one population, in member order) and final test
    accuracies.
  """
  config = context.config
  members = transfer_members(config, rounds)
  optimizer = build.optimizer(config, context.steps_per_epoch)

  @functools.partial(jax.jit, static_argnums=0)
  def initial_states(group: tuple[Member, ...], tickets_by_round, fresh):
    """The starting states of ``group`` as one population (one compiled program)."""
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
    states = initial_states(tuple(members[begin:begin + size]), pruning.tickets, context.fresh)
    states, records = fit(context, f"transfer/group_{group:02d}", states, optimizer,
                          config.epochs)
    finals.append(states)
    accuracies += list(records[-1]["test_accuracy"])
  return members, jax.tree.map(lambda *parts: np.concatenate(parts), *finals), accuracies


def lmc_stage(context: Context, pruning: Pruning, members: Sequence[Member],
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
    """The curve from ``a`` to ``b`` at a round (``mask_a``'s density), cached by ``name``."""
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
      for round_index, states in enumerate(pruning.trained[1:], start=1):
        params = population.select(states.train.params, index)
        mask = population.select(states.mask, index)
        rows.append(row(f"init_norm/{method}/{round_index}", round_index, params, mask,
                        aws.initialized_norms(params), mask))
      results["init_norm"][method] = rows
  for family, (first, second) in transfer_pairs(config).items():
    results[family] = {}
    for method in config.methods:
      rows = []
      for round_index in sorted({m.round for m in members if m.source == method}):
        a, b = (members.index(Member(method, variant, round_index, seed))
                for variant, seed in (first, second))
        rows.append(row(f"{family}/{method}/{round_index}", round_index,
                        *population.select((finals.train.params, finals.mask), a),
                        *population.select((finals.train.params, finals.mask), b)))
      results[family][method] = rows
  return results


def transfer_pairs(config: ml_collections.ConfigDict) -> dict[str, tuple[tuple[str, int], ...]]:
  """The trained transfers whose linear paths ``lmc.transfer_pairs`` measures, by family:
  ``(variant, seed)`` of both ends, at every transferred density.

  ``sign_vs_retrain``: the sign transfer vs the retrained ticket (first seed).
  ``sign_seeds``: the sign transfers of the first two seeds (the reference's SGD-noise
  stability check: do two runs from one transferred sign pattern end in one basin?).
  """
  variants, seeds = config.transfer.variants, config.transfer.seeds
  pairs = {}
  if config.lmc.transfer_pairs and "sign" in variants:
    if "retrain" in variants:
      pairs["sign_vs_retrain"] = (("sign", seeds[0]), ("retrain", seeds[0]))
    if len(seeds) > 1:
      pairs["sign_seeds"] = (("sign", seeds[0]), ("sign", seeds[1]))
  return pairs


# ----------------------------------------------------------------------------------------------
# Runner


def transfer_results(members: Sequence[Member], densities: Sequence[float],
                     accuracies: Sequence[float]) -> dict[str, Any]:
  """Final test accuracy per curve (``dense``, ``<method>_<variant>``): densities (sorted
  descending), per-seed accuracies and their mean."""
  curves: dict[str, dict[tuple[int, float], list[float]]] = {}
  for member, density, accuracy in zip(members, densities, accuracies):
    name = "dense" if member.source == "dense" else f"{member.source}_{member.variant}"
    curves.setdefault(name, {}).setdefault((member.round, density), []).append(accuracy)
  results = {}
  for name, points in curves.items():
    ordered = sorted(points.items(), key=lambda item: item[0][0])
    results[name] = {"round": [round_index for (round_index, _), _ in ordered],
                     "density": [density for (_, density), _ in ordered],
                     "accuracy": [values for _, values in ordered],
                     "mean_accuracy": [float(np.mean(values)) for _, values in ordered]}
  return results


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
                       progress: bool = True) -> dict[str, Any]:
  """Runs every stage of ``config`` (see module docstring); resumes from ``workdir``.

  Returns:
    The results written to ``workdir/results.json``.
  """
  transfer_rounds = check_config(config)
  context = make_context(config, workdir, progress)
  pruning = pruning_stage(context)
  members, finals, accuracies = transfer_stage(context, pruning, transfer_rounds)
  member_densities = densities_of(finals.mask, context.prunable)
  trained_densities = [densities_of(states.mask, context.prunable) for states in pruning.trained]
  ticket_densities = [densities_of(mask, context.prunable) for _, _, mask in pruning.tickets]
  results = {
      "dataset": context.dataset.name, "model": config.model,
      "num_params": int(sum(leaf.size for leaf in jax.tree.leaves(context.params))),
      "prunable_params": tickets.sparsity_report(aws.dense_mask(context.params),
                                                 context.prunable)["total"],
      "methods": list(config.methods), "fraction": config.pruning.fraction,
      "rounds": config.pruning.rounds, "rewind": config.pruning.rewind,
      "steps_per_epoch": context.steps_per_epoch, "lmc_points": config.lmc.num_points,
      "split_sizes": {"train": int(context.train.labels.shape[0]),
                      "test": int(context.test.labels.shape[0])},
      "epochs": {"warmup": config.pruning.warmup_epochs,
                 "per_round": config.pruning.epochs_per_round, "transfer": config.epochs},
      "pruning": {
          method: {
              "density": [densities[index] for densities in trained_densities],
              "test_accuracy": [records[-1]["test_accuracy"][index] if records else None
                                for records in pruning.records],
              "ticket_density": [densities[index] for densities in ticket_densities],
          } for index, method in enumerate(config.methods)},
      "transfer": transfer_results(members, member_densities, accuracies),
      "barriers": lmc_stage(context, pruning, members, finals),
  }
  results["findings"] = findings(results)
  results = jsonable(results)
  files.write_json(context.workdir / "results.json", results)
  report = report_lib.Report(context.workdir,
                             f"A Winning Sign: {config.model} on {context.dataset.name}")
  add_report_sections(report, results)
  report.write()
  return results


# ----------------------------------------------------------------------------------------------
# Findings and report


def _paired(first: dict[str, list], second: dict[str, list], value: str) -> list[tuple]:
  """(density, first's value, second's value) at the rounds both curves have."""
  by_round = dict(zip(second["round"], second[value]))
  return [(density, a, by_round[round_index])
          for round_index, density, a in zip(first["round"], first["density"], first[value])
          if round_index in by_round]


def _comparison(pairs: list[tuple], wins_key: str, aws_wins: Callable[[float, float], bool],
                ) -> dict[str, Any]:
  """AWS vs LRR at each density of ``pairs`` ((density, aws, lrr)), and how often AWS wins."""
  return {"density": [d for d, _, _ in pairs], "aws": [a for _, a, _ in pairs],
          "lrr": [b for _, _, b in pairs], wins_key: sum(aws_wins(a, b) for _, a, b in pairs),
          "ties": sum(a == b for _, a, b in pairs), "points": len(pairs)}


def findings(results: dict[str, Any]) -> dict[str, Any]:
  """The paper's two claims, read off the results: lower init-norm barrier for AWS than LRR,
  and higher accuracy of AWS's sign transfer than LRR's at the same density."""
  found = {}
  barriers = results["barriers"].get("init_norm", {})
  if {"lrr", "aws"} <= set(barriers):
    def rows(method):
      return {"round": [row["round"] for row in barriers[method]],
              "density": [row["density"] for row in barriers[method]],
              "barrier": [row["barrier"] for row in barriers[method]]}
    found["init_norm_barrier"] = _comparison(_paired(rows("aws"), rows("lrr"), "barrier"),
                                             "aws_lower", lambda a, b: a < b)
  transfer = results["transfer"]
  if "aws_sign" in transfer and "lrr_sign" in transfer:
    found["sign_transfer_accuracy"] = _comparison(
        _paired(transfer["aws_sign"], transfer["lrr_sign"], "mean_accuracy"), "aws_higher",
        lambda a, b: a > b)
  return found


# Per finding: the line's opening, its ``_comparison`` wins key, and the wins' wording.
_FINDING_TEXT = {
    "init_norm_barrier": (
        "Error barrier between each round's trained network and the same network with "
        "initialized norm params, AWS vs LRR (density: AWS vs LRR)", "aws_lower", "AWS lower at"),
    "sign_transfer_accuracy": (
        "Test accuracy of sign transfer to a fresh init, AWS vs LRR ticket (density: AWS vs "
        "LRR, mean over seeds)", "aws_higher", "AWS higher at"),
}


def findings_text(found: dict[str, Any]) -> str:
  lines = []
  for name, (opening, wins_key, wins_words) in _FINDING_TEXT.items():
    if name not in found:
      continue
    f = found[name]
    pairs = ", ".join(f"{d:.3g}: {a:.3f} vs {b:.3f}"
                      for d, a, b in zip(f["density"], f["aws"], f["lrr"]))
    lines.append(f"- {opening}: {pairs}. {wins_words} {f[wins_key]} of {f['points']} densities "
                 f"({f['ties']} ties).")
  return "\n".join(lines)


def _curve_title(name: str) -> str:
  if name == "dense":
    return "dense"
  method, variant = name.split("_", 1)
  return f"{method.upper()} {_TRANSFER_TITLES[variant]}"


def accuracy_figure(results: dict[str, Any]):
  transfer = results["transfer"]
  series = {}
  for name, curve in transfer.items():
    if name == "dense":
      densities = [d for other in transfer.values() for d in other["density"]] or [1.0]
      series["dense"] = ([min(densities), 1.0], [curve["mean_accuracy"][0]] * 2)
    else:
      series[_curve_title(name)] = (curve["density"], curve["mean_accuracy"])
  fig = report_lib.line_plot(series, xlabel="density (fraction of prunable weights kept)",
                             ylabel="test accuracy", logx=True,
                             title=f"{results['model']} on {results['dataset']}")
  fig.axes[0].invert_xaxis()
  return fig


def barrier_figure(results: dict[str, Any]):
  series = {}
  titles = {"init_norm": "trained vs initialized norms", "sign_vs_retrain": "sign vs retrain",
            "sign_seeds": "sign transfer, two seeds"}
  for family, by_method in results["barriers"].items():
    for method, rows in by_method.items():
      series[f"{method.upper()}: {titles[family]}"] = ([row["density"] for row in rows],
                                                      [row["barrier"] for row in rows])
  fig = report_lib.line_plot(series, xlabel="density", ylabel="error barrier", logx=True,
                             title="Linear mode connectivity")
  fig.axes[0].invert_xaxis()
  return fig


def curves_figure(results: dict[str, Any]):
  """Error along the line at the sparsest density of every family."""
  series = {}
  for family, by_method in results["barriers"].items():
    for method, rows in by_method.items():
      row = min(rows, key=lambda row: row["density"])
      points = np.linspace(0, 1, len(row["errors"]))
      series[f"{method.upper()} {family} (density {row['density']:.3g})"] = (points,
                                                                             row["errors"])
  return report_lib.line_plot(series, xlabel="interpolation t (0: first network)",
                              ylabel="test error", title="Error along the linear path")


# How the report names ``pruning.rewind`` (with "init", LRR is IMP with rewinding to init).
_REWIND_TEXT = {"none": " from the pruned network's trained weights",
                "init": " from the run's starting weights under the new mask (rewinding: "
                        "\"lrr\" is then IMP)"}


def add_report_sections(report: report_lib.Report, results: dict[str, Any]) -> None:
  """The AWS section: pruning table, transfer table, findings, three figures."""
  epochs = results["epochs"]
  sizes = results["split_sizes"]
  report.section(
      "A Winning Sign: iterative pruning, sign transfer, linear mode connectivity",
      f"{results['model']} on {results['dataset']} (train {sizes['train']}, test "
      f"{sizes['test']}; {results['prunable_params']} prunable weights). "
      f"{' and '.join(m.upper() for m in results['methods'])} pruned side by side as one "
      f"population: {epochs['warmup']} warm-up epochs, then {results['rounds']} rounds that "
      f"each remove {results['fraction']:.0%} of the surviving weights (global magnitude; "
      f"classifier, biases and norms dense) and train {epochs['per_round']} epochs"
      f"{_REWIND_TEXT[results['rewind']]}; each round's trained network is its ticket. "
      f"Tickets transferred to a fresh init and trained "
      f"{epochs['transfer']} epochs as one population; "
      f"error barriers with BatchNorm recalibrated at each of the {results['lmc_points']} "
      f"points of a path (so a curve's end can differ from the pruning table's accuracy, "
      f"which uses the running statistics of training, for AWS gathered under random "
      f"interpolation).")
  report.text(findings_text(results["findings"]) + "\n")
  rows = []
  for method, curve in results["pruning"].items():
    for round_index, (density, accuracy) in enumerate(zip(curve["density"],
                                                          curve["test_accuracy"])):
      rows.append({"method": method.upper(), "round": round_index, "trained at density": density,
                   "test accuracy": accuracy})
  report.text(report_lib.markdown_table(rows, float_format="{:.3f}"))
  rows = [{"network": _curve_title(name), "density": density, "test accuracy": mean}
          for name, curve in results["transfer"].items()
          for density, mean in zip(curve["density"], curve["mean_accuracy"])]
  report.text("\n" + report_lib.markdown_table(rows, float_format="{:.3f}"))
  report.figure("aws_accuracy_vs_density", accuracy_figure(results),
                "Test accuracy vs density after training from each transfer")
  if results["barriers"]:
    report.figure("aws_barriers", barrier_figure(results), "Error barrier vs density")
    report.figure("aws_error_curves", curves_figure(results), "Test error along linear paths")


def demo_section(report: report_lib.Report, workdir: pathlib.Path) -> None:
  """The demo's AWS section (the ``digits`` preset, run in ``workdir / "aws"``)."""
  results = train_and_evaluate(aws_configs.get_config("digits"), workdir / "aws")
  add_report_sections(report, results)


def main(argv: Sequence[str] | None = None) -> None:
  cli.main(train_and_evaluate, aws_configs, argv)


if __name__ == "__main__":
  main()
