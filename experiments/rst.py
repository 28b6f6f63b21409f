"""Robust Scratch Tickets + Random RST Switch: ticket search, baselines, attacks, R2S evaluation.

``python -m experiments.rst --config digits --workdir runs/rst`` runs, each resumable in its own
subdirectory of the workdir:

1. ``rst/``: the K tickets of ``config.keep_ratios`` (same random weights), searched with PGD
   adversarial training as one population;
2. ``natural/`` (``config.natural_baseline``): the same tickets searched without an attack;
3. ``dense/`` (``config.dense_baseline.enabled``): the dense network adversarially trained;
4. ``finetune/`` (``config.finetune.epochs > 0``): the selected RSTs' weights adversarially
   fine-tuned with their masks fixed.

Every stage is checkpointed twice: its last state, and per member the state of the evaluation
with the best PGD-20 accuracy on the validation split (``best/``). Both are evaluated on the test
split (clean, PGD-20, CW-20, APGD-CE, APGD-DLR), and the selected RSTs by R2S's four evaluations.
``results.json`` and ``report.md`` go into the workdir; :func:`demo_section` adds the same
report section to the demo.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import ml_collections
import numpy as np

from experiments import build, cli
from experiments.configs import rst as rst_configs
from jaxtickets import attacks, checkpoint, errors, files, loop, population, rst, tickets
from jaxtickets import data as data_lib
from jaxtickets import report as report_lib
from jaxtickets import train as train_lib
from jaxtickets.errors import UserError
from jaxtickets.metrics import jsonable
from jaxtickets.models.init import get_initializer

PyTree = Any
# Test-split columns of the per-ticket tables, in order (apgd_dlr only with >= 3 classes).
COLUMNS = ("clean", "pgd", "cw", "apgd_ce", "apgd_dlr")
SELECTIONS = ("last", "best")
# What each stream of randomness derived from the seed is for (see :func:`seed_key`).
_KEY_PURPOSES = ("model_init", "tickets", "search", "dense", "finetune", "evaluation")


def seed_key(config: ml_collections.ConfigDict, purpose: str) -> jax.Array:
  """The raw (checkpointable) PRNG key of ``config.seed`` for one of :data:`_KEY_PURPOSES`."""
  return jax.random.fold_in(jax.random.PRNGKey(config.seed), _KEY_PURPOSES.index(purpose))


def training_attack(config: ml_collections.ConfigDict) -> rst.TrainingAttack:
  return rst.TrainingAttack(eps=config.attack.eps, step_size=config.attack.step_size,
                            num_steps=config.attack.num_steps,
                            random_start=config.attack.random_start,
                            batch_norm=config.attack.batch_norm)


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises UserError for a bad setting of any stage before anything is loaded or trained."""
  build.check_training(config)
  training_attack(config)
  keep_ratios = rst.keep_ratio_array(config.keep_ratios)
  data_lib.check_val_fraction("val_fraction", config.val_fraction)
  build.check_population_options(config)
  build.check_population_sizes(config, {"the tickets (keep_ratios)": len(keep_ratios)})
  get_initializer(config.weight_init)
  evaluation = config.eval
  rst.evaluation_attacks(eps=evaluation.eps, step_size=evaluation.step_size,
                         pgd_steps=evaluation.pgd_steps, apgd_steps=evaluation.apgd_steps)
  for name in ("eot_samples", "every_epochs", "batch_size"):
    errors.check_int(f"eval.{name}", evaluation[name])
  errors.check_sequence("eval.attacks", evaluation.attacks)
  unknown = sorted(set(evaluation.attacks) - set(COLUMNS[1:]))
  if unknown or "pgd" not in evaluation.attacks:
    raise UserError(f"eval.attacks={tuple(evaluation.attacks)!r}; expected names among "
                    f"{', '.join(COLUMNS[1:])}, including 'pgd' (the selection metric)")
  if config.finetune.init not in rst.FINETUNE_INITS:
    raise UserError(f"unknown finetune.init {config.finetune.init!r}; known: "
                    f"{', '.join(rst.FINETUNE_INITS)}")
  build.check_optimizer(config.finetune, "finetune.", min_epochs=0)
  if config.finetune.epochs > 0:
    get_initializer(config.finetune.weight_init)
  if config.dense_baseline.enabled:
    # Which options a model takes does not depend on its number of classes.
    build.model(config, 1, **config.dense_baseline.model_options.to_dict())


