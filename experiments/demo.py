"""The main job: every study at small scale on the embedded digits data, as one report.

``python -m experiments.demo --workdir runs/demo`` (what ``make demo`` runs) writes
``report.md`` and its figures into the workdir; each study keeps its own run directory below it,
so re-running resumes instead of starting over.
"""

from __future__ import annotations

import pathlib
import time

import jax

from experiments import aws, dense, distill, rst, transfusion
from jaxtickets import report as report_lib
from jaxtickets import errors
from jaxtickets.errors import exit_on_user_error

# Each study module contributes ``demo_section(report, workdir)``, run in this order.
STUDIES = (dense, rst, aws, distill, transfusion)


def run(workdir: str | pathlib.Path) -> pathlib.Path:
  workdir = pathlib.Path(workdir)
  report = report_lib.Report(workdir, "jaxtickets demo (digits, CPU scale)")
  for study in STUDIES:
    started = time.perf_counter()
    study.demo_section(report, workdir)
    name = study.__name__.rsplit(".", 1)[-1]
    report.text(f"_{name} section: {time.perf_counter() - started:.0f} s on "
                f"{jax.default_backend()}_\n")
  return report.write()


def main(argv=None) -> None:
  parser = errors.ArgumentParser(description=__doc__.strip().splitlines()[0])
  parser.add_argument("--workdir", default="runs/demo")
  args = parser.parse_args(argv)
  with exit_on_user_error():
    path = run(args.workdir)
  print(f"report written to {path}")


if __name__ == "__main__":
  main()
