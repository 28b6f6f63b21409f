"""Checks of config values where they enter: each raises a one-line UserError naming the field.

The field checks every study shares (``configs.common.training`` fields, the population
strategy) and the helpers each study's ``configs.<study>.check_config`` builds on.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import ml_collections

from experiments import build
from jaxtickets import data as data_lib
from jaxtickets import population
from jaxtickets.errors import UserError

# Seeds seed both jax and NumPy generators; NumPy's legacy ones take [0, 2**32).
_MAX_SEED = 2**32 - 1


def check_int(name: str, value: Any, minimum: int = 1) -> None:
  """Raises UserError naming ``name`` unless ``value`` is an int (not a bool) >= ``minimum``."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
    raise UserError(f"{name}={value!r}; expected an int >= {minimum}")


def check_number(name: str, value: Any, minimum: float, maximum: float | None = None, *,
                 strict: bool = False) -> None:
  """Raises UserError naming ``name`` unless ``value`` is a finite real number >= ``minimum``
  (> with ``strict``) and, if given, <= ``maximum``; NaN, infinities and bools fail."""
  if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
      or not (value > minimum if strict else value >= minimum)
      or (maximum is not None and not value <= maximum)):
    expected = f"{'>' if strict else '>='} {minimum}"
    if maximum is not None:
      expected = f"in {'(' if strict else '['}{minimum}, {maximum}]"
    raise UserError(f"{name}={value!r}; expected a number {expected}")


def check_sequence(name: str, value: Any, *, nonempty: bool = True) -> None:
  """Raises UserError naming ``name`` unless ``value`` is a list or tuple (non-empty, unless
  ``nonempty`` is False); its entries are the caller's to check."""
  if not isinstance(value, (list, tuple)) or (nonempty and not value):
    raise UserError(f"{name}={value!r}; expected a {'non-empty ' if nonempty else ''}sequence")


def check_distinct(name: str, values: Iterable[Any], consequence: str) -> None:
  """Raises UserError naming ``name`` and its first repeated entry unless ``values`` are
  distinct (and hashable: names and numbers); ``consequence`` says what a repeat would do."""
  values = tuple(values)
  seen = set()
  for value in values:
    try:
      hash(value)
    except TypeError:
      raise UserError(f"{name}={values!r}; expected names or numbers, got {value!r}") from None
    if value in seen:
      raise UserError(f"{name}={values!r} repeats {value!r}; {consequence}")
    seen.add(value)


def check_names(name: str, values: Any, known: Sequence[str], *, repeat: str,
                nonempty: bool = True) -> None:
  """Raises UserError naming ``name`` unless ``values`` is a sequence (non-empty, unless
  ``nonempty`` is False) of distinct names from ``known``; ``repeat`` says what a repeat would
  do (see :func:`check_distinct`)."""
  check_sequence(name, values, nonempty=nonempty)
  check_distinct(name, values, repeat)
  unknown = [value for value in values if value not in known]
  if unknown:
    raise UserError(f"{name}={tuple(values)!r}; unknown {unknown[0]!r}, known: {', '.join(known)}")


def check_seed(name: str, seed: Any) -> None:
  """Raises a UserError naming ``name`` unless ``seed`` is an int in [0, 2**32)."""
  check_int(name, seed, 0)
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
                    f"(--config.{prefix}model_options.KEY=VALUE)")
  check_int(f"{prefix}batch_size", config.batch_size)
  image_size = config.get("image_size")
  if image_size is not None:
    check_int(f"{prefix}image_size", image_size)
    if config.get("dataset") == "digits" and image_size not in data_lib.DIGITS_IMAGE_SIZES:
      raise UserError(f"{prefix}image_size={image_size!r} for digits; choose one of "
                      f"{data_lib.DIGITS_IMAGE_SIZES}")
  if "model_options" in config:
    check_model_options(config.model_options, prefix)
  if "seed" in config:
    check_seed(f"{prefix}seed", config.seed)
  check_optimizer(config, prefix)
  build.augment(config)


def check_model_options(options: ml_collections.ConfigDict, prefix: str = "") -> None:
  """Raises a UserError for a value of a shared model option the models would take silently
  (names of norms, dtypes and initializers are refused by ``models.get_model``)."""
  if options.get("width") is not None:
    check_int(f"{prefix}model_options.width", options.width)
  for name in ("use_bias", "head_bias"):
    if options.get(name) is not None and not isinstance(options[name], bool):
      raise UserError(f"{prefix}model_options.{name}={options[name]!r}; expected True or False")
  if options.get("width_multiplier") is not None:
    check_number(f"{prefix}model_options.width_multiplier", options.width_multiplier, 0,
                 strict=True)
  unit_widths = options.get("unit_widths")
  if unit_widths is not None and (not isinstance(unit_widths, (tuple, list)) or any(
      isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in unit_widths)):
    raise UserError(f"{prefix}model_options.unit_widths={unit_widths!r}; expected positive ints")


def check_optimizer(config: ml_collections.ConfigDict, prefix: str = "", *,
                    min_epochs: int = 1) -> None:
  """Raises a UserError naming the field for a bad ``epochs``, ``learning_rate``,
  ``momentum``, ``weight_decay``, ``schedule``, ``milestones`` or ``gamma``."""
  check_int(f"{prefix}epochs", config.epochs, min_epochs)
  check_number(f"{prefix}learning_rate", config.learning_rate, 0, strict=True)
  check_number(f"{prefix}momentum", config.momentum, 0, 1)
  check_number(f"{prefix}weight_decay", config.weight_decay, 0)
  check_number(f"{prefix}gamma", config.gamma, 0, strict=True)
  milestones = config.milestones
  if (not isinstance(milestones, (tuple, list))
      or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in milestones)
      or list(milestones) != sorted(milestones)):
    raise UserError(f"{prefix}milestones={milestones!r}; expected ascending epochs (ints >= 1)")
  if config.schedule not in build.SCHEDULES:
    raise UserError(f"unknown {prefix}schedule {config.schedule!r}; known: "
                    f"{', '.join(build.SCHEDULES)}")


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
      check_int("chunk_size", chunk_size)
  elif chunk_size is not None:
    raise UserError(f"chunk_size={config.chunk_size!r} applies to strategy 'map'; strategy is "
                    "None (the measured default)")


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


def check_val_fraction(name: str, fraction: Any) -> None:
  """Raises UserError naming ``name`` unless ``fraction`` is a number in (0, 1) (the share of a
  split ``data.with_validation`` carves out)."""
  if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0 < fraction < 1:
    raise UserError(f"{name}={fraction!r}; expected a number in (0, 1)")