# ----------------------------------------------------------------------------------------------
# Evaluation


class Evaluator:
  """Compiled evaluations of populations of plain subnetworks of one model."""

  def __init__(self, model_apply_fn: train_lib.ApplyFn, config: ml_collections.ConfigDict,
               num_classes: int):
    evaluation = config.eval
    available = rst.evaluation_attacks(
        eps=evaluation.eps, step_size=evaluation.step_size, pgd_steps=evaluation.pgd_steps,
        apgd_steps=evaluation.apgd_steps, num_classes=num_classes)
    self.attacks = {name: available[name] for name in evaluation.attacks if name in available}
    self.model_apply_fn = model_apply_fn
    self._robust = {name: jax.jit(functools.partial(
        rst.population_robust_accuracy, model_apply_fn, attack=attack,
        batch_size=evaluation.batch_size)) for name, attack in self.attacks.items()}

  def validation(self, params: PyTree, batch_stats: PyTree, data: train_lib.Data,
                 key: jax.Array) -> dict[str, jax.Array]:
    """{"val_accuracy": f32[K], "val_pgd_accuracy": f32[K]} (the selection metric)."""
    metrics = self._robust["pgd"](params, batch_stats, data, key)
    return {"val_accuracy": metrics["clean_accuracy"],
            "val_pgd_accuracy": metrics["robust_accuracy"]}

  def tickets(self, params: PyTree, batch_stats: PyTree, data: train_lib.Data,
              key: jax.Array) -> dict[str, list[float]]:
    """Per member: clean accuracy and accuracy under every white-box attack."""
    results = {}
    for name, robust in self._robust.items():
      metrics = robust(params, batch_stats, data, key)
      results.setdefault("clean", metrics["clean_accuracy"])
      results[name] = metrics["robust_accuracy"]
    return jsonable(results)


def evaluate_r2s(model_apply_fn: train_lib.ApplyFn, params: PyTree, batch_stats: PyTree,
                 data: train_lib.Data, key: jax.Array, config: ml_collections.ConfigDict,
                 white_box: attacks.Attack) -> dict[str, Any]:
  """R2S's evaluations (a)-(d) of K selected tickets on ``data``."""
  evaluation = config.eval
  batch_size = evaluation.batch_size
  matrix = jax.jit(functools.partial(rst.transfer_matrix, model_apply_fn, attack=white_box,
                                     batch_size=batch_size))(params, batch_stats, data, key)
  eot_attack = attacks.get_attack("pgd", eps=evaluation.eps, step_size=evaluation.step_size,
                                  num_steps=evaluation.pgd_steps,
                                  eot_samples=evaluation.eot_samples)
  switch = rst.switch_apply_fn(model_apply_fn, per_example=evaluation.per_example_switch)
  clean = jax.jit(functools.partial(rst.switch_accuracy, model_apply_fn, batch_size=batch_size))(
      params, batch_stats, data, key)
  eot = jax.jit(functools.partial(rst.switch_accuracy, model_apply_fn, attack=eot_attack,
                                  attacked_apply_fn=switch, batch_size=batch_size))(
      params, batch_stats, data, key)
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


# ----------------------------------------------------------------------------------------------
# Stages


