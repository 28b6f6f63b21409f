"""Shared command line for the study runners: ``--config PRESET --workdir DIR [--set k=v ...]``.

Bad input (unknown preset or key, anything raising ``UserError``) prints one line and exits 2;
a workdir the failed command created is removed again.
"""

from __future__ import annotations

import ast
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import ml_collections

from jaxtickets import errors
from jaxtickets.errors import UserError, exit_on_user_error


def parse_value(text: str, field_type: type | None = None) -> Any:
  """``"0.1" -> 0.1``, ``"[1, 2]" -> [1, 2]``, anything else stays a string; for a ``str``
  field only a quoted literal or None is parsed (a directory named ``2024`` stays a string)."""
  try:
    value = ast.literal_eval(text)
  except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
    return text
  return text if field_type is str and not isinstance(value, (str, type(None))) else value


# Config nodes whose keys are free-form keyword options of a registry call (checked there, with
# a one-line error naming the known ones), so ``--set model_options.width=16`` may add a key.
OPEN_NODES = ("model_options",)


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
  """Applies ``key.sub=value`` strings to ``config`` in place.

  Unknown keys, values of the wrong type and None for a switch are a UserError, except new keys
  inside an :data:`OPEN_NODES` node.
  """
  for item in overrides:
    key, sep, value = item.partition("=")
    if not sep:
      raise UserError(f"--set expects key=value, got {item!r}")
    *parents, leaf = key.split(".")
    node = config
    for name in parents:
      node = node.get(name) if isinstance(node, ml_collections.ConfigDict) else None
      if node is None:
        raise UserError(f"unknown config key {key!r}")
    is_open = bool(parents) and parents[-1] in OPEN_NODES
    if not isinstance(node, ml_collections.ConfigDict) or (leaf not in node and not is_open):
      raise UserError(f"unknown config key {key!r}")
    field_type = node.get_type(leaf) if leaf in node else None
    parsed = parse_value(value, field_type)
    # ml_collections lets None into any field; a switch would then read as off.
    if field_type is bool and parsed is None:
      raise UserError(f"--set {item!r}: {key} expects True or False")
    try:
      node[leaf] = parsed
    except TypeError:
      raise UserError(f"--set {item!r}: {key} expects a value of type "
                      f"{field_type.__name__}") from None


def load_config(configs: ModuleType, preset: str | None,
                overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  config = configs.get_config() if preset is None else configs.get_config(preset)
  apply_overrides(config, overrides)
  return config


def main(run: Callable[[ml_collections.ConfigDict, str], Any], configs: ModuleType,
         argv: Sequence[str] | None = None) -> None:
  """Parses arguments, builds the config and calls ``run(config, workdir)``."""
  parser = errors.ArgumentParser(description=(sys.modules[run.__module__].__doc__ or "")
                                 .strip().splitlines()[0])
  parser.add_argument("--config", default=None,
                      help=f"preset name, one of: {', '.join(configs.PRESETS)}")
  parser.add_argument("--workdir", required=True, help="run directory (resumed if it exists)")
  parser.add_argument("--set", dest="overrides", action="append", default=[],
                      metavar="KEY=VALUE", help="override a config field (repeatable)")
  args = parser.parse_args(argv)
  fresh = not os.path.lexists(args.workdir)
  with exit_on_user_error():
    try:
      run(load_config(configs, args.config, args.overrides), args.workdir)
    except UserError:
      # A workdir this call created holds no run the corrected command could resume (it is
      # another config), and its config.json would make that command refuse the directory.
      if fresh:
        shutil.rmtree(args.workdir, ignore_errors=True)
      raise
