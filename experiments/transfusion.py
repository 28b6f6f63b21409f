"""Transfusion: transfer learning vs random init on (medical) targets, with representation analysis.

``python -m experiments.transfusion --config breastmnist_cpu --workdir runs/transfusion`` runs,
each stage resumable in its own subdirectory of the workdir:

1. ``pretrain/<model>/``: each model trained on the source task (``config.source``); its
   variables are saved in ``pretrain/<model>/pretrained`` (``source.checkpoint_dir`` may point at
   such a folder from another run instead);
2. ``target/<model>/<regime>/``: every initialization arm x ``config.seeds`` trained on the
   target as one population, on the full training split and on the reduced one, with the
   validation ROC-AUC logged every ``eval_every_steps``; ``.../slim/`` holds the slim-top
   population (another architecture);
3. test ROC-AUC of every member, steps to the convergence threshold, and (SV/PW)CCA of each
   unit's activations: before vs after training, and trained-from-transfer vs
   trained-from-random against two random seeds.

``results.json`` and ``report.md`` (AUC table, convergence curves, CCA by layer, first-layer
filters, and the paper's findings with their numbers: transfer's AUC gain and convergence
speed-up per model and regime, and a verdict on whether lower layers and larger models change
less; the transfusion sweep and slim arms are in the table only) go into the workdir;
:func:`demo_section` adds the same section to the demo.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import ml_collections
import numpy as np

from experiments import build, cli
from experiments.configs import transfusion as transfusion_configs
from jaxtickets import checkpoint, errors, files, loop, metrics, models, population, similarity
from jaxtickets import data as data_lib
from jaxtickets import report as report_lib
from jaxtickets import train as train_lib
from jaxtickets import transfusion
from jaxtickets.errors import UserError
from jaxtickets.metrics import jsonable

PyTree = Any
REGIMES = ("full", "reduced")
MAIN_ARMS = ("random", "transfer", "meanvar", "gabor")
SWEEP_ARMS = ("transfusion", "slim", "gabor")
# Streams of randomness derived from the seed (see :func:`seed_key`).
_KEY_PURPOSES = ("pretrain", "model_init", "arm", "train", "similarity")
_MAX_FILTERS = 16


def seed_key(config: ml_collections.ConfigDict, purpose: str, *indices: int) -> jax.Array:
  """The PRNG key of ``config.seed`` for one of :data:`_KEY_PURPOSES`, folded with ``indices``."""
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), _KEY_PURPOSES.index(purpose))
  for index in indices:
    key = jax.random.fold_in(key, index)
  return key


# ----------------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """One architecture of the study: registry name and options (width, unit_widths, ...)."""
  name: str
  options: dict[str, Any]

  def build(self, num_classes: int, **overrides: Any):
    return models.get_model(self.name, num_classes=num_classes, **{**self.options, **overrides})

  @property
  def block_names(self) -> tuple[str, ...]:
    return tuple(self.build(2).block_names)


def model_specs(config: ml_collections.ConfigDict) -> list[ModelSpec]:
  """The models of ``config.models`` with their widths and the shared ``model_options``."""
  errors.check_sequence("models", config.models)
  errors.check_sequence("widths", config.widths)
  names, widths = tuple(config.models), tuple(config.widths)
  if not names or len(names) != len(widths):
    raise UserError(f"models={names!r} and widths={widths!r}; expected one width (or None) per "
                    "model, at least one model")
  errors.check_distinct("models", names, "each model trains once")
  specs = []
  for name, width in zip(names, widths):
    width_option = {} if width is None else {"width": width}
    spec = ModelSpec(name, build.model_options(config, **width_option))
    spec.build(2)  # Unknown names and options fail here, before any data is loaded.
    specs.append(spec)
  return specs


def arms_of(config: ml_collections.ConfigDict, spec: ModelSpec,
            regime: str) -> list[transfusion.Arm]:
  """The arms of one population: the main arms, plus the sweep on ``config.model`` (full only).

  The slim arm is not among them: it needs its own architecture (see :func:`slim_arm`).
  """
  arms = [transfusion.Arm(kind) for kind in config.arms]
  if spec.name == config.model and regime == "full":
    if "transfusion" in config.sweep_arms:
      arms += [transfusion.Arm("transfusion", k) for k in config.transfusion_blocks]
    if "gabor" in config.sweep_arms and "gabor" not in config.arms:
      arms.append(transfusion.Arm("gabor"))
  return arms


def slim_arm(config: ml_collections.ConfigDict, spec: ModelSpec,
             regime: str) -> transfusion.Arm | None:
  if spec.name == config.model and regime == "full" and "slim" in config.sweep_arms:
    return transfusion.Arm("slim", config.slim_blocks)
  return None


def check_config(config: ml_collections.ConfigDict) -> list[ModelSpec]:
  """Raises UserError for bad arms, block counts or settings before anything is loaded."""
  build.check_training(config)
  build.check_training(config.source, "source.")
  errors.check_int("source.eval_size", config.source.eval_size)
  errors.check_number("source.train_fraction", config.source.train_fraction, 0, 1, strict=True)
  data_lib.check_val_fraction("val_fraction", config.val_fraction)
  specs = model_specs(config)
  for field, allowed in (("arms", MAIN_ARMS), ("sweep_arms", SWEEP_ARMS)):
    errors.check_names(field, config[field], allowed, repeat="it would train identical members",
                       nonempty=field == "arms")
  if "transfusion" in config.sweep_arms:
    errors.check_sequence("transfusion_blocks", config.transfusion_blocks)
    for num_blocks in config.transfusion_blocks:  # Their range is the model's (checked below).
      errors.check_int("transfusion_blocks entry", num_blocks, minimum=0)
    errors.check_distinct("transfusion_blocks", config.transfusion_blocks,
                          "it would train identical members")
  if config.sweep_arms and config.model not in config.models:
    raise UserError(f"model={config.model!r} (the sweep model) is not among models="
                    f"{tuple(config.models)!r}")
  if "random" not in config.arms:
    raise UserError(f"arms={tuple(config.arms)!r}; 'random' is the baseline and must be one")
  arms_per_population = {}  # Of the regimes that run; times the seeds: the populations' sizes.
  for spec in specs:
    for regime in REGIMES:
      arms = arms_of(config, spec, regime)
      for arm in arms:
        if arm.num_blocks is not None:
          transfusion.check_num_blocks(arm.num_blocks, spec.block_names, arm=arm.kind)
      runs = regime == "full" or config.reduced_fraction is not None
      if runs:
        arms_per_population[f"{spec.name} {regime} (arms x seeds)"] = len(arms)
      if slim_arm(config, spec, regime) is not None:
        transfusion.check_num_blocks(config.slim_blocks, spec.block_names, arm="slim",
                                     minimum=1)
        errors.check_number("slim_factor", config.slim_factor, 1)
        if runs:
          arms_per_population[f"{spec.name} {regime} slim (seeds)"] = 1
  if config.meanvar_norm_init not in transfusion.NORM_INITS:
    raise UserError(f"unknown meanvar_norm_init {config.meanvar_norm_init!r}; known: "
                    f"{', '.join(transfusion.NORM_INITS)}")
  for name in ("seeds", "eval_every_steps"):
    errors.check_int(name, config[name])
  build.check_population_options(config)
  if config.reduced_fraction is not None:
    errors.check_number("reduced_fraction", config.reduced_fraction, 0, 1, strict=True)
    if config.reduced_fraction == 1:
      raise UserError("reduced_fraction=1 is the full regime; expected a value in (0, 1) or None")
  errors.check_number("convergence_fraction", config.convergence_fraction, 0, 1, strict=True)
  build.check_population_sizes(config, {name: count * config.seeds
                                       for name, count in arms_per_population.items()})
  settings = config.similarity
  if (isinstance(settings.methods, str) or not settings.methods
      or set(settings.methods) - set(similarity.METHODS)):
    raise UserError(f"similarity.methods={settings.methods!r}; expected one or more of "
                    f"{', '.join(similarity.METHODS)} (the figure and findings use the first)")
  errors.check_number("similarity.keep_variance", settings.keep_variance, 0, 1, strict=True)
  errors.check_int("similarity.probe_size", settings.probe_size)
  if settings.max_datapoints is not None:
    errors.check_int("similarity.max_datapoints", settings.max_datapoints)
  return specs


def load_task(settings: ml_collections.ConfigDict,
              classes: Sequence[int] | None) -> data_lib.Dataset:
  """The dataset of a training config (``dataset``, ``data_dir``, ``image_size``,
  ``normalization``), restricted to ``classes``."""
  dataset = data_lib.load_dataset(settings.dataset, data_dir=settings.data_dir,
                                  image_size=settings.image_size,
                                  normalization=settings.normalization)
  return transfusion.class_subset(dataset, classes)


def regime_splits(config: ml_collections.ConfigDict,
                  dataset: data_lib.Dataset) -> dict[str, data_lib.Split]:
  """The training split of each regime (the reduced one stratified, ``reduced_fraction``)."""
  splits = {"full": dataset.train}
  if config.reduced_fraction is not None:
    splits["reduced"] = data_lib.subsample(dataset.train, config.reduced_fraction,
                                           seed=config.seed)
  return splits


# ----------------------------------------------------------------------------------------------
# Pretraining


def _variables(params: PyTree, batch_stats: PyTree) -> dict[str, PyTree]:
  return {"params": params, "batch_stats": batch_stats}


class SourceModel:
  """One architecture on the source task: its init, evaluation and pretrained checkpoints."""

  def __init__(self, config: ml_collections.ConfigDict, spec: ModelSpec,
               source: data_lib.Dataset):
    self.config, self.spec, self.source = config, spec, source
    self.model = spec.build(source.num_classes)
    self.init_key, self.state_key = jax.random.split(
        seed_key(config, "pretrain", config.models.index(spec.name)))
    # Restoring needs shapes only; an init's compile (its PRNG calls) costs seconds on CPU.
    self.template = jax.eval_shape(self.init)
    self.apply_fn = train_lib.model_apply_fn(self.model, source.mean, source.std)

  def init(self) -> dict[str, PyTree]:
    return _variables(*train_lib.init_variables(self.init_key, self.model,
                                                self.source.image_shape))

  def test_accuracy(self, variables: dict[str, PyTree]) -> float:
    """Accuracy on a stratified random ``source.eval_size`` of the test split (one batch; not
    its first examples: a test split may be sorted by class, as the shared CIFAR-10 npz is)."""
    test = self.source.test
    if self.config.source.eval_size < len(test.labels):
      test = data_lib.subsample(test, self.config.source.eval_size / len(test.labels),
                                seed=self.config.seed)
    evaluate = functools.partial(train_lib.evaluate, self.apply_fn, batch_size=len(test.labels))
    return float(jax.jit(evaluate)(variables["params"], variables["batch_stats"],
                                   train_lib.device_data(test))["accuracy"])

  def restore_given(self) -> tuple[dict[str, PyTree], int] | None:
    """The variables and step of ``source.checkpoint_dir/<model>`` (or of its ``pretrained``
    folder: the layout of a previous run's ``pretrain/``), or None without one.

    Raises:
      UserError: the folder is missing or holds another architecture.
    """
    if self.config.source.checkpoint_dir is None:
      return None
    directory = pathlib.Path(self.config.source.checkpoint_dir) / self.spec.name
    if (directory / "pretrained").is_dir():
      directory = directory / "pretrained"
    if not directory.is_dir():
      raise UserError(f"no pretrained checkpoint for model {self.spec.name!r}: {directory} is "
                      "not a directory")
    with checkpoint.Checkpointer(directory) as saved:
      try:
        return saved.restore(self.template), saved.latest_step()
      except UserError as error:
        raise UserError(f"pretrained checkpoint {directory} is not a {self.spec.name} "
                        f"{self.spec.options} for {self.source.num_classes} source classes: "
                        f"{error}") from None

  def pretrain(self, workdir: pathlib.Path, *, progress: bool) -> tuple[dict[str, PyTree], int]:
    """Trains on the source in ``workdir/pretrain/<model>`` (resumable) and keeps the variables
    in ``.../pretrained``; a finished run is restored."""
    settings = self.config.source
    directory = workdir / "pretrain" / self.spec.name
    with checkpoint.Checkpointer(directory / "pretrained", max_to_keep=1) as kept:
      if kept.latest_step() is not None:
        return kept.restore(self.template), kept.latest_step()
      steps_per_epoch = data_lib.steps_per_epoch(len(self.source.train.labels),
                                                 settings.batch_size)
      steps = max(1, round(settings.epochs * steps_per_epoch))
      optimizer = build.optimizer(settings, steps_per_epoch)
      initial = self.init()
      state = train_lib.create_train_state(self.state_key, initial["params"],
                                           initial["batch_stats"], optimizer)
      step = train_lib.make_train_step(self.apply_fn, optimizer, batch_size=settings.batch_size,
                                       augment=build.augment(settings))
      state, _ = loop.fit(step, state, train_lib.device_data(self.source.train),
                          num_steps=steps, eval_every=min(steps_per_epoch, steps),
                          workdir=directory,
                          progress=progress,
                          description=f"pretrain {self.spec.name} on {self.source.name}")
      variables = _variables(state.params, state.batch_stats)
      kept.save(steps, variables)
      return variables, steps


# ----------------------------------------------------------------------------------------------
# Target training


@dataclasses.dataclass
class PopulationRun:
  """One population on the target: ``arms`` x ``seeds`` members (member = arm * seeds + seed).

  Attributes:
    arms: the arms, in member order.
    model: the flax model (for the slim arm, the slim one).
    initial: the members' starting variables (leading axis M).
    final: the trained TrainStates (leading axis M).
    records: the validation log of ``loop.fit``.
    test_auc: f[M] test ROC-AUC of the final members.
  """
  arms: list[transfusion.Arm]
  model: Any
  initial: dict[str, PyTree]
  final: train_lib.TrainState
  records: list[dict[str, Any]]
  test_auc: np.ndarray


@dataclasses.dataclass
class Context:
  """What every population of one run shares."""
  config: ml_collections.ConfigDict
  workdir: pathlib.Path
  target: data_lib.Dataset
  val: train_lib.Data
  test: train_lib.Data
  steps: int
  progress: bool


def _auc_fn(apply_fn: train_lib.ApplyFn, splits: dict[str, train_lib.Data]
            ) -> Callable[[PyTree, PyTree], dict[str, jax.Array]]:
  """``(params, batch_stats) -> {"<split>_auc": f32[M]}`` of a population (one compiled call).

  Each split is one batch: on XLA:CPU a loop over batches runs the convolutions slowly.
  """

  def aucs(params, batch_stats):
    # One-vs-rest AUC ranks probabilities (for more than two classes logits rank differently);
    # log-probabilities rank alike and do not saturate into ties as float32 softmax does.
    return {f"{name}_auc": metrics.roc_auc(jax.nn.log_softmax(
        train_lib.predict(apply_fn, params, batch_stats, data.images,
                          batch_size=data.images.shape[0])), data.labels)
            for name, data in splits.items()}

  return jax.jit(jax.vmap(aucs))


def fresh_variables(config: ml_collections.ConfigDict, spec: ModelSpec, model: Any,
                    image_shape: Sequence[int]) -> dict[str, PyTree]:
  """The random init of each seed (leading axis ``config.seeds``).

  One compiled init called per seed: XLA:CPU compiles a vmapped init's PRNG calls ~3x slower.
  """
  model_index = config.models.index(spec.name)
  init = jax.jit(lambda key: _variables(*train_lib.init_variables(key, model, image_shape)))
  return population.stack([init(seed_key(config, "model_init", model_index, seed))
                           for seed in range(config.seeds)])


def train_population(context: Context, spec: ModelSpec, name: str,
                     arms: list[transfusion.Arm], train_split: data_lib.Split,
                     pretrained: dict[str, PyTree], model: Any, fresh: dict[str, PyTree]
                     ) -> PopulationRun:
  """Initializes ``arms`` x seeds from ``fresh`` (per seed) and ``pretrained``, and trains them
  as one population in ``workdir/target/<model>/<name>``."""
  config = context.config
  target = context.target
  block_names = spec.block_names
  model_index = config.models.index(spec.name)
  seeds = range(config.seeds)
  steps_per_epoch = data_lib.steps_per_epoch(len(target.train.labels), config.batch_size)
  optimizer = build.optimizer(config, steps_per_epoch)

  def seed_members(pretrained, fresh, arm_key):
    """Every arm's starting variables for one seed: the same fresh draw under each arm."""
    return [transfusion.initialize(arm, arm_key, pretrained, fresh, block_names,
                                   norm_init=config.meanvar_norm_init) for arm in arms]

  @jax.jit
  def initialize(pretrained, fresh, arm_keys, train_keys):
    per_arm = jax.vmap(seed_members, in_axes=(None, 0, 0))(pretrained, fresh, arm_keys)
    initial = jax.tree.map(lambda *leaves: jnp.concatenate(leaves), *per_arm)
    states = jax.vmap(lambda variables, key: train_lib.create_train_state(
        key, variables["params"], variables["batch_stats"], optimizer))(
            initial, jnp.tile(train_keys, (len(arms), 1)))
    return initial, states

  initial, states = initialize(
      pretrained, fresh, jnp.stack([seed_key(config, "arm", model_index, s) for s in seeds]),
      jnp.stack([seed_key(config, "train", s) for s in seeds]))
  apply_fn = train_lib.model_apply_fn(model, target.mean, target.std)
  step = train_lib.make_train_step(apply_fn, optimizer, batch_size=config.batch_size,
                                   augment=build.augment(config))
  options = build.population_options(config, population.select(initial["params"], 0),
                                     spec.name)
  # The test AUC is logged at every evaluation too: one compiled call serves both splits; only
  # the last one is reported, and nothing is selected on it.
  aucs = _auc_fn(apply_fn, {"val": context.val, "test": context.test})
  states, records = loop.fit(
      population.run(step, **options), states, train_lib.device_data(train_split),
      num_steps=context.steps, eval_every=config.eval_every_steps,
      evaluate=lambda states: aucs(states.params, states.batch_stats),
      workdir=context.workdir / "target" / spec.name / name, progress=context.progress,
      description=f"{spec.name} {name} ({len(arms) * config.seeds} members)")
  return PopulationRun(arms, model, initial, states, records,
                       np.asarray(records[-1]["test_auc"]))


def arm_results(config: ml_collections.ConfigDict, run: PopulationRun) -> dict[str, dict]:
  """Per arm: per-seed test AUC and the validation curve (f[T][seeds])."""
  val = np.array([record["val_auc"] for record in run.records]).reshape(
      len(run.records), len(run.arms), config.seeds)
  return {arm.name: {"test_auc": run.test_auc.reshape(len(run.arms), config.seeds)[index],
                     "val_auc": val[:, index]}
          for index, arm in enumerate(run.arms)}


def add_convergence(config: ml_collections.ConfigDict, regime: dict[str, Any]) -> None:
  """Adds the threshold, each arm's steps to it and speed-up over random, to ``regime``."""
  steps = regime["steps"]
  arms = regime["arms"]
  random_final = float(np.mean(np.asarray(arms["random"]["val_auc"])[-1]))
  threshold = config.convergence_fraction * random_final
  regime["threshold"] = threshold
  baseline = transfusion.steps_to_threshold(steps, np.asarray(arms["random"]["val_auc"]),
                                            threshold)
  for arm in arms.values():
    reached = transfusion.steps_to_threshold(steps, np.asarray(arm["val_auc"]), threshold)
    arm["steps_to_threshold"] = [None if math.isinf(s) else s for s in reached.tolist()]
    ratio = transfusion.speedup(baseline, reached)
    # None where a run of either arm never reached the threshold: no ratio of means then.
    arm["speedup"] = ratio if math.isfinite(ratio) and ratio > 0 else None


# ----------------------------------------------------------------------------------------------
# Representations


def unit_outputs(model: Any, names: Sequence[str], mean: Sequence[float], std: Sequence[float]
                 ) -> Callable[[dict[str, PyTree], jax.Array], dict[str, jax.Array]]:
  """Jitted ``(variables, images u8[B, H, W, C]) -> {unit: f32[B, ...]}`` of the units' last
  modules, with batch statistics (the probe batch normalizes every network alike, also an
  untrained one whose running statistics are still 0 / 1)."""

  @jax.jit
  def outputs(variables, images):
    x = data_lib.normalize(data_lib.to_unit(images), mean, std)
    acts = models.block_outputs(model, variables, x, train=True)
    return {name: acts[name].astype(jnp.float32) for name in names}

  return outputs


def check_similarity_shapes(config: ml_collections.ConfigDict, specs: Sequence[ModelSpec],
                            target: data_lib.Dataset) -> None:
  """Raises UserError when a unit's output on the probe has fewer datapoints than channels
  (CCA undefined), from shapes alone, so that a run does not fail after all its training."""
  if "transfer" not in config.arms:
    return
  settings = config.similarity
  probe = jax.ShapeDtypeStruct(
      (min(settings.probe_size, len(target.test.labels)), *target.image_shape), jnp.uint8)
  for spec in specs:
    model = spec.build(target.num_classes)
    layers = [unit[-1] for unit in transfusion.transfer_units(spec.block_names)]
    variables = jax.eval_shape(lambda model=model: _variables(*train_lib.init_variables(
        jax.random.key(0), model, target.image_shape)))
    outputs = jax.eval_shape(unit_outputs(model, layers, target.mean, target.std), variables,
                             probe)
    try:
      similarity.check_layer_shapes({f"{spec.name} {name}": output.shape
                                     for name, output in outputs.items()},
                                    max_datapoints=settings.max_datapoints)
    except UserError as error:
      raise UserError(f"{error} (similarity.probe_size={settings.probe_size}, "
                      f"similarity.max_datapoints={settings.max_datapoints})") from None


def representation_similarity(config: ml_collections.ConfigDict, spec: ModelSpec,
                              run: PopulationRun, probe: np.ndarray,
                              target: data_lib.Dataset) -> dict[str, Any] | None:
  """Per unit: CCA of init vs trained (random, transfer), transfer vs random, random vs random,
  and the chance level: two independent draws of ReLU'd Gaussian noise shaped like the unit's
  output. With few datapoints per neuron (small probes, late units' small maps) unrelated
  representations score far above 0, so values are read against that level.

  Uses seed 0 of each arm (seed 1 of random for the two-seed baseline). None without a random
  or a transfer arm.
  """
  names = [arm.name for arm in run.arms]
  if "transfer" not in names:
    return None
  units = transfusion.transfer_units(spec.block_names)
  layers = [unit[-1] for unit in units]
  outputs = unit_outputs(run.model, layers, target.mean, target.std)

  def member(tree: PyTree, arm: str, seed: int) -> PyTree:
    return population.select(tree, names.index(arm) * config.seeds + seed)

  def acts(arm: str, seed: int, trained: bool) -> dict[str, jax.Array]:
    variables = (_variables(member(run.final.params, arm, seed),
                            member(run.final.batch_stats, arm, seed)) if trained
                 else member(run.initial, arm, seed))
    return outputs(variables, probe)

  pairs = {"random_init_vs_trained": (acts("random", 0, False), acts("random", 0, True)),
           "transfer_init_vs_trained": (acts("transfer", 0, False), acts("transfer", 0, True)),
           "transfer_vs_random": (acts("transfer", 0, True), acts("random", 0, True))}
  if config.seeds > 1:
    pairs["random_vs_random"] = (acts("random", 0, True), acts("random", 1, True))
  shaped_like = pairs["random_init_vs_trained"][0]
  pairs["chance"] = tuple(
      {layer: jax.nn.relu(jax.random.normal(jax.random.fold_in(key, index), output.shape))
       for index, (layer, output) in enumerate(shaped_like.items())}
      for key in jax.random.split(seed_key(config, "similarity")))
  result = {"layers": layers}
  for method in config.similarity.methods:
    result[method] = {}
    for pair, (a, b) in pairs.items():
      by_layer = similarity.layerwise_similarity(
          a, b, method, keep_variance=config.similarity.keep_variance,
          max_datapoints=config.similarity.max_datapoints)
      # By name: the jitted outputs' dicts come back in sorted key order, not forward order.
      result[method][pair] = [by_layer[layer] for layer in layers]
  return result


def first_layer_filters(run: PopulationRun, seeds: int,
                        pretrained: dict[str, PyTree]) -> dict[str, np.ndarray]:
  """``stem`` kernels summed over input channels, f[k, k, C_out], of the filter figure's rows."""
  names = [arm.name for arm in run.arms]

  def stem(params: PyTree) -> np.ndarray:
    return np.asarray(params["stem"]["kernel"]).sum(axis=-2)

  def member(tree: PyTree, arm: str) -> PyTree:
    return population.select(tree, names.index(arm) * seeds)

  rows = {"random init": stem(member(run.initial["params"], "random")),
          "random, trained": stem(member(run.final.params, "random"))}
  if "transfer" in names:
    rows["pretrained (source)"] = stem(pretrained["params"])
    rows["transfer, trained"] = stem(member(run.final.params, "transfer"))
  for arm, title in (("meanvar", "Mean-Var init"), ("gabor", "Gabor init")):
    if arm in names:
      rows[title] = stem(member(run.initial["params"], arm))
  return rows


# ----------------------------------------------------------------------------------------------
# The run


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
                       progress: bool = True) -> dict[str, Any]:
  """Runs the whole study of ``config`` (see module docstring); resumes from ``workdir``.

  Returns:
    The results written to ``workdir/results.json``, plus ``"runs"``: the
    :class:`PopulationRun` of each model and regime (``"slim"`` for the slim population).
  """
  specs = check_config(config)
  settings = config.source
  source = load_task(settings, settings.classes)
  if settings.train_fraction != 1:
    source = dataclasses.replace(source, train=data_lib.subsample(
        source.train, settings.train_fraction, seed=config.seed))
  target = load_task(config, config.target_classes)
  target = data_lib.with_validation(target, config.val_fraction, seed=config.seed)
  train_splits = regime_splits(config, target)
  for regime, split in train_splits.items():
    data_lib.steps_per_epoch(len(split.labels), config.batch_size)  # batch fits every regime
  sources = [SourceModel(config, spec, source) for spec in specs]
  # Given checkpoints and the similarity's shapes are checked before the workdir is claimed:
  # bad input writes nothing (and trains nothing).
  given = [source_model.restore_given() for source_model in sources]
  check_similarity_shapes(config, specs, target)
  workdir = checkpoint.claim_workdir(workdir, config.to_dict())
  context = Context(
      config=config, workdir=workdir, target=target, val=train_lib.device_data(target.val),
      test=train_lib.device_data(target.test),
      steps=config.epochs * data_lib.steps_per_epoch(len(target.train.labels), config.batch_size),
      progress=progress)
  probe = target.test.images[:config.similarity.probe_size]

  results = {
      "source": {"dataset": source.name, "classes": source.num_classes,
                 "image_shape": list(source.image_shape), "models": {}},
      "target": {"dataset": target.name, "classes": target.num_classes,
                 "image_shape": list(target.image_shape),
                 "split_sizes": {**{f"train_{regime}": len(split.labels)
                                    for regime, split in train_splits.items()},
                                 "val": len(target.val.labels), "test": len(target.test.labels)}},
      "steps": context.steps, "eval_every_steps": config.eval_every_steps,
      "seeds": config.seeds, "convergence_fraction": config.convergence_fraction,
      "meanvar_norm_init": config.meanvar_norm_init, "models": {}, "similarity": {},
      "filters_model": None,
  }
  runs: dict[str, dict[str, PopulationRun]] = {}
  filters = None
  for spec, source_model, restored in zip(specs, sources, given):
    source_variables, source_steps = restored or source_model.pretrain(workdir,
                                                                       progress=progress)
    source_summary = {"test_accuracy": source_model.test_accuracy(source_variables),
                      "steps": int(source_steps)}
    pretrained = {**source_variables, "params": transfusion.adapt_input_channels(
        source_variables["params"], target.image_shape[-1])}
    results["source"]["models"][spec.name] = source_summary
    runs[spec.name] = {}
    model_results = {"num_params": None, "options": spec.options, "regimes": {}}
    model = spec.build(target.num_classes)
    fresh = fresh_variables(config, spec, model, target.image_shape)
    for regime, split in train_splits.items():
      run = train_population(context, spec, regime, arms_of(config, spec, regime), split,
                             pretrained, model, fresh)
      runs[spec.name][regime] = run
      model_results["num_params"] = int(sum(
          leaf.size for leaf in jax.tree.leaves(population.select(run.initial["params"], 0))))
      regime_results = {"steps": [record["step"] for record in run.records],
                        "arms": arm_results(config, run)}
      slim = slim_arm(config, spec, regime)
      if slim is not None:
        widths = transfusion.slim_unit_widths(pretrained["params"], spec.block_names,
                                              slim.num_blocks, config.slim_factor)
        slim_model = spec.build(target.num_classes, unit_widths=widths)
        slim_run = train_population(
            context, spec, "slim", [slim], split, pretrained, slim_model,
            fresh_variables(config, spec, slim_model, target.image_shape))
        runs[spec.name]["slim"] = slim_run
        regime_results["arms"].update(arm_results(config, slim_run))
        regime_results["slim_unit_widths"] = list(widths)
        regime_results["slim_num_params"] = int(sum(leaf.size for leaf in jax.tree.leaves(
            population.select(slim_run.initial["params"], 0))))
      add_convergence(config, regime_results)
      model_results["regimes"][regime] = regime_results
    results["models"][spec.name] = model_results
    full = runs[spec.name]["full"]
    results["similarity"][spec.name] = representation_similarity(config, spec, full, probe,
                                                                 target)
    if spec.name == config.model or filters is None:
      filters = first_layer_filters(full, config.seeds, pretrained)
      results["filters_model"] = spec.name
  results = jsonable(results)
  files.write_json(workdir / "results.json", results)
  report = report_lib.Report(workdir, f"Transfusion: {source.name} -> {target.name}")
  add_report_sections(report, results, filters)
  report.write()
  return {**results, "runs": runs, "filters": filters}


