"""Config -> library objects, shared by every study runner (configs are checked in ``checks``)."""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import optax

from jaxtickets import data as data_lib
from jaxtickets import loop, models, population
from jaxtickets import train as train_lib
from jaxtickets.errors import UserError

AUGMENTS = {"none": None, "crop_flip": train_lib.crop_flip}
SCHEDULES = ("cosine", "multistep", "constant")


def seed_key(seed: int, purposes: Sequence[str], purpose: str, *indices: int) -> jax.Array:
  """The raw (checkpointable) PRNG key of ``seed`` for ``purpose``, one of a study's
  ``purposes`` (its index is folded in), then each of ``indices`` folded in."""
  key = jax.random.fold_in(jax.random.PRNGKey(seed), purposes.index(purpose))
  for index in indices:
    key = jax.random.fold_in(key, index)
  return key


def dataset(config: ml_collections.ConfigDict) -> data_lib.Dataset:
  return data_lib.load_dataset(config.dataset, data_dir=config.data_dir,
                               image_size=config.image_size, normalization=config.normalization)


def model_options(config: ml_collections.ConfigDict, **overrides) -> dict[str, Any]:
  """The keyword options every model of ``config`` is built with: ``model_options``, ``dtype``
  and what the study sets itself (``overrides``).

  Raises:
    UserError: ``model_options`` sets an option to another value than ``dtype`` or the study
      does (it would be ignored).
  """
  options = config.model_options.to_dict()
  fixed = {"dtype": config.dtype, **overrides}
  for name, value in fixed.items():
    if name in options and options[name] != value:
      source = "the config's dtype" if name == "dtype" else "this study"
      raise UserError(f"model_options.{name}={options[name]!r} would be ignored: {source} sets "
                      f"{name}={value!r}")
  return {**options, **fixed}


def model(config: ml_collections.ConfigDict, num_classes: int, **overrides):
  return models.get_model(config.model, num_classes=num_classes,
                          **model_options(config, **overrides))


def augment(config: ml_collections.ConfigDict) -> train_lib.Augment | None:
  if config.augment not in AUGMENTS:
    raise UserError(f"unknown augment {config.augment!r}; known: {', '.join(AUGMENTS)}")
  return AUGMENTS[config.augment]


def schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
  """The learning-rate schedule ``config.schedule`` names (``checks.check_optimizer`` refuses
  names outside SCHEDULES)."""
  if config.schedule == "cosine":
    return train_lib.cosine_schedule(config.learning_rate, config.epochs * steps_per_epoch)
  if config.schedule == "multistep":
    return train_lib.multistep_schedule(config.learning_rate, steps_per_epoch, config.milestones,
                                        config.gamma)
  return optax.constant_schedule(config.learning_rate)


def optimizer(config: ml_collections.ConfigDict,
              steps_per_epoch: int) -> optax.GradientTransformation:
  return train_lib.sgd(schedule(config, steps_per_epoch), momentum=config.momentum,
                       weight_decay=config.weight_decay)


def population_options(config: ml_collections.ConfigDict, params: Any,
                       model_name: str | None = None) -> dict[str, Any]:
  """``population.run`` options: the config's ``strategy`` (and ``chunk_size``), or with
  ``strategy`` None the measured default for ``model_name`` (default ``config.model``) of
  ``params``' size (one member's params)."""
  if config.strategy is None:
    num_params = sum(leaf.size for leaf in jax.tree.leaves(params))
    return population.default_strategy(model_name or config.model, num_params)
  return {"strategy": config.strategy, "chunk_size": config.get("chunk_size")}


def fit_model(config: ml_collections.ConfigDict, apply_fn: train_lib.ApplyFn, key: jax.Array,
              params: Any, batch_stats: Any, train: data_lib.Split, *,
              workdir: str | pathlib.Path | None,
              evaluate: Callable[[train_lib.TrainState], Mapping[str, Any]] | None = None,
              progress: bool = True, description: str = "train"
              ) -> tuple[train_lib.TrainState, list[dict]]:
  """Trains one model from ``params`` and ``batch_stats`` on ``train`` for ``config.epochs``
  (its :func:`optimizer` and :func:`augment`; ``key``: the state's, for batches and
  augmentation), evaluating (and checkpointing in ``workdir``, resumable) every epoch.

  Returns:
    The final TrainState and the evaluation records.
  """
  steps_per_epoch = data_lib.steps_per_epoch(len(train.labels), config.batch_size)
  tx = optimizer(config, steps_per_epoch)
  step = train_lib.make_train_step(apply_fn, tx, batch_size=config.batch_size,
                                   augment=augment(config))
  return loop.fit(step, train_lib.create_train_state(key, params, batch_stats, tx),
                  train_lib.device_data(train), num_steps=config.epochs * steps_per_epoch,
                  eval_every=steps_per_epoch, evaluate=evaluate, workdir=workdir,
                  progress=progress, description=description)


def fit_population(config: ml_collections.ConfigDict, step: Callable[..., Any], states: Any,
                   data: train_lib.Data, *, num_steps: int, eval_every: int,
                   workdir: str | pathlib.Path | None,
                   evaluate: Callable[[Any], Mapping[str, Any]] | None = None,
                   progress: bool = True, description: str = "train", params: Any = None,
                   model_name: str | None = None, step_size: int = 1) -> tuple[Any, list[dict]]:
  """Trains the population ``states`` with the single-member ``step`` by ``loop.fit``.

  The member map is the config's (:func:`population_options` of one member's ``params`` and
  ``model_name``); the rest is ``loop.fit``'s (resumable in ``workdir``).

  Returns:
    The final states and the evaluation records.
  """
  population_step = population.run(step, **population_options(config, params, model_name))
  return loop.fit(population_step, states, data, num_steps=num_steps, eval_every=eval_every,
                  evaluate=evaluate, workdir=workdir, progress=progress,
                  description=description, step_size=step_size)