class BestStates:
  """Per population member, the params and statistics of its best validation evaluation.

  Checkpointed in ``directory`` at every evaluation that improves a member, so a resumed run
  continues with the same selection.
  """

  def __init__(self, directory: pathlib.Path, states: train_lib.TrainState):
    self._checkpointer = checkpoint.Checkpointer(directory, max_to_keep=1)
    num_members = population.size(states.step)
    self.best = {"params": states.params, "batch_stats": states.batch_stats,
                 "score": jnp.full((num_members,), -jnp.inf), "step": states.step}
    if self._checkpointer.latest_step() is not None:
      self.best = self._checkpointer.restore(self.best)

  def update(self, states: train_lib.TrainState, score: jax.Array) -> None:
    improved = np.asarray(score > self.best["score"])
    if not improved.any():
      return
    candidate = {"params": states.params, "batch_stats": states.batch_stats, "score": score,
                 "step": states.step}
    self.best = jax.tree.map(
        lambda new, old: jnp.where(improved.reshape((-1,) + (1,) * (new.ndim - 1)), new, old),
        candidate, self.best)
    step = int(np.asarray(states.step)[0])
    # A resumed run re-evaluates the step the selection was last saved at, identically.
    if self._checkpointer.latest_step() != step:
      self._checkpointer.save(step, self.best)

  def close(self) -> None:
    self._checkpointer.close()


@dataclasses.dataclass
class StageResult:
  """What one stage produced (populations with leading axis K).

  Attributes:
    last: the final TrainState.
    best: {"params", "batch_stats", "score", "step"} of each member's best evaluation.
    records: the per-evaluation log.
    subnetworks: ``params -> plain subnetwork params`` of the stage's state.
  """
  last: train_lib.TrainState
  best: dict[str, Any]
  records: list[dict[str, Any]]
  subnetworks: Callable[[PyTree], PyTree]


@dataclasses.dataclass
class Context:
  """Everything the stages share."""
  config: ml_collections.ConfigDict
  workdir: pathlib.Path
  dataset: data_lib.Dataset
  train: train_lib.Data
  val: train_lib.Data
  test: train_lib.Data
  steps_per_epoch: int
  eval_key: jax.Array
  progress: bool


def run_stage(context: Context, name: str, step: Callable, states: train_lib.TrainState,
              evaluator: Evaluator, subnetworks: Callable[[PyTree], PyTree],
              epochs: int) -> StageResult:
  """Trains ``states`` with ``step`` for ``epochs``, evaluating and selecting every few epochs."""
  directory = context.workdir / name
  best = BestStates(directory / "best", states)
  subnetworks_of = jax.jit(subnetworks)

  def evaluate(states):
    metrics = evaluator.validation(subnetworks_of(states.params), states.batch_stats,
                                   context.val, context.eval_key)
    best.update(states, metrics["val_pgd_accuracy"])
    return metrics

  eval_every = context.config.eval.every_epochs * context.steps_per_epoch
  states, records = loop.fit(step, states, context.train,
                             num_steps=epochs * context.steps_per_epoch, eval_every=eval_every,
                             evaluate=evaluate, workdir=directory, progress=context.progress,
                             description=name)
  best.close()
  return StageResult(states, best.best, records, subnetworks)


def ticket_network(config: ml_collections.ConfigDict, dataset: data_lib.Dataset,
                   ) -> tuple[train_lib.ApplyFn, PyTree, PyTree]:
  """The RST network of ``config``: ``(model_apply_fn, params, batch_stats)`` at init."""
  model = build.model(config, dataset.num_classes, **rst.MODEL_OPTIONS)
  params, batch_stats = train_lib.init_variables(seed_key(config, "model_init"), model,
                                                 dataset.image_shape)
  return train_lib.model_apply_fn(model, dataset.mean, dataset.std), params, batch_stats


def initial_tickets(config: ml_collections.ConfigDict, params: PyTree,
                    prunable: PyTree) -> rst.Ticket:
  """The K tickets of ``config.keep_ratios`` before search (a population).

  They share one weight key (one random dense net) and one score initialization, as K runs of
  the reference code with the same seed and different remaining ratios would.
  """
  weight_key, score_key = jax.random.split(seed_key(config, "tickets"))

  def draw(keep_ratio, params):
    return rst.init_ticket(weight_key, score_key, params, keep_ratio, prunable,
                           weight_init=config.weight_init)

  return jax.jit(jax.vmap(draw, in_axes=(0, None)))(rst.keep_ratio_array(config.keep_ratios),
                                                    params)


