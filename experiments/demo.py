"""The main job: every study at small scale on the embedded digits data, as one report.

``python -m experiments.demo --workdir runs/demo`` (what ``make demo`` runs) writes
``report.md`` and its figures into the workdir; each study keeps its own run directory below it,
so re-running resumes instead of starting over.
"""

from __future__ import annotations

import argparse
import pathlib
import time

from experiments import dense, rst
from experiments.configs import dense as dense_configs
from jaxtickets import report as report_lib
from jaxtickets.errors import exit_on_user_error


def dense_section(report: report_lib.Report, workdir: pathlib.Path) -> None:
  result = dense.train_and_evaluate(dense_configs.get_config("digits_convnet3"),
                                    workdir / "dense")
  records = result["records"]
  steps = [r["step"] for r in records]
  report.section(
      "Dense baseline",
      f"{result['model']} ({result['num_params']:,} parameters) trained on {result['dataset']}: "
      f"final test accuracy **{result['test_accuracy']:.2%}** after {result['steps']} steps.")
  report.figure("dense_learning_curve", report_lib.line_plot(
      {"train accuracy": (steps, [r["train_accuracy"] for r in records]),
       "test accuracy": (steps, [r["test_accuracy"] for r in records])},
      xlabel="step", ylabel="accuracy", title="Dense ConvNet-3 on digits"),
      "Dense ConvNet-3 learning curve on digits")


SECTIONS = (dense_section, rst.demo_section)


def run(workdir: str | pathlib.Path) -> pathlib.Path:
  workdir = pathlib.Path(workdir)
  report = report_lib.Report(workdir, "jaxtickets demo (digits, CPU scale)")
  for section in SECTIONS:
    started = time.perf_counter()
    section(report, workdir)
    report.text(f"_{section.__name__}: {time.perf_counter() - started:.0f} s_\n")
  return report.write()


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
  parser.add_argument("--workdir", default="runs/demo")
  args = parser.parse_args(argv)
  with exit_on_user_error():
    path = run(args.workdir)
  print(f"report written to {path}")


if __name__ == "__main__":
  main()
