"""Config -> library objects, shared by every study runner."""

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
from jaxtickets import errors
from jaxtickets.errors import UserError

AUGMENTS = {"none": None, "crop_flip": train_lib.crop_flip}
SCHEDULES = ("cosine", "multistep", "constant")
# Seeds seed both jax and NumPy generators; NumPy's legacy ones take [0, 2**32).
_MAX_SEED = 2**32 - 1


def seed_key(seed: int, purposes: Sequence[str], purpose: str, *indices: int) -> jax.Array:
  """The raw (checkpointable) PRNG key of ``seed`` for ``purpose``, one of a study's
  ``purposes`` (its index is folded in), then each of ``indices`` folded in."""
  key = jax.random.fold_in(jax.random.PRNGKey(seed), purposes.index(purpose))
  for index in indices:
    key = jax.random.fold_in(key, index)
  return key


def check_seed(name: str, seed: Any) -> None:
  """Raises a UserError naming ``name`` unless ``seed`` is an int in [0, 2**32)."""
  errors.check_int(name, seed, 0)
  if seed > _MAX_SEED:
    raise UserError(f"{name}={seed!r}; expected an int in [0, {_MAX_SEED}]")


def check_training(config: ml_collections.ConfigDict, prefix: str = "") -> None:
  """Raises a UserError naming the field for a bad value of a ``configs.common.training``
  field (``prefix`` names a nested one, e.g. ``"source."``), before anything is loaded.

  A nested block may leave out ``model``, ``model_options`` and ``seed`` (its study's are used).
  """
  for name in ("dataset", "model"):
    if name in config and not isinstance(config[name], str):
      raise UserError(f"{prefix}{name}={config[name]!r}; expected a name")
  if "model_options" in config and not isinstance(config.model_options,
                                                  ml_collections.ConfigDict):
    raise UserError(f"{prefix}model_options={config.model_options!r}; expected keyword options "
                    f"(--set {prefix}model_options.KEY=VALUE)")
  errors.check_int(f"{prefix}batch_size", config.batch_size)
  if "seed" in config:
    check_seed(f"{prefix}seed", config.seed)
  check_optimizer(config, prefix)
  augment(config)


def check_optimizer(config: ml_collections.ConfigDict, prefix: str = "", *,
                    min_epochs: int = 1) -> None:
  """Raises a UserError naming the field for a bad ``epochs``, ``learning_rate``,
  ``momentum``, ``weight_decay``, ``schedule``, ``milestones`` or ``gamma``."""
  errors.check_int(f"{prefix}epochs", config.epochs, min_epochs)
  errors.check_number(f"{prefix}learning_rate", config.learning_rate, 0, strict=True)
  errors.check_number(f"{prefix}momentum", config.momentum, 0, 1)
  errors.check_number(f"{prefix}weight_decay", config.weight_decay, 0)
  errors.check_number(f"{prefix}gamma", config.gamma, 0, strict=True)
  milestones = config.milestones
  if (not isinstance(milestones, (tuple, list))
      or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in milestones)
      or list(milestones) != sorted(milestones)):
    raise UserError(f"{prefix}milestones={milestones!r}; expected ascending epochs (ints >= 1)")
  _check_schedule_name(config, prefix)


def _check_schedule_name(config: ml_collections.ConfigDict, prefix: str = "") -> None:
  if config.schedule not in SCHEDULES:
    raise UserError(f"unknown {prefix}schedule {config.schedule!r}; known: "
                    f"{', '.join(SCHEDULES)}")


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
  _check_schedule_name(config)
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


def check_population_sizes(config: ml_collections.ConfigDict, sizes: Mapping[str, int]) -> None:
  """Raises UserError when ``strategy`` "shard" cannot split one of the study's populations
  (``sizes``: what it is -> its members) evenly over the devices, before anything trains."""
  if config.strategy != "shard":
    return
  devices = jax.device_count()
  for name, size in sizes.items():
    if size % devices:
      raise UserError(f"strategy 'shard' splits every population evenly over the {devices} "
                      f"devices; {name}: {size} members")


def check_population_options(config: ml_collections.ConfigDict) -> None:
  """Raises UserError for a bad ``strategy``/``chunk_size`` before anything is loaded."""
  chunk_size = config.get("chunk_size")
  if config.strategy is not None:
    if config.strategy not in population.STRATEGIES:
      raise UserError(f"unknown population strategy {config.strategy!r}; known: "
                      f"{', '.join(population.STRATEGIES)}")
    if chunk_size is not None:
      if config.strategy != "map":
        raise UserError(f"chunk_size={chunk_size!r} applies to strategy 'map' only")
      errors.check_int("chunk_size", chunk_size)
  elif chunk_size is not None:
    raise UserError(f"chunk_size={config.chunk_size!r} applies to strategy 'map'; strategy is "
                    "None (the measured default)")


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
