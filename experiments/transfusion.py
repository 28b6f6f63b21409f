"""Transfusion: transfer learning vs random init on (medical) targets, with representation analysis.

Stages, each resumable in its own subdirectory of the workdir: ``pretrain/<model>/``, each model
trained on the source task (``config.source``; or ``source.checkpoint_dir``); then
``target/<model>/<regime>/``, every initialization arm x ``config.seeds`` trained on the target
as one population, on the full training split and on the reduced one (``.../slim/``: the slim
top, another architecture). Then each member's test ROC-AUC, steps to the convergence threshold,
and the (SV/PW)CCA of each unit's output: init vs trained, transfer vs random, two random seeds,
chance. Writes ``results.json`` (``"study": "transfusion"``) and ``filters.npz`` (first-layer
kernels) for ``experiments/reports/transfusion.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import pathlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments import build, cli
from experiments.configs import transfusion as configs
from jaxtickets import checkpoint, files, metrics, population, similarity
from jaxtickets import data as data_lib
from jaxtickets import train as train_lib
from jaxtickets import transfusion
from jaxtickets.errors import UserError
from jaxtickets.metrics import jsonable

PyTree = Any
_KEY_PURPOSES = ("pretrain", "model_init", "arm", "train", "similarity")  # Of config.seed.


def seed_key(config: ml_collections.ConfigDict, purpose: str, *indices: int) -> jax.Array:
  return build.seed_key(config.seed, _KEY_PURPOSES, purpose, *indices)


def load_task(settings: ml_collections.ConfigDict, classes: Sequence[int] | None,
              field: str) -> data_lib.Dataset:
  """The dataset of a training config, restricted to ``classes`` (the config's ``field``)."""
  dataset = build.dataset(settings)
  if classes is None:
    return dataset
  labels = tuple(classes) if isinstance(classes, (list, tuple)) else ()
  if len(labels) < 2 or not all(
      isinstance(label, numbers.Integral) and not isinstance(label, bool)
      and 0 <= label < dataset.num_classes for label in labels) or \
      len(set(map(int, labels))) != len(labels):
    raise UserError(f"{field}={classes!r}; expected a sequence of at least 2 distinct int labels "
                    f"in [0, {dataset.num_classes}) of {dataset.name}")
  return transfusion.class_subset(dataset, tuple(int(label) for label in labels))


def _variables(params: PyTree, batch_stats: PyTree) -> dict[str, PyTree]:
  return {"params": params, "batch_stats": batch_stats}


class SourceModel:
  """One architecture on the source task: its init, evaluation and pretrained checkpoints."""

  def __init__(self, config: ml_collections.ConfigDict, spec: configs.ModelSpec,
               source: data_lib.Dataset):
    self.config, self.spec, self.source = config, spec, source
    model = spec.build(source.num_classes)
    self.apply_fn = train_lib.model_apply_fn(model, source.mean, source.std)
    init_key, self.state_key = jax.random.split(
        seed_key(config, "pretrain", config.models.index(spec.name)))
    self.init = lambda: _variables(*train_lib.init_variables(init_key, model, source.image_shape))
    # Restoring needs shapes only; an init's compile (its PRNG calls) takes seconds on CPU.
    self.template = jax.eval_shape(self.init)

  def test_accuracy(self, variables: dict[str, PyTree]) -> float:
    """Accuracy on a stratified ``source.eval_size`` of the test split (one batch)."""
    test = self.source.test
    if self.config.source.eval_size < len(test.labels):
      test = data_lib.subsample(test, self.config.source.eval_size / len(test.labels),
                                seed=self.config.seed)
    evaluate = functools.partial(train_lib.evaluate, self.apply_fn, batch_size=len(test.labels))
    return float(jax.jit(evaluate)(variables["params"], variables["batch_stats"],
                                   train_lib.device_data(test))["accuracy"])

  def restore_given(self) -> tuple[dict[str, PyTree], int] | None:
    """The variables and step in ``source.checkpoint_dir/<model>[/pretrained]`` (a previous
    run's ``pretrain/``); None without one; UserError for a bad one."""
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
    """Trains in ``workdir/pretrain/<model>`` (resumable), keeping the variables in
    ``.../pretrained``; a finished run is restored."""
    directory = workdir / "pretrain" / self.spec.name
    with checkpoint.Checkpointer(directory / "pretrained", max_to_keep=1) as kept:
      if kept.latest_step() is not None:
        return kept.restore(self.template), kept.latest_step()
      state, _ = build.fit_model(
          self.config.source, self.apply_fn, self.state_key, *self.init().values(),
          self.source.train, workdir=directory, progress=progress,
          description=f"pretrain {self.spec.name} on {self.source.name}")
      kept.save(int(state.step), _variables(state.params, state.batch_stats))
      return _variables(state.params, state.batch_stats), int(state.step)


class PopulationRun(NamedTuple):
  """One population on the target: ``arms`` x seeds members M (member = arm * seeds + seed)."""
  arms: list[transfusion.Arm]
  model: Any  # The flax model (for the slim arm, the slim one).
  initial: dict[str, PyTree]  # The members' starting variables, leading axis M.
  final: train_lib.TrainState  # Trained, leading axis M.
  records: list[dict[str, Any]]  # loop.fit's evaluations: step, val_auc f[M], test_auc f[M].


# One compiled init per architecture, called per seed (XLA:CPU compiles a vmapped init slower).
_init = jax.jit(lambda key, model, image_shape: _variables(*train_lib.init_variables(
    key, model, image_shape)), static_argnums=(1, 2))


def train_population(config: ml_collections.ConfigDict, workdir: pathlib.Path,
                     spec: configs.ModelSpec, name: str, arms: list[transfusion.Arm],
                     train_split: data_lib.Split, *,
                     target: data_lib.Dataset, pretrained: dict[str, PyTree], model: Any,
                     progress: bool) -> PopulationRun:
  """``arms`` x seeds initialized from ``pretrained`` and each seed's random init of ``model``,
  trained as one population in ``workdir/target/<model>/<name>``."""
  steps_per_epoch = data_lib.steps_per_epoch(len(target.train.labels), config.batch_size)
  optimizer = build.optimizer(config, steps_per_epoch)

  @jax.jit
  def initialize(pretrained, fresh, arm_keys, train_keys):
    initial = transfusion.initialize_population(
        arms, arm_keys, pretrained, fresh, spec.block_names, norm_init=config.meanvar_norm_init)
    states = jax.vmap(lambda variables, key: train_lib.create_train_state(
        key, variables["params"], variables["batch_stats"], optimizer))(
            initial, jnp.tile(train_keys, (len(arms), 1)))
    return initial, states

  seeds, model_index = range(config.seeds), config.models.index(spec.name)
  fresh = population.stack([_init(seed_key(config, "model_init", model_index, s), model,
                                  tuple(target.image_shape)) for s in seeds])
  initial, states = initialize(pretrained, fresh,
                               jnp.stack([seed_key(config, "arm", model_index, s) for s in seeds]),
                               jnp.stack([seed_key(config, "train", s) for s in seeds]))
  apply_fn = train_lib.model_apply_fn(model, target.mean, target.std)
  splits = {"val": train_lib.device_data(target.val), "test": train_lib.device_data(target.test)}

  @jax.jit
  @jax.vmap
  def aucs(params, batch_stats):
    # Each split as one batch (a loop over batches runs XLA:CPU's convolutions slowly); the test
    # AUC rides along at every evaluation, only the last one is reported. Log-probabilities rank
    # as the one-vs-rest AUC needs and, unlike float32 softmax, do not saturate into ties.
    return {f"{split}_auc": metrics.roc_auc(jax.nn.log_softmax(train_lib.predict(
        apply_fn, params, batch_stats, data.images, batch_size=data.images.shape[0])),
        data.labels) for split, data in splits.items()}

  step = train_lib.make_train_step(apply_fn, optimizer, batch_size=config.batch_size,
                                   augment=build.augment(config))
  states, records = build.fit_population(
      config, step, states, train_lib.device_data(train_split),
      num_steps=config.epochs * steps_per_epoch, eval_every=config.eval_every_steps,
      evaluate=lambda states: aucs(states.params, states.batch_stats),
      workdir=workdir / "target" / spec.name / name, progress=progress,
      description=f"{spec.name} {name} ({len(arms) * config.seeds} members)",
      params=population.select(initial["params"], 0), model_name=spec.name)
  return PopulationRun(arms, model, initial, states, records)


def regime_results(config: ml_collections.ConfigDict, runs: Sequence[PopulationRun],
                   **extra: Any) -> dict[str, Any]:
  """Per arm of ``runs``: test AUC f[seeds], validation AUC f[T][seeds], steps to the threshold
  (``convergence_fraction`` of random's final mean validation AUC) and speed-up over random;
  ``extra`` entries go before the threshold."""
  arms = {}
  for run in runs:
    test = np.asarray(run.records[-1]["test_auc"]).reshape(len(run.arms), config.seeds)
    val = np.array([record["val_auc"] for record in run.records]).reshape(
        len(run.records), len(run.arms), config.seeds)
    arms.update({arm.name: {"test_auc": test[index], "val_auc": val[:, index]}
                 for index, arm in enumerate(run.arms)})
  steps = [record["step"] for record in runs[0].records]
  threshold = config.convergence_fraction * float(np.mean(arms["random"]["val_auc"][-1]))
  baseline = transfusion.steps_to_threshold(steps, arms["random"]["val_auc"], threshold)
  for arm in arms.values():
    reached = transfusion.steps_to_threshold(steps, arm["val_auc"], threshold)
    arm["steps_to_threshold"] = [None if math.isinf(s) else s for s in reached.tolist()]
    ratio = transfusion.speedup(baseline, reached)
    # None where a run of either arm never reached the threshold: no ratio of means then.
    arm["speedup"] = ratio if math.isfinite(ratio) and ratio > 0 else None
  return {"steps": steps, "arms": arms, **extra, "threshold": threshold}


def unit_outputs(model: Any, target: data_lib.Dataset):
  """Jitted ``(variables, images u8[B, H, W, C]) -> transfusion.unit_outputs``."""
  return jax.jit(lambda variables, images: transfusion.unit_outputs(
      model, variables, data_lib.normalize(data_lib.to_unit(images), target.mean, target.std)))


def check_similarity_shapes(config: ml_collections.ConfigDict,
                            specs: Sequence[configs.ModelSpec], target: data_lib.Dataset) -> None:
  """Raises UserError, from shapes alone (before training), when a unit's output on the probe
  has fewer datapoints than channels: CCA is undefined there."""
  if "transfer" not in config.arms:
    return
  settings = config.similarity
  batch = min(settings.probe_size, len(target.test.labels))
  given = (f"(similarity.probe_size={settings.probe_size}, "
           f"similarity.max_datapoints={settings.max_datapoints})")
  if settings.max_datapoints is not None and settings.max_datapoints < batch:
    raise UserError(f"max_datapoints={settings.max_datapoints} is below the batch size {batch} "
                    + given)
  probe = jax.ShapeDtypeStruct((batch, *target.image_shape), jnp.uint8)
  flatten = functools.partial(similarity.flatten_conv, max_datapoints=settings.max_datapoints)
  for spec in specs:
    model = spec.build(target.num_classes)
    variables = jax.eval_shape(lambda model=model: _variables(*train_lib.init_variables(
        jax.random.key(0), model, target.image_shape)))
    for name, output in jax.eval_shape(unit_outputs(model, target), variables, probe).items():
      rows, columns = (jax.eval_shape(flatten, output) if output.ndim == 4 else output).shape
      if rows < columns:
        raise UserError(f"layer '{spec.name} {name}' has fewer datapoints ({rows}) than neurons "
                        f"({columns}); CCA needs at least as many, better many more " + given)


def representation_similarity(config: ml_collections.ConfigDict, spec: configs.ModelSpec,
                              run: PopulationRun, target: data_lib.Dataset) -> dict | None:
  """Per method, pair and unit (lowest first): init vs trained (random, transfer), trained
  transfer vs random, two random seeds, and chance: two independent draws of ReLU'd Gaussian
  noise shaped like the unit's output (with few datapoints per neuron, unrelated
  representations score far above 0). Seed 0 of each arm; None without a transfer arm."""
  names = [arm.name for arm in run.arms]
  if "transfer" not in names:
    return None
  layers = [unit[-1] for unit in transfusion.transfer_units(spec.block_names)]
  outputs = unit_outputs(run.model, target)
  probe = target.test.images[:config.similarity.probe_size]

  def acts(arm: str, seed: int, trained: bool) -> dict[str, jax.Array]:
    variables = _variables(run.final.params, run.final.batch_stats) if trained else run.initial
    return outputs(population.select(variables, names.index(arm) * config.seeds + seed), probe)

  pairs = {"random_init_vs_trained": (acts("random", 0, False), acts("random", 0, True)),
           "transfer_init_vs_trained": (acts("transfer", 0, False), acts("transfer", 0, True)),
           "transfer_vs_random": (acts("transfer", 0, True), acts("random", 0, True))}
  if config.seeds > 1:
    pairs["random_vs_random"] = (acts("random", 0, True), acts("random", 1, True))
  pairs["chance"] = tuple(
      {layer: jax.nn.relu(jax.random.normal(jax.random.fold_in(key, index), output.shape))
       for index, (layer, output) in enumerate(pairs["random_init_vs_trained"][0].items())}
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


def _num_params(run: PopulationRun) -> int:
  return sum(leaf.size for leaf in jax.tree.leaves(population.select(run.initial["params"], 0)))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
                       progress: bool = True) -> dict[str, Any]:
  """Runs the study of ``config``, resuming from ``workdir``; returns the results written to
  ``workdir/results.json`` plus ``"runs"``: the :class:`PopulationRun` of each model and regime
  (``"slim"``: the slim population)."""
  specs = configs.check_config(config)
  source = load_task(config.source, config.source.classes, "source.classes")
  if config.source.train_fraction != 1:
    source = dataclasses.replace(source, train=data_lib.subsample(
        source.train, config.source.train_fraction, seed=config.seed))
  target = load_task(config, config.target_classes, "target_classes")
  target = data_lib.with_validation(target, config.val_fraction, seed=config.seed)
  splits = {"full": target.train}
  if config.reduced_fraction is not None:
    splits["reduced"] = data_lib.subsample(target.train, config.reduced_fraction,
                                           seed=config.seed)
  for split in splits.values():
    data_lib.steps_per_epoch(len(split.labels), config.batch_size)  # The batch fits each regime.
  channels = source.image_shape[-1], target.image_shape[-1]
  if channels[0] != channels[1] and 1 not in channels:  # adapt_input_channels' precondition.
    raise UserError(f"cannot adapt a first conv from {channels[0]} to {channels[1]} input "
                    f"channels (source {source.name}, target {target.name}); expected equal "
                    "counts, or one of them 1")
  sources = [SourceModel(config, spec, source) for spec in specs]
  # Bad given checkpoints and probe shapes are refused before the workdir is claimed.
  given = [source_model.restore_given() for source_model in sources]
  check_similarity_shapes(config, specs, target)
  workdir = checkpoint.claim_workdir(workdir, config.to_dict())

  sizes = {f"train_{regime}": len(split.labels) for regime, split in splits.items()}
  results = {
      "study": "transfusion",
      "source": {"dataset": source.name, "classes": source.num_classes,
                 "image_shape": list(source.image_shape), "models": {}},
      "target": {"dataset": target.name, "classes": target.num_classes,
                 "image_shape": list(target.image_shape),
                 "split_sizes": {**sizes, "val": len(target.val.labels),
                                 "test": len(target.test.labels)}},
      "steps": config.epochs * data_lib.steps_per_epoch(sizes["train_full"], config.batch_size),
      "eval_every_steps": config.eval_every_steps, "seeds": config.seeds,
      "convergence_fraction": config.convergence_fraction,
      "meanvar_norm_init": config.meanvar_norm_init, "models": {}, "similarity": {},
      "filters_model": None}
  runs: dict[str, dict[str, PopulationRun]] = {}
  for spec, source_model, restored in zip(specs, sources, given):
    variables, source_steps = restored or source_model.pretrain(workdir, progress=progress)
    results["source"]["models"][spec.name] = {
        "test_accuracy": source_model.test_accuracy(variables), "steps": int(source_steps)}
    pretrained = {**variables, "params": transfusion.adapt_input_channels(
        variables["params"], target.image_shape[-1])}
    train = functools.partial(train_population, config, workdir, spec, target=target,
                              pretrained=pretrained, progress=progress)
    runs[spec.name] = {}
    model_results = {"num_params": None, "options": spec.options, "regimes": {}}
    for regime, split in splits.items():
      regime_runs = [train(regime, configs.arms_of(config, spec, regime), split,
                           model=spec.build(target.num_classes))]
      runs[spec.name][regime] = regime_runs[0]
      model_results["num_params"] = _num_params(regime_runs[0])
      slim, extra = configs.slim_arm(config, spec, regime), {}
      if slim is not None:
        widths = transfusion.slim_unit_widths(pretrained["params"], spec.block_names,
                                              slim.num_blocks, config.slim_factor)
        regime_runs.append(train("slim", [slim], split,
                                 model=spec.build(target.num_classes, unit_widths=widths)))
        runs[spec.name]["slim"] = regime_runs[-1]
        extra = {"slim_unit_widths": list(widths), "slim_num_params": _num_params(regime_runs[-1])}
      model_results["regimes"][regime] = regime_results(config, regime_runs, **extra)
    results["models"][spec.name] = model_results
    full = runs[spec.name]["full"]
    results["similarity"][spec.name] = representation_similarity(config, spec, full, target)
    if spec.name == config.model or results["filters_model"] is None:
      # The stem kernels summed over input channels, f[k, k, C_out], of each member.
      stems = lambda params: np.asarray(params["stem"]["kernel"]).sum(axis=-2)  # noqa: E731
      filters = {"arms": [arm.name for arm in full.arms], "initial": stems(full.initial["params"]),
                 "trained": stems(full.final.params), "pretrained": stems(pretrained["params"])}
      results["filters_model"] = spec.name
  results = jsonable(results)
  np.savez(workdir / "filters.npz", **filters)
  files.write_json(workdir / "results.json", results)
  return {**results, "runs": runs}


def main(argv: Sequence[str] | None = None) -> None:
  cli.main("transfusion", train_and_evaluate, argv)


if __name__ == "__main__":
  main()
