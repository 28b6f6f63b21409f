"""Dataset distillation: Acc-DD (model augmentation) and the DC, DSA, DM and IDC baselines.

``python -m experiments.distill --config cifar10_ipc10 --workdir runs/accdd [--set method=idc]``
runs, each stage resumable in its own subdirectory of the workdir:

1. ``pool/`` (Acc-DD only): the early-stage nets, pretrained on the real data as one population;
2. ``distill/``: the distillation, one ``loop.fit`` step per inner iteration (or per
   ``trajectory_chunk`` outer iterations), the synthetic set (and its optimizer and current nets)
   checkpointed every ``checkpoint_every`` outer iterations;
3. ``evaluate/``: N fresh nets trained on the decoded synthetic set as one population;
   ``evaluate_random/``: the same on IPC random real images per class (the baseline of the same
   size).

It writes ``synthetic.npz`` (stored images f32[K, ipc, H, W, C] in [0, 1], labels, factor),
``synthetic.png`` (one row per class), ``results.json`` and ``report.md`` into the workdir;
:func:`demo_section` adds the report section to the demo. Wall times are each stage's training
time with compilation, summed over the processes that ran it (``loop.fit``'s records), so a
resumed run reports what the whole stage cost.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import matplotlib.pyplot as plt
import ml_collections
import numpy as np

from experiments import build, cli
from experiments.configs import distill as distill_configs
from jaxtickets import checkpoint, errors, files, loop, population
from jaxtickets import data as data_lib
from jaxtickets import report as report_lib
from jaxtickets import train as train_lib
from jaxtickets.distill import augment_models, dsa, evaluate, matching, methods, synthetic

PyTree = Any
# What each stream of randomness derived from the seed is for (see :func:`seed_key`).
_KEY_PURPOSES = ("pool", "distill", "nets", "evaluate", "evaluate_random")


def seed_key(config: ml_collections.ConfigDict, purpose: str) -> jax.Array:
  """The raw (checkpointable) PRNG key of ``config.seed`` for one of :data:`_KEY_PURPOSES`."""
  return jax.random.fold_in(jax.random.PRNGKey(config.seed), _KEY_PURPOSES.index(purpose))


def _without_flip(strategy: str) -> str:
  return "_".join(op for op in strategy.split("_") if op != "flip") or "none"


def method_of(config: ml_collections.ConfigDict) -> methods.Method:
  """The config's method with its non-None ``method_overrides`` (and without flips where
  ``config.flip`` is off)."""
  overrides = {name: value for name, value in config.method_overrides.to_dict().items()
               if value is not None}
  method = methods.get_method(config.method, config.ipc, **overrides)
  if config.flip:
    return method
  return dataclasses.replace(method, match_strategy=_without_flip(method.match_strategy),
                             net_strategy=_without_flip(method.net_strategy))


def outer_iterations(config: ml_collections.ConfigDict, method: methods.Method) -> int:
  """``config.outer_iterations``, or the method's divided by ``num_models`` (same model-steps)."""
  if config.outer_iterations is not None:
    errors.check_int("outer_iterations", config.outer_iterations)
    return config.outer_iterations
  return math.ceil(method.outer_iterations / config.num_models)


def protocol_of(config: ml_collections.ConfigDict) -> evaluate.Protocol:
  settings = config.eval
  strategy = settings.strategy
  if not config.flip and isinstance(strategy, str):  # Otherwise the Protocol refuses it.
    strategy = _without_flip(strategy)
  return evaluate.Protocol(
      num_nets=settings.num_nets, epochs=settings.epochs, batch_size=settings.batch_size,
      learning_rate=settings.learning_rate, momentum=settings.momentum,
      weight_decay=settings.weight_decay, strategy=strategy,
      mix_probability=settings.mix_probability, checkpoint_every=settings.checkpoint_every)


def check_config(config: ml_collections.ConfigDict) -> methods.Method:
  """Raises UserError for settings that are wrong before any data is read."""
  build.check_training(config)
  method = method_of(config)
  build.check_population_options(config)
  for name in ("num_models", "pool_size", "checkpoint_every"):
    errors.check_int(name, config[name])
  # (A trajectory_chunk's C x num_models nets split wherever num_models does.)
  build.check_population_sizes(config, {"num_models": config.num_models, **(
      {"the early-stage pool (pool_size)": config.pool_size} if method.models == "pool" else {})})
  errors.check_number("train_fraction", config.train_fraction, 0, 1, strict=True)
  outer = outer_iterations(config, method)
  if config.trajectory_chunk is not None:
    methods.check_trajectory_chunk(method, config.trajectory_chunk)
    for name, count in (("outer iterations", outer),
                        ("checkpoint_every", config.checkpoint_every)):
      if count % config.trajectory_chunk:
        raise errors.UserError(f"trajectory_chunk={config.trajectory_chunk} must divide the "
                               f"{name} ({count})")
  for field in ("model_map", "class_map"):
    if config[field] is not None:
      matching.check_map(field, config[field])
  augment_models.check_magnitude(config.perturb_magnitude)
  protocol_of(config)
  return method