def search_stage(context: Context, name: str, attack: rst.TrainingAttack | None,
                 model_apply_fn: train_lib.ApplyFn, evaluator: Evaluator, params: PyTree,
                 batch_stats: PyTree, prunable: PyTree) -> StageResult:
  """K tickets (one per keep ratio, see :func:`initial_tickets`) searched as one population."""
  config = context.config
  keep_ratios = rst.keep_ratio_array(config.keep_ratios)
  state_key = seed_key(config, "search")
  optimizer = rst.score_optimizer(build.schedule(config, context.steps_per_epoch),
                                  momentum=config.momentum, weight_decay=config.weight_decay)

  def init_member(ticket, batch_stats):
    return train_lib.create_train_state(state_key, rst.search_params(ticket), batch_stats,
                                        optimizer)

  states = jax.jit(jax.vmap(init_member, in_axes=(0, None)))(
      initial_tickets(config, params, prunable), batch_stats)
  step = rst.make_search_step(model_apply_fn, optimizer, prunable,
                              batch_size=config.batch_size, augment=build.augment(config),
                              attack=attack)
  population_step = rst.make_population_step(step, keep_ratios,
                                             **build.population_options(config, params))

  def subnetworks(search_params):
    return rst.subnetworks(rst.ticket_of(search_params, keep_ratios), prunable)

  return run_stage(context, name, population_step, states, evaluator, subnetworks, config.epochs)


def dense_stage(context: Context, attack: rst.TrainingAttack) -> tuple[StageResult, Evaluator]:
  """The dense network of the same architecture, PGD adversarially trained (one member)."""
  config = context.config
  model = build.model(config, context.dataset.num_classes,
                      **config.dense_baseline.model_options.to_dict())
  model_apply_fn = train_lib.model_apply_fn(model, context.dataset.mean, context.dataset.std)
  init_key, state_key = jax.random.split(seed_key(config, "dense"))
  params, batch_stats = train_lib.init_variables(init_key, model, context.dataset.image_shape)
  optimizer = build.optimizer(config, context.steps_per_epoch)
  states = population.stack([train_lib.create_train_state(state_key, params, batch_stats,
                                                          optimizer)])
  step = rst.make_adversarial_train_step(model_apply_fn, optimizer,
                                         batch_size=config.batch_size,
                                         augment=build.augment(config), attack=attack)
  evaluator = Evaluator(model_apply_fn, config, context.dataset.num_classes)
  population_step = population.run(step, **build.population_options(config, params))
  result = run_stage(context, "dense", population_step, states, evaluator, lambda p: p,
                     config.epochs)
  return result, evaluator


def finetune_stage(context: Context, attack: rst.TrainingAttack,
                   model_apply_fn: train_lib.ApplyFn, evaluator: Evaluator, selected: StageResult,
                   prunable: PyTree) -> StageResult:
  """The selected tickets' weights trained adversarially with their masks fixed, from the
  search's running statistics (the reference's ``main.py`` loads them with the scores, and for
  "reinit" redraws the conv weights only)."""
  config = context.config
  settings = config.finetune
  keep_ratios = rst.keep_ratio_array(config.keep_ratios)
  selected_tickets = rst.ticket_of(selected.best["params"], keep_ratios)
  masks = jax.jit(jax.vmap(functools.partial(rst.ticket_mask, prunable=prunable)))(
      selected_tickets)
  init_key, state_key = jax.random.split(seed_key(config, "finetune"))
  optimizer = build.optimizer(settings, context.steps_per_epoch)

  def init_member(ticket, batch_stats):
    weights = rst.finetune_weights(ticket, prunable, init=settings.init, key=init_key,
                                   weight_init=settings.weight_init)
    return train_lib.create_train_state(state_key, weights, batch_stats, optimizer)

  states = jax.jit(jax.vmap(init_member))(selected_tickets, selected.best["batch_stats"])
  step = rst.make_finetune_step(model_apply_fn, optimizer, batch_size=config.batch_size,
                                augment=build.augment(config), attack=attack)
  population_step = rst.make_population_step(
      step, masks, **build.population_options(config, population.select(masks, 0)))
  subnetworks = jax.vmap(tickets.apply_mask)
  return run_stage(context, "finetune", population_step, states, evaluator,
                   lambda weights: subnetworks(weights, masks), settings.epochs)