# ----------------------------------------------------------------------------------------------
# Report


def _mean_std(values: Sequence[float] | None) -> str:
  if values is None:
    return ""
  values = np.asarray(values, np.float64)
  return f"{values.mean():.3f} ± {values.std():.3f}"


def _mean_steps(values: Sequence[float | None]) -> str:
  reached = [v for v in values if v is not None]
  if len(reached) < len(values):
    return f"{len(values) - len(reached)}/{len(values)} never" + (
        f"; others {np.mean(reached):.0f}" if reached else "")
  return f"{np.mean(reached):.0f}"


def auc_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
  """One row per (model, arm): test AUC (mean ± std over seeds) per regime, and convergence."""
  rows = []
  for model, model_results in results["models"].items():
    regimes = model_results["regimes"]
    arm_names = list(dict.fromkeys(arm for regime in regimes.values() for arm in regime["arms"]))
    for arm in arm_names:
      row = {"model": model, "arm": arm}
      for regime, regime_results in regimes.items():
        arm_results = regime_results["arms"].get(arm)
        row[f"test AUC ({regime})"] = _mean_std(arm_results and arm_results["test_auc"])
      full = regimes["full"]["arms"].get(arm)
      if full is not None:
        row["steps to threshold (full)"] = _mean_steps(full["steps_to_threshold"])
        row["speed-up vs random (full)"] = ("" if full["speedup"] is None
                                            else f"{full['speedup']:.2f}x")
      rows.append(row)
  return rows