def load_data(config: ml_collections.ConfigDict) -> data_lib.Dataset:
  dataset = build.dataset(config)
  if config.train_fraction < 1:
    dataset = dataclasses.replace(dataset, train=data_lib.subsample(
        dataset.train, config.train_fraction, seed=config.seed))
  return dataset


# ----------------------------------------------------------------------------------------------
# Stages


def pretrain_pool(config: ml_collections.ConfigDict, method: methods.Method, model: Any,
                  dataset: data_lib.Dataset, workdir: pathlib.Path, test: train_lib.Data,
                  progress: bool) -> tuple[PyTree, dict[str, Any]]:
  """Acc-DD's early-stage nets, trained on the real data as one population.

  Returns:
    ({"params", "batch_stats"} with leading axis ``pool_size``, a summary with their test
    accuracies and the wall time).
  """
  steps_per_epoch = data_lib.steps_per_epoch(len(dataset.train.labels), config.batch_size)
  optimizer = build.optimizer(config, steps_per_epoch)
  nets = augment_models.init_nets(seed_key(config, "pool"), model, dataset.image_shape,
                                  config.pool_size, optimizer)
  apply_fn = train_lib.model_apply_fn(model, dataset.mean, dataset.std)
  mix = dsa.dsa_cutmix(method.net_dsa(), mix_probability=method.net_mix_probability,
                       mean=dataset.mean, std=dataset.std)
  step = train_lib.make_train_step(apply_fn, optimizer, batch_size=config.batch_size,
                                   augment=None, mix=mix)
  options = build.population_options(config, population.select(nets.params, 0))
  nets, records = loop.fit(population.run(step, **options), nets,
                           train_lib.device_data(dataset.train),
                           num_steps=config.epochs * steps_per_epoch,
                           eval_every=steps_per_epoch, workdir=workdir / "pool",
                           progress=progress, description="early-stage pool")
  summary = evaluate.summarize(evaluate.test_accuracies(apply_fn, nets, test))
  summary.update(epochs=config.epochs, size=config.pool_size,
                 seconds=loop.wall_seconds(records))
  return {"params": nets.params, "batch_stats": nets.batch_stats}, summary


def distill_program(config: ml_collections.ConfigDict, method: methods.Method, model: Any,
                    dataset: data_lib.Dataset, pool: PyTree
                    ) -> tuple[Callable, methods.DistillState, methods.DistillData]:
  """The distillation's step (one inner iteration, or ``config.trajectory_chunk`` outer
  iterations), initial state and device data."""
  num_classes = dataset.num_classes
  net_optimizer = train_lib.sgd(config.learning_rate, momentum=method.net_momentum,
                                weight_decay=method.net_weight_decay)
  nets = augment_models.init_nets(seed_key(config, "nets"), model, dataset.image_shape,
                                  config.num_models, net_optimizer)
  step = methods.make_distill_step(
      method, model, mean=dataset.mean, std=dataset.std, num_classes=num_classes,
      image_shape=dataset.image_shape, images_per_class=config.ipc,
      num_models=config.num_models,
      real_batch=methods.real_batch_size(method, dataset.train.labels, num_classes),
      net_optimizer=net_optimizer, magnitude=config.perturb_magnitude,
      population_options=build.population_options(config, population.select(nets.params, 0)),
      model_map=config.model_map, class_map=config.class_map,
      trajectory_chunk=config.trajectory_chunk)
  initial = synthetic.init_images(config.seed, dataset.train.images, dataset.train.labels,
                                  num_classes, config.ipc, factor=method.factor,
                                  init=method.init)
  state = methods.init_state(seed_key(config, "distill"), initial,
                             methods.image_optimizer(method, config.ipc, dataset.std), nets)
  return step, state, methods.distill_data(dataset.train, num_classes, pool)


