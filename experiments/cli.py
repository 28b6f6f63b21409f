"""The study runners' command line, with ml_collections' ``config_flags``:

    python -m experiments.<study> --config experiments/configs/<study>.py:<preset> \\
        --workdir DIR --config.epochs=10 --config.model_options.width=16

``--config`` defaults to the study's config file and its default preset. A value is parsed for
its field's type (a tuple as ``(0.5,0.3)``; a string as written); ``None`` unsets any field but a
switch. ``model_options`` nodes take every option a registered model has. Bad input prints one
line ``error: ...`` on stderr and exits 2; a workdir the failed command created is removed again.
A finished run is rendered into ``report.md`` (``experiments.report``).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import pathlib
import re
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_flags
from ml_collections.config_flags import tuple_parser

from experiments import report
from jaxtickets import models
from jaxtickets.errors import UserError, exit_on_user_error, first_line

CONFIGS = pathlib.Path(__file__).resolve().parent / "configs"


class _Literal(flags.ArgumentParser):
  """A field whose value is None takes any literal; other text stays a string."""

  def parse(self, argument):
    try:
      return ast.literal_eval(argument)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
      return argument

  def flag_type(self):
    return "literal"


class _OrNone(flags.ArgumentParser):
  """``None`` unsets the field (an optional value's default); other text goes to ``parser``."""

  def __init__(self, parser: flags.ArgumentParser):
    self._parser = parser

  def parse(self, argument):
    return None if argument == "None" else self._parser.parse(argument)

  def flag_type(self):
    return self._parser.flag_type()


# config_flags picks the parser by the field's type. Switches keep absl's (None is no switch
# value); a tuple is one flag, ``--config.keep_ratios=(0.5,0.3)``.
config_flags.register_flag_parser_for_type(type(None), _Literal())
for _type, _parser in ((int, flags.IntegerParser()), (float, flags.FloatParser()),
                       (str, flags.ArgumentParser()),
                       (tuple, tuple_parser.TupleParser())):
  config_flags.register_flag_parser_for_type(_type, _OrNone(_parser))


def _model_options(node: ml_collections.ConfigDict) -> Iterator[ml_collections.ConfigDict]:
  """The ``model_options`` nodes in ``node``: keyword options of a model registry call."""
  for name, value in node.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from [value] if name == "model_options" else _model_options(value)


# The overrides config_flags reads: --config.KEY=VALUE, --config.KEY VALUE, --noconfig.KEY.
_OVERRIDE = re.compile(r"-{1,2}(?:no)?config\.([^=]+)")


class _ConfigFile(flags.ArgumentParser):
  """``PATH.py[:PRESET]`` -> ``get_config([PRESET])`` of that file; every override in ``argv``
  must name a field (``model_options`` nodes get a None field per model option first)."""

  def __init__(self, argv: Sequence[str], example: str):
    self._overrides = [match.group(1) for match in map(_OVERRIDE.match, argv) if match]
    self._example = example

  def parse(self, argument):
    path, *preset = argument.split(":", 1)
    if not path.endswith(".py") or not os.path.isfile(path):
      raise UserError(f"no config file {path!r} (--config takes PATH.py[:PRESET], e.g. "
                      f"{self._example})")
    spec = importlib.util.spec_from_file_location("config_file", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(*preset)
    if not isinstance(config, ml_collections.ConfigDict):
      raise UserError(f"{path}: get_config returned a {type(config).__name__}, not a ConfigDict")
    options = sorted({o for name in models.list_models() for o in models.model_options(name)})
    for node in _model_options(config):
      node.update({option: None for option in options if option not in node})
    for key in self._overrides:
      node = config
      for name in key.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or name not in node:
          raise UserError(f"unknown config key {key!r}")
        node = node[name]
    return config

  def flag_type(self):
    return "config file"


def _message(error: BaseException) -> str:
  # A UserError raised while a flag was parsed (a preset, a config key) reaches us wrapped in
  # absl's "flag --config=...: " error; its own message says more.
  cause = error
  while cause is not None and not isinstance(cause, UserError):
    cause = cause.__context__
  return first_line(cause or error)


def parse(study: str, argv: Sequence[str]) -> tuple[ml_collections.ConfigDict, str]:
  """``argv`` (without the program name) -> ``(config, workdir)``; bad input is a UserError."""
  argv = list(argv)
  if not any(re.match(r"-{1,2}config(=|$)", arg) for arg in argv):
    argv.insert(0, f"--config={CONFIGS / f'{study}.py'}")
  argv.insert(0, f"experiments.{study}")
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "PATH.py[:PRESET]", flag_values=values,
                                  lock_config=False, sys_argv=argv)
  # config_flags' own loader knows nothing of model options and looks keys up with KeyErrors;
  # ours loads the file the same way. --config is always in argv, so only ours parses it.
  values["config"].parser = _ConfigFile(argv, f"experiments/configs/{study}.py:small")
  flags.DEFINE_string("workdir", None, "run directory (resumed if it exists)",
                      flag_values=values)
  try:
    rest = values(argv)
  except (flags.Error, ValueError, TypeError, KeyError, AttributeError, OSError) as error:
    raise UserError(_message(error)) from None
  if len(rest) > 1:
    raise UserError(f"unexpected arguments: {' '.join(rest[1:])}")
  if not values.workdir:
    raise UserError("--workdir is required")
  for node in _model_options(values.config):
    for option in [option for option, value in node.items() if value is None]:
      del node[option]  # Not given: the model's default.
  return values.config, values.workdir


def main(study: str, train_and_evaluate: Callable[[ml_collections.ConfigDict, str], Any],
         argv: Sequence[str] | None = None) -> None:
  """Parses the command line, runs ``train_and_evaluate(config, workdir)``, renders its
  report; ``argv`` defaults to ``sys.argv[1:]``."""
  argv = sys.argv[1:] if argv is None else argv
  if any(arg in ("-h", "--help", "-help", "--helpfull") for arg in argv):
    presets = importlib.import_module(f"experiments.configs.{study}").PRESETS
    print(f"{__doc__.replace('<study>', study)}\nPresets: {', '.join(presets)}")
    return
  with exit_on_user_error():
    config, workdir = parse(study, argv)
  fresh = not os.path.lexists(workdir)
  with exit_on_user_error():
    try:
      train_and_evaluate(config, workdir)
    except UserError:
      # A workdir this call created holds no run the corrected command could resume (it is
      # another config), and its config.json would make that command refuse the directory.
      if fresh:
        shutil.rmtree(workdir, ignore_errors=True)
      raise
    path = report.render(workdir)
  print(f"report written to {path}")