# ----------------------------------------------------------------------------------------------
# The run


def _ticket_tables(context: Context, stage: StageResult,
                   evaluator: Evaluator) -> dict[str, dict[str, Any]]:
  """Test-split metrics of the stage's last and best states, per member."""
  subnetworks_of = jax.jit(stage.subnetworks)
  tables = {"last": evaluator.tickets(subnetworks_of(stage.last.params),
                                      stage.last.batch_stats, context.test, context.eval_key)}
  steps = np.asarray(stage.best["step"])
  if np.array_equal(steps, np.asarray(stage.last.step)):  # Every member was best at the end.
    tables["best"] = dict(tables["last"])
  else:
    tables["best"] = evaluator.tickets(subnetworks_of(stage.best["params"]),
                                       stage.best["batch_stats"], context.test,
                                       context.eval_key)
  tables["best"]["epoch"] = (steps // context.steps_per_epoch).tolist()
  tables["best"]["val_pgd_accuracy"] = np.asarray(stage.best["score"]).tolist()
  return tables


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
                       progress: bool = True) -> dict[str, Any]:
  """Runs every stage of ``config`` (see module docstring); resumes from ``workdir``.

  Returns:
    The results written to ``workdir/results.json`` plus ``"stages"``: the
    :class:`StageResult` of each stage that ran (states, for callers that need them).
  """
  check_config(config)
  attack = training_attack(config)
  dataset = data_lib.with_validation(build.dataset(config), config.val_fraction,
                                     seed=config.seed)
  workdir = checkpoint.claim_workdir(workdir, config.to_dict())
  model_apply_fn, params, batch_stats = ticket_network(config, dataset)
  prunable = tickets.prunable(params)
  context = Context(
      config=config, workdir=workdir, dataset=dataset,
      train=train_lib.device_data(dataset.train), val=train_lib.device_data(dataset.val),
      test=train_lib.device_data(dataset.test),
      steps_per_epoch=data_lib.steps_per_epoch(len(dataset.train.labels), config.batch_size),
      eval_key=seed_key(config, "evaluation"), progress=progress)
  evaluator = Evaluator(model_apply_fn, config, dataset.num_classes)

  stages = {"rst": search_stage(context, "rst", attack, model_apply_fn, evaluator, params,
                                batch_stats, prunable)}
  evaluators = {"rst": evaluator}
  if config.natural_baseline:
    stages["natural"] = search_stage(context, "natural", None, model_apply_fn, evaluator, params,
                                     batch_stats, prunable)
    evaluators["natural"] = evaluator
  if config.dense_baseline.enabled:
    stages["dense"], evaluators["dense"] = dense_stage(context, attack)
  if config.finetune.epochs > 0:
    stages["finetune"] = finetune_stage(context, attack, model_apply_fn, evaluator,
                                        stages["rst"], prunable)
    evaluators["finetune"] = evaluator

  selected = stages["rst"]
  results = {
      "dataset": dataset.name, "model": config.model, "keep_ratios": list(config.keep_ratios),
      "num_params": int(sum(leaf.size for leaf in jax.tree.leaves(params))),
      "steps_per_epoch": context.steps_per_epoch, "epochs": config.epochs,
      "attack": {"train": dataclasses.asdict(attack), "eval": config.eval.to_dict()},
      "split_sizes": {split: int(len(getattr(dataset, split).labels))
                      for split in ("train", "val", "test")},
      "tickets": {name: _ticket_tables(context, stage, evaluators[name])
                  for name, stage in stages.items()},
      "r2s": evaluate_r2s(model_apply_fn, jax.jit(selected.subnetworks)(selected.best["params"]),
                          selected.best["batch_stats"], context.test, context.eval_key, config,
                          evaluator.attacks["pgd"]),
  }
  files.write_json(workdir / "results.json", results)
  report = report_lib.Report(workdir, f"RST + R2S: {config.model} on {dataset.name}")
  add_report_sections(report, results)
  report.write()
  return {**results, "stages": stages}