def _auc_gain(results: dict[str, Any], model: str, regime: str, arm: str) -> float | None:
  regimes = results["models"][model]["regimes"]
  if regime not in regimes or arm not in regimes[regime]["arms"]:
    return None
  arms = regimes[regime]["arms"]
  return float(np.mean(arms[arm]["test_auc"]) - np.mean(arms["random"]["test_auc"]))


def findings(results: dict[str, Any]) -> str:
  """The paper's findings on final AUC and convergence (numbers), and on how much each layer
  and model changes (numbers and a verdict), read off ``results``."""
  lines = []
  gains = []
  for model, model_results in results["models"].items():
    parts = []
    for regime in model_results["regimes"]:
      gain = _auc_gain(results, model, regime, "transfer")
      if gain is not None:
        parts.append(f"{regime} {gain:+.3f}")
        gains.append((model, regime, gain))
    if parts:
      lines.append(f"  - {model} ({model_results['num_params']:,} params): "
                   + ", ".join(parts))
  if lines:
    lines.insert(0, "- **Transfer vs random init** (test AUC of transfer minus random, mean "
                    "over seeds):")
  speedups = []
  for model, model_results in results["models"].items():
    arms = model_results["regimes"]["full"]["arms"]
    for arm in ("meanvar", "transfer"):
      if arm in arms:
        value = arms[arm]["speedup"]
        speedups.append(f"{model} {arm} {'n/a' if value is None else f'{value:.2f}x'}")
  if speedups:
    lines.append(f"- **Convergence speed-up over random init** (steps until the validation AUC "
                 f"reaches {results['convergence_fraction']:.0%} of random init's final one, "
                 f"full data, measured every {results['eval_every_steps']} steps): "
                 + "; ".join(speedups) + ".")
  changes, by_size = [], []
  method = similarity_method(results)
  for model, result in results["similarity"].items():
    if result is None:
      continue
    curves = result[method]
    # Above chance: unrelated representations of few datapoints per neuron score well above 0.
    above = np.asarray(curves["random_init_vs_trained"]) - np.asarray(curves["chance"])
    half = max(len(above) // 2, 1)
    lower, upper = above[:half].mean(), above[half:].mean()
    listed = "; ".join(f"{arm} " + ", ".join(f"{value:.2f}" for value in curves[pair])
                       for arm, pair in (("random", "random_init_vs_trained"),
                                         ("transfer", "transfer_init_vs_trained"),
                                         ("chance", "chance")))
    changes.append(f"{model}: {listed} (random init, seed 0, above chance: lower half "
                   f"{lower:.3f} vs upper half {upper:.3f}, "
                   f"{_verdict(lower > upper, above)})")
    by_size.append((results["models"][model]["num_params"], model, above.mean()))
  if changes:
    lines.append(f"- **Do lower layers change less?** {method.upper()} of each unit (lowest "
                 "first) before vs after training (higher = changed less; chance: independent "
                 "noise of the unit's shape): " + " | ".join(changes) + ".")
  if len(by_size) > 1:
    by_size.sort()
    means = [mean for _, _, mean in by_size]
    confirmed = all(smaller < larger for smaller, larger in zip(means, means[1:]))
    lines.append("- **Do larger models change less?** Mean over units of the similarity above "
                 "chance (random init, seed 0), smallest model first: "
                 + ", ".join(f"{model} ({size:,} params) {mean:.3f}"
                             for size, model, mean in by_size)
                 + f": {_verdict(confirmed, means)}.")
  return "\n".join(lines)


def _verdict(confirmed: bool, values: Any) -> str:
  """"confirmed" or "NOT confirmed", or "undefined" when the similarities it was read from
  hold a NaN (a unit whose activations are constant, where CCA is undefined)."""
  if np.isnan(np.asarray(values, np.float64)).any():
    return "undefined (a unit's activations are constant on the probe)"
  return "confirmed" if confirmed else "NOT confirmed"


def convergence_figure(results: dict[str, Any]) -> plt.Figure:
  """Validation AUC vs step, mean over seeds: one panel per (model, regime)."""
  panels = [(model, regime) for model, model_results in results["models"].items()
            for regime in model_results["regimes"]]
  columns = min(2, len(panels))
  rows = -(-len(panels) // columns)
  fig, axes = plt.subplots(rows, columns, figsize=(5.5 * columns, 3.6 * rows), dpi=100,
                           squeeze=False)
  for ax, (model, regime) in zip(axes.flat, panels):
    regime_results = results["models"][model]["regimes"][regime]
    for arm, arm_results in regime_results["arms"].items():
      ax.plot(regime_results["steps"], np.mean(arm_results["val_auc"], axis=1), marker="o",
              markersize=2, label=arm)
    ax.axhline(regime_results["threshold"], color="gray", linestyle=":", linewidth=1)
    ax.set_title(f"{model}, {regime} data")
    ax.set_xlabel("step")
    ax.set_ylabel("validation ROC-AUC")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  for ax in list(axes.flat)[len(panels):]:
    ax.axis("off")
  fig.tight_layout()
  return fig


_PAIR_TITLES = {"random_init_vs_trained": "random: init vs trained",
                "transfer_init_vs_trained": "transfer: init vs trained",
                "transfer_vs_random": "trained transfer vs trained random",
                "random_vs_random": "trained random vs random (2 seeds)",
                "chance": "independent noise (chance level)"}


def similarity_method(results: dict[str, Any]) -> str | None:
  """The first configured similarity method (the one the findings and the figure show)."""
  for result in results["similarity"].values():
    if result:
      return next(key for key in result if key != "layers")
  return None


def similarity_figure(results: dict[str, Any], method: str) -> plt.Figure:
  """``method`` similarity by unit (lowest left), one panel per model."""
  entries = [(model, result) for model, result in results["similarity"].items() if result]
  fig, axes = plt.subplots(1, len(entries), figsize=(5.5 * len(entries), 3.8), dpi=100,
                           squeeze=False)
  for ax, (model, result) in zip(axes.flat, entries):
    for pair, values in result[method].items():
      style = {"color": "gray", "linestyle": ":"} if pair == "chance" else {}
      ax.plot(range(len(values)), values, marker="o", markersize=3, label=_PAIR_TITLES[pair],
              **style)
    ax.set_xticks(range(len(result["layers"])), result["layers"], rotation=45, ha="right",
                  fontsize=7)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel(method.upper())
    ax.set_title(model)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  return fig


def filter_figure(rows: dict[str, np.ndarray]) -> plt.Figure:
  """First-layer filters (kernels summed over input channels), one row per network."""
  count = min(_MAX_FILTERS, min(kernels.shape[-1] for kernels in rows.values()))
  fig, axes = plt.subplots(len(rows), count, figsize=(0.8 * count + 1.6, 0.9 * len(rows)),
                           dpi=100, squeeze=False)
  for row, (title, kernels) in zip(axes, rows.items()):
    for index, ax in enumerate(row):
      kernel = kernels[..., index]
      bound = max(float(np.abs(kernel).max()), 1e-12)
      ax.imshow(kernel, cmap="gray", vmin=-bound, vmax=bound)
      ax.set_xticks([])
      ax.set_yticks([])
    row[0].set_ylabel(title, rotation=0, ha="right", va="center", fontsize=7)
  fig.tight_layout()
  return fig


def add_report_sections(report: report_lib.Report, results: dict[str, Any],
                        filters: dict[str, np.ndarray] | None = None) -> None:
  """The Transfusion section: findings, AUC table, convergence, CCA by layer, filters."""
  source, target = results["source"], results["target"]
  sizes = target["split_sizes"]
  pretrained = ", ".join(f"{model} {summary['test_accuracy']:.3f}"
                         for model, summary in source["models"].items())
  report.section(
      "Transfusion: transfer learning vs random init",
      f"Source {source['dataset']} ({source['classes']} classes, "
      f"{'x'.join(map(str, source['image_shape']))}); source test accuracy after pretraining: "
      f"{pretrained}. Target {target['dataset']} ({target['classes']} classes, "
      f"{'x'.join(map(str, target['image_shape']))}; train {sizes['train_full']}"
      + (f", reduced {sizes['train_reduced']}" if "train_reduced" in sizes else "")
      + f", validation {sizes['val']}, test {sizes['test']}). Every arm trains "
      f"{results['steps']} steps in both regimes, {results['seeds']} seeds per arm as one "
      f"population; test ROC-AUC of the last step (one-vs-rest macro average for more than two "
      f"classes). Mean-Var BatchNorm choice: {results['meanvar_norm_init']}.")
  report.text(findings(results) + "\n")
  report.text(report_lib.markdown_table(auc_rows(results)))
  report.figure("transfusion_convergence", convergence_figure(results),
                "Validation ROC-AUC during training (mean over seeds; dotted: the convergence "
                "threshold)")
  method = similarity_method(results)
  if method is not None:
    report.figure("transfusion_cca_by_layer", similarity_figure(results, method),
                  f"{method.upper()} by unit (lowest left) on target test images")
  if filters:
    report.figure("transfusion_conv1_filters", filter_figure(filters),
                  f"First-layer filters of {results['filters_model']} (seed 0)")


def demo_section(report: report_lib.Report, workdir: pathlib.Path) -> None:
  """The demo's Transfusion section (the ``digits`` preset, run in ``workdir / "transfusion"``)."""
  results = train_and_evaluate(transfusion_configs.get_config("digits"),
                               workdir / "transfusion")
  add_report_sections(report, results, results["filters"])


def main(argv: Sequence[str] | None = None) -> None:
  cli.main(train_and_evaluate, transfusion_configs, argv)


if __name__ == "__main__":
  main()
