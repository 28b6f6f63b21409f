"""Renders a finished run's ``report.md`` (+ PNGs) from its ``results.json``, without re-running:

    python -m experiments.report WORKDIR

``results["study"]`` picks the report module ``experiments.reports.<study>``: its
``title(results)`` and ``add_sections(report, results, workdir)``.
"""

from __future__ import annotations

import importlib
import json
import pathlib
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from jaxtickets import errors
from jaxtickets import report as report_lib
from jaxtickets.errors import UserError, exit_on_user_error


def load(workdir: str | pathlib.Path) -> dict[str, Any]:
  """The results a study wrote into ``workdir``; a UserError if there are none."""
  path = pathlib.Path(workdir) / "results.json"
  try:
    results = json.loads(path.read_text())
  except OSError as error:
    raise UserError(f"cannot read {path}: {error.strerror or error} (a finished run's workdir "
                    "holds it)") from None
  except json.JSONDecodeError as error:
    raise UserError(f"{path} is not JSON: {error}") from None
  study = results.get("study") if isinstance(results, dict) else None
  if not isinstance(study, str) or not study.isidentifier():
    raise UserError(f"{path} names no study (its \"study\" field)")
  return results


def module(study: str) -> ModuleType:
  """``experiments.reports.<study>``."""
  name = f"experiments.reports.{study}"
  try:
    return importlib.import_module(name)
  except ModuleNotFoundError as error:
    if error.name != name:
      raise
    raise UserError(f"no report module for study {study!r} ({name})") from None


def render(workdir: str | pathlib.Path) -> pathlib.Path:
  """Writes ``workdir/report.md`` (+ PNGs) for the run in ``workdir``; returns its path."""
  results = load(workdir)
  reports = module(results["study"])
  report = report_lib.Report(workdir, reports.title(results))
  reports.add_sections(report, results, pathlib.Path(workdir))
  return report.write()


def main(argv: Sequence[str] | None = None) -> None:
  parser = errors.ArgumentParser(prog="python -m experiments.report",
                                 description="Renders a finished run's report again.")
  parser.add_argument("workdir", help="a finished run's directory (holds results.json)")
  args = parser.parse_args(argv)
  with exit_on_user_error():
    path = render(args.workdir)
  print(f"report written to {path}")


if __name__ == "__main__":
  main()