# ----------------------------------------------------------------------------------------------
# Report


_STAGE_TITLES = {"rst": "RST (adversarial search)", "natural": "natural search (edge-popup)",
                 "dense": "dense, adversarially trained", "finetune": "RST, fine-tuned"}


def _column_titles(steps: int) -> dict[str, str]:
  return {"clean": "clean", "pgd": f"PGD-{steps}", "cw": f"CW-{steps}", "apgd_ce": "APGD-CE",
          "apgd_dlr": "APGD-DLR"}


def ticket_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
  """One row per (stage, selection, member) with its test accuracies."""
  steps = results["attack"]["eval"]["pgd_steps"]
  titles = _column_titles(steps)
  rows = []
  for stage, tables in results["tickets"].items():
    for selection in SELECTIONS:
      table = tables[selection]
      for member in range(len(table["clean"])):
        row = {"network": _STAGE_TITLES[stage],
               "keep ratio": 1.0 if stage == "dense" else results["keep_ratios"][member],
               "checkpoint": selection if selection == "last" else
               f"best val PGD-{steps} (epoch {table['epoch'][member]})"}
        row.update({titles[column]: table[column][member]
                    for column in COLUMNS if column in table})
        rows.append(row)
  return rows


def r2s_rows(r2s: dict[str, Any], keep_ratios: list[float], steps: int) -> list[dict[str, Any]]:
  return [
      {"evaluation": "clean (expected over the switch)", "accuracy": r2s["clean"]},
      {"evaluation": f"(a) white-box PGD-{steps} on each single RST, mean of "
                     + ", ".join(f"{a:.3f}" for a in r2s["white_box"]),
       "accuracy": r2s["white_box_mean"]},
      {"evaluation": f"(b) transfer: PGD-{steps} crafted on RST i, evaluated on RST j != i "
                     f"(mean of {len(keep_ratios) * (len(keep_ratios) - 1)} pairs)",
       "accuracy": r2s["transfer_mean"]},
      {"evaluation": "(c) R2S vs an attacker who white-box attacks a randomly drawn RST",
       "accuracy": r2s["random_ticket_attacker"]},
      {"evaluation": f"(d) R2S vs adaptive EOT-PGD-{steps} ({r2s['eot_samples']} switch samples "
                     f"per step): the honest number", "accuracy": r2s["eot_attacker"]},
  ]


def findings(results: dict[str, Any]) -> str:
  """The paper's two claims, read off ``results``: inborn robustness and poor transfer."""
  steps = results["attack"]["eval"]["pgd_steps"]
  lines = []
  if "natural" in results["tickets"]:
    pairs = ", ".join(
        f"{ratio:g}: {adversarial:.3f} vs {natural:.3f}" for ratio, adversarial, natural in zip(
            results["keep_ratios"], results["tickets"]["rst"]["last"]["pgd"],
            results["tickets"]["natural"]["last"]["pgd"]))
    lines.append(f"- PGD-{steps} test accuracy, adversarially vs naturally searched ticket at "
                 f"the same keep ratio (last epoch): {pairs}.")
  r2s = results["r2s"]
  if len(results["keep_ratios"]) > 1:  # One ticket has no transfer to compare.
    lines.append(f"- Transfer between RSTs of different ratios: off-diagonal mean "
                 f"{r2s['transfer_mean']:.3f} vs white-box diagonal mean "
                 f"{r2s['white_box_mean']:.3f}; the adaptive EOT attacker leaves R2S "
                 f"{r2s['eot_attacker']:.3f}.")
  return "\n".join(lines)