def distill(config: ml_collections.ConfigDict, method: methods.Method, model: Any,
            dataset: data_lib.Dataset, pool: PyTree, workdir: pathlib.Path,
            progress: bool) -> tuple[np.ndarray, dict[str, Any]]:
  """Runs the distillation; returns the stored images f32[K, ipc, H, W, C] and a summary."""
  step, state, data = distill_program(config, method, model, dataset, pool)
  outer = outer_iterations(config, method)
  num_steps = outer * method.inner_iterations
  chunk = config.trajectory_chunk
  state, records = loop.fit(step, state, data, num_steps=num_steps,
                            eval_every=config.checkpoint_every * method.inner_iterations,
                            workdir=workdir / "distill", progress=progress,
                            description=f"{method.name} distillation",
                            step_size=chunk * method.inner_iterations if chunk else 1)
  images = np.asarray(synthetic.clamp(state.images))
  summary = {"outer_iterations": outer, "inner_iterations": method.inner_iterations,
             "num_models": config.num_models, "trajectory_chunk": chunk,
             "model_steps": outer * method.inner_iterations * config.num_models,
             "image_updates": num_steps,
             "real_batch": methods.real_batch_size(method, dataset.train.labels,
                                                   dataset.num_classes),
             "image_learning_rate": method.image_learning_rate(config.ipc, dataset.std),
             "loss": [record["train_loss"] for record in records],
             "loss_steps": [record["step"] for record in records],
             "seconds": loop.wall_seconds(records)}
  return images, summary


def save_synthetic(workdir: pathlib.Path, images: np.ndarray, factor: int,
                   class_names: Sequence[str] | None = None) -> None:
  """``synthetic.npz`` and ``synthetic.png`` (stored images, one row per class)."""
  num_classes, per_class = images.shape[:2]
  np.savez(workdir / "synthetic.npz", images=images.astype(np.float32),
           labels=np.repeat(np.arange(num_classes, dtype=np.int32), per_class),
           factor=np.int32(factor))
  figure = image_grid(images, class_names)
  figure.savefig(workdir / "synthetic.png")
  plt.close(figure)


def image_grid(images: np.ndarray, class_names: Sequence[str] | None = None) -> plt.Figure:
  """Stored images f32[K, ipc, H, W, C] as a K x min(ipc, 10) grid."""
  num_classes, per_class = images.shape[:2]
  columns = min(per_class, 10)
  fig, axes = plt.subplots(num_classes, columns, figsize=(columns * 0.8, num_classes * 0.8),
                           squeeze=False, dpi=100)
  for label in range(num_classes):
    for column in range(columns):
      ax = axes[label, column]
      image = np.clip(images[label, column], 0, 1)
      ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1)
      ax.set_xticks([])
      ax.set_yticks([])
      if column == 0:
        ax.set_ylabel(class_names[label] if class_names else str(label), fontsize=7)
  fig.tight_layout(pad=0.2)
  return fig


# ----------------------------------------------------------------------------------------------
# The run


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
                       progress: bool = True) -> dict[str, Any]:
  """Pool (Acc-DD), distillation, evaluations (see module docstring); resumes from ``workdir``.

  Returns:
    The results written to ``workdir/results.json`` plus ``"images"`` (the stored synthetic set).
  """
  method = check_config(config)
  dataset = load_data(config)
  synthetic.check_images_per_class(config.ipc, dataset.train.labels, dataset.num_classes,
                                   factor=method.factor, init=method.init)
  synthetic.check_factor(method.factor, dataset.image_shape)
  workdir = checkpoint.claim_workdir(workdir, config.to_dict())
  model = build.model(config, dataset.num_classes)
  test = train_lib.device_data(dataset.test)
  pool, pool_summary = None, None
  if method.models == "pool":
    pool, pool_summary = pretrain_pool(config, method, model, dataset, workdir, test, progress)
  images, distill_summary = distill(config, method, model, dataset, pool, workdir, progress)
  save_synthetic(workdir, images, method.factor)

  protocol = protocol_of(config)
  options = {"mean": dataset.mean, "std": dataset.std, "progress": progress,
             "model_name": config.model}
  evaluations = {"distilled": evaluate.evaluate_split(
      seed_key(config, "evaluate"), model, synthetic.decoded_split(images, method.factor),
      test, protocol, workdir=workdir / "evaluate", description="evaluate distilled",
      **options)}
  if config.eval.random_baseline:
    real = synthetic.random_real_split(config.seed, dataset.train.images, dataset.train.labels,
                                       dataset.num_classes, config.ipc)
    evaluations["random_real"] = evaluate.evaluate_split(
        seed_key(config, "evaluate_random"), model, real, test, protocol,
        workdir=workdir / "evaluate_random", description="evaluate random real", **options)

  results = {
      "dataset": dataset.name, "model": config.model, "method": dataclasses.asdict(method),
      "ipc": config.ipc, "num_classes": dataset.num_classes,
      "image_shape": list(dataset.image_shape), "train_size": int(len(dataset.train.labels)),
      "test_size": int(len(dataset.test.labels)),
      "decoded_per_class": config.ipc * method.factor ** 2,
      "pool": pool_summary, "distill": distill_summary,
      "evaluation": {"protocol": dataclasses.asdict(protocol), **evaluations},
  }
  files.write_json(workdir / "results.json", results)
  report = report_lib.Report(workdir, f"Dataset distillation: {method.name} on {dataset.name}")
  add_report_sections(report, results, workdir)
  report.write()
  return {**results, "images": images}


