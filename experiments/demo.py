"""The main job: every study at small scale on the embedded digits data, as one report.

``python -m experiments.demo --workdir runs/demo`` (what ``make demo`` runs) writes
``report.md`` and its figures into the workdir; each study keeps its own run directory below it,
so re-running resumes instead of starting over.
"""

from __future__ import annotations

import importlib
import pathlib
import time

import jax

from experiments import report as report_module
from jaxtickets import errors
from jaxtickets import report as report_lib
from jaxtickets.errors import exit_on_user_error

# (study, its preset), run in this order, each into ``workdir / study``.
STUDIES = (("dense", "digits_convnet3"), ("rst", "digits"), ("aws", "digits"),
           ("distill", "digits"), ("transfusion", "digits"))


def run(workdir: str | pathlib.Path) -> pathlib.Path:
  workdir = pathlib.Path(workdir)
  report = report_lib.Report(workdir, "jaxtickets demo (digits, CPU scale)")
  for study, preset in STUDIES:
    started = time.perf_counter()
    runner = importlib.import_module(f"experiments.{study}")
    configs = importlib.import_module(f"experiments.configs.{study}")
    runner.train_and_evaluate(configs.get_config(preset), workdir / study)
    report_module.render(workdir / study)  # The study's own report.md, as its command writes.
    # The sections come from results.json, as ``python -m experiments.report`` renders them.
    results = report_module.load(workdir / study)
    report_module.module(study).add_sections(report, results, workdir / study)
    report.text(f"_{study} section: {time.perf_counter() - started:.0f} s on "
                f"{jax.default_backend()}_\n")
  return report.write()


def main(argv=None) -> None:
  parser = errors.ArgumentParser(description=__doc__.strip().splitlines()[0])
  parser.add_argument("--workdir", default="runs/demo")
  workdir = parser.parse_args(argv).workdir
  with exit_on_user_error():
    print(f"report written to {run(workdir)}")


if __name__ == "__main__":
  main()