def transfer_heatmap(matrix: Any, keep_ratios: list[float], steps: int) -> plt.Figure:
  """Matplotlib figure of the transfer matrix (rows: attacked ticket, columns: evaluated)."""
  matrix = np.asarray(matrix)
  fig, ax = plt.subplots(figsize=(4.5, 4), dpi=100)
  vmax = max(float(matrix.max()), 1e-6)
  image = ax.imshow(matrix, cmap="viridis", vmin=0.0, vmax=vmax)
  labels = [f"{ratio:g}" for ratio in keep_ratios]
  ax.set_xticks(range(len(labels)), labels)
  ax.set_yticks(range(len(labels)), labels)
  ax.set_xlabel("evaluated on RST (keep ratio)")
  ax.set_ylabel(f"PGD-{steps} crafted on RST (keep ratio)")
  for (row, column), value in np.ndenumerate(matrix):
    ax.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=8,
            color="k" if value > 0.6 * vmax else "w")  # legible on viridis' light end
  fig.colorbar(image, ax=ax, label="accuracy")
  fig.tight_layout()
  return fig


def add_report_sections(report: report_lib.Report, results: dict[str, Any]) -> None:
  """The RST + R2S section: per-ticket table, R2S table and the transfer heatmap."""
  attack = results["attack"]
  steps = attack["eval"]["pgd_steps"]
  # The attacks that ran (APGD-DLR needs 3 classes: the evaluator drops it on fewer).
  ran = results["tickets"]["rst"]["last"]
  attacks = [name for name in attack["eval"]["attacks"] if name in ran]
  attack_names = ", ".join(_column_titles(steps)[name] for name in attacks)
  stepped = " and ".join(name.upper() for name in ("pgd", "cw") if name in attacks)
  apgd = [name for name in attacks if name.startswith("apgd")]
  sizes = results["split_sizes"]
  report.section(
      "Robust Scratch Tickets and R2S",
      f"{results['model']} on {results['dataset']} (train {sizes['train']}, validation "
      f"{sizes['val']}, test {sizes['test']}); {len(results['keep_ratios'])} tickets of keep "
      f"ratios {results['keep_ratios']} drawn from one random network and searched as one "
      f"population for {results['epochs']} epochs with PGD-{attack['train']['num_steps']} "
      f"(eps {attack['train']['eps']:.4g}). Test accuracies under white-box attacks of eps "
      f"{attack['eval']['eps']:.4g}: {attack_names} ("
      + ", ".join([f"{stepped} step {attack['eval']['step_size']:.4g}"] * bool(stepped)
                  + [f"APGD {attack['eval']['apgd_steps']} steps"] * bool(apgd))
      + "). "
      f"Checkpoints: the last epoch, and per ticket the epoch of best PGD-{steps} accuracy on the "
      f"validation split (never the test split).")
  report.text(findings(results) + "\n")
  report.text(report_lib.markdown_table(ticket_rows(results), float_format="{:.3f}"))
  r2s = results["r2s"]
  report.text(f"\n**R2S** over the selected RSTs (switch {r2s['switch']}; accuracies are exact "
              f"expectations over the switch):\n")
  report.text(report_lib.markdown_table(
      r2s_rows(r2s, results["keep_ratios"], attack["eval"]["pgd_steps"]),
      float_format="{:.3f}"))
  report.figure("rst_transfer_matrix",
                transfer_heatmap(r2s["transfer_matrix"], results["keep_ratios"], steps),
                f"Transfer matrix: PGD-{steps} crafted on one RST, accuracy of another")


def demo_section(report: report_lib.Report, workdir: pathlib.Path) -> None:
  """The demo's RST + R2S section (the ``digits`` preset, run in ``workdir / "rst"``)."""
  results = train_and_evaluate(rst_configs.get_config("digits"), workdir / "rst")
  add_report_sections(report, results)


def main(argv: Sequence[str] | None = None) -> None:
  cli.main(train_and_evaluate, rst_configs, argv)


if __name__ == "__main__":
  main()
