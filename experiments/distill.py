"""Dataset distillation: Acc-DD (model augmentation) and the DC, DSA, DM and IDC baselines.

Config -> stages, each resumable in its own subdirectory of the workdir:

1. ``pool/`` (Acc-DD only): the early-stage nets, pretrained on the real data as one population
   (:func:`pretrain_pool`; ``jaxtickets.distill.augment_models``);
2. ``distill/``: the distillation, one ``loop.fit`` step per inner iteration (or per
   ``trajectory_chunk`` outer iterations), the synthetic set (and its optimizer and current nets)
   checkpointed every ``checkpoint_every`` outer iterations (:func:`distill`;
   ``jaxtickets.distill.methods``);
3. ``evaluate/``: N fresh nets trained on the decoded synthetic set as one population;
   ``evaluate_random/``: the same on IPC random real images per class, the baseline of the same
   size (``jaxtickets.distill.evaluate``).

Writes ``results.json`` (``"study": "distill"``) and ``synthetic.npz`` (stored images
f32[K, ipc, H, W, C] in [0, 1], labels, factor); ``experiments/reports/distill.py`` renders them.
Wall times are each stage's training time with compilation, summed over the processes that ran
it (``loop.fit``'s records).
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from experiments import build, cli
from experiments.configs import distill as configs
from jaxtickets import checkpoint, files, loop, population
from jaxtickets import data as data_lib
from jaxtickets import train as train_lib
from jaxtickets.distill import augment_models, dsa, evaluate, methods, synthetic
from jaxtickets.errors import UserError

PyTree = Any
# What each stream of randomness derived from the seed is for (``build.seed_key``).
_KEY_PURPOSES = ("pool", "distill", "nets", "evaluate", "evaluate_random")


def _key(config: ml_collections.ConfigDict, purpose: str) -> jax.Array:
  return build.seed_key(config.seed, _KEY_PURPOSES, purpose)


def protocol_of(config: ml_collections.ConfigDict) -> evaluate.Protocol:
  settings = config.eval
  strategy = settings.strategy if config.flip else configs.without_flip(settings.strategy)
  return evaluate.Protocol(
      num_nets=settings.num_nets, epochs=settings.epochs, batch_size=settings.batch_size,
      learning_rate=settings.learning_rate, momentum=settings.momentum,
      weight_decay=settings.weight_decay, strategy=strategy,
      mix_probability=settings.mix_probability, checkpoint_every=settings.checkpoint_every)


def check_data(config: ml_collections.ConfigDict, method: methods.Method,
               dataset: data_lib.Dataset) -> None:
  """Raises UserError when the training split cannot seed the synthetic set (and the random
  baseline), or its images cannot be multi-formation decoded."""
  counts = synthetic.class_counts(dataset.train.labels, dataset.num_classes)
  mix = method.init == "mix"
  needed = config.ipc * (method.factor ** 2 if mix else 1)
  smallest = int(np.argmin(counts))
  if needed > counts[smallest]:
    what = f"ipc={config.ipc}" + (f" x factor^2={method.factor ** 2}" if mix else "")
    raise UserError(f"{what} needs {needed} real images per class but class {smallest} has "
                    f"only {counts[smallest]}")
  synthetic.check_factor(method.factor, dataset.image_shape)


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
  nets = augment_models.init_nets(_key(config, "pool"), model, dataset.image_shape,
                                  config.pool_size, optimizer)
  apply_fn = train_lib.model_apply_fn(model, dataset.mean, dataset.std)
  mix = dsa.dsa_cutmix(method.net_dsa(), mix_probability=method.net_mix_probability,
                       mean=dataset.mean, std=dataset.std)
  step = train_lib.make_train_step(apply_fn, optimizer, batch_size=config.batch_size,
                                   augment=None, mix=mix)
  nets, records = build.fit_population(
      config, step, nets, train_lib.device_data(dataset.train),
      num_steps=config.epochs * steps_per_epoch, eval_every=steps_per_epoch,
      workdir=workdir / "pool", progress=progress, description="early-stage pool",
      params=population.select(nets.params, 0))
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
  nets = augment_models.init_nets(_key(config, "nets"), model, dataset.image_shape,
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
  state = methods.init_state(_key(config, "distill"), initial,
                             methods.image_optimizer(method, config.ipc, dataset.std), nets)
  return step, state, methods.distill_data(dataset.train, num_classes, pool)


def distill(config: ml_collections.ConfigDict, method: methods.Method, model: Any,
            dataset: data_lib.Dataset, pool: PyTree, workdir: pathlib.Path,
            progress: bool) -> tuple[np.ndarray, dict[str, Any]]:
  """Runs the distillation; returns the stored images f32[K, ipc, H, W, C] and a summary."""
  step, state, data = distill_program(config, method, model, dataset, pool)
  outer = configs.outer_iterations(config, method)
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


def save_synthetic(workdir: pathlib.Path, images: np.ndarray, factor: int) -> None:
  """``synthetic.npz``: the stored images f32[K, ipc, H, W, C], their labels and the factor."""
  num_classes, per_class = images.shape[:2]
  np.savez(workdir / "synthetic.npz", images=images.astype(np.float32),
           labels=np.repeat(np.arange(num_classes, dtype=np.int32), per_class),
           factor=np.int32(factor))


# ----------------------------------------------------------------------------------------------
# The run


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
                       progress: bool = True) -> dict[str, Any]:
  """Pool (Acc-DD), distillation, evaluations (see module docstring); resumes from ``workdir``.

  Returns:
    The results written to ``workdir/results.json`` plus ``"images"`` (the stored synthetic set).
  """
  method = configs.check_config(config)
  dataset = load_data(config)
  check_data(config, method, dataset)
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
      _key(config, "evaluate"), model, synthetic.decoded_split(images, method.factor),
      test, protocol, workdir=workdir / "evaluate", description="evaluate distilled",
      **options)}
  if config.eval.random_baseline:
    real = synthetic.random_real_split(config.seed, dataset.train.images, dataset.train.labels,
                                       dataset.num_classes, config.ipc)
    evaluations["random_real"] = evaluate.evaluate_split(
        _key(config, "evaluate_random"), model, real, test, protocol,
        workdir=workdir / "evaluate_random", description="evaluate random real", **options)

  results = {
      "study": "distill", "dataset": dataset.name, "model": config.model,
      "method": dataclasses.asdict(method), "ipc": config.ipc,
      "num_classes": dataset.num_classes, "image_shape": list(dataset.image_shape),
      "train_size": int(len(dataset.train.labels)), "test_size": int(len(dataset.test.labels)),
      "decoded_per_class": config.ipc * method.factor ** 2,
      "pool": pool_summary, "distill": distill_summary,
      "evaluation": {"protocol": dataclasses.asdict(protocol), **evaluations},
      "device": jax.devices()[0].device_kind,
  }
  files.write_json(workdir / "results.json", results)
  return {**results, "images": images}


def main(argv: Sequence[str] | None = None) -> None:
  cli.main("distill", train_and_evaluate, argv)


if __name__ == "__main__":
  main()