# ----------------------------------------------------------------------------------------------
# Report


def evaluation_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
  """One row per evaluated set: what it is, its size and cost, and its test accuracy."""
  distill_summary = results["distill"]
  method = results["method"]
  pool_seconds = results["pool"]["seconds"] if results["pool"] else 0.0
  rows = [{"training set": f"{method['name']} (factor {method['factor']})",
           "stored images / class": results["ipc"],
           "training images / class": results["decoded_per_class"],
           "outer iterations": distill_summary["outer_iterations"],
           "nets per update": distill_summary["num_models"],
           ("pool + distill s" if results["pool"] else "distill s"):
               distill_summary["seconds"] + pool_seconds,
           "test accuracy": _mean_std(results["evaluation"]["distilled"])}]
  if "random_real" in results["evaluation"]:
    rows.append({"training set": "random real images", "stored images / class": results["ipc"],
                 "training images / class": results["ipc"],
                 "test accuracy": _mean_std(results["evaluation"]["random_real"])})
  return rows


def _mean_std(evaluation: dict[str, Any]) -> str:
  return f"{100 * evaluation['mean']:.2f} +- {100 * evaluation['std']:.2f}"


def add_report_sections(report: report_lib.Report, results: dict[str, Any],
                        workdir: pathlib.Path | None = None) -> None:
  """The distillation section: evaluation table, loss curve and (with ``workdir``) the images."""
  method = results["method"]
  protocol = results["evaluation"]["protocol"]
  distill_summary = results["distill"]
  pool = results["pool"]
  pool_text = (f" The {pool['size']} early-stage nets ({pool['epochs']} epochs on the real data) "
               f"reach {100 * pool['mean']:.1f}% test accuracy; each outer iteration draws one "
               f"per matched net{' and perturbs it' if method['perturb'] else ''}."
               if pool else "")
  augmentation = " + ".join(
      ["DSA"] * (protocol["strategy"] != "none") + ["CutMix"] * (protocol["mix_probability"] > 0))
  report.section(
      "Dataset distillation",
      f"{method['name']} on {results['dataset']} ({results['train_size']} training images, "
      f"{results['num_classes']} classes, {'x'.join(map(str, results['image_shape']))}), "
      f"{results['ipc']} stored images per class (factor {method['factor']}: "
      f"{results['decoded_per_class']} training images per class), "
      f"{distill_summary['outer_iterations']} outer x {distill_summary['inner_iterations']} "
      f"inner iterations with {distill_summary['num_models']} net(s) per update."
      f"{pool_text} Evaluation: {protocol['num_nets']} fresh {results['model']}s per set trained "
      f"as one population for {protocol['epochs']} epochs ({augmentation or 'no augmentation'}), "
      f"final test accuracy "
      f"mean +- std over the nets, in %. Wall times: training with compilation, summed over "
      f"resumed runs; the last ran on {jax.devices()[0].device_kind}.")
  report.text(report_lib.markdown_table(evaluation_rows(results), float_format="{:.0f}"))
  report.figure("distill_loss", report_lib.line_plot(
      {"matching loss": (distill_summary["loss_steps"], distill_summary["loss"])},
      xlabel="inner iteration", ylabel="loss (mean over the interval)",
      title=f"{method['name']} matching loss"), "Matching loss during distillation")
  if workdir is not None and (workdir / "synthetic.png").exists():
    report.text(f"![Distilled images, one row per class]({_relative(workdir, report)}"
                "synthetic.png)\n")


def _relative(workdir: pathlib.Path, report: report_lib.Report) -> str:
  """Path prefix of ``workdir`` as seen from the report's directory."""
  try:
    relative = pathlib.Path(workdir).resolve().relative_to(report.directory.resolve())
  except ValueError:
    return f"{pathlib.Path(workdir).resolve()}/"
  return "" if str(relative) == "." else f"{relative}/"


def demo_section(report: report_lib.Report, workdir: pathlib.Path) -> None:
  """The demo's distillation section (the ``digits`` preset, run in ``workdir / "distill"``)."""
  results = train_and_evaluate(distill_configs.get_config("digits"), workdir / "distill")
  add_report_sections(report, results, workdir / "distill")


def main(argv: Sequence[str] | None = None) -> None:
  cli.main(train_and_evaluate, distill_configs, argv)


if __name__ == "__main__":
  main()
