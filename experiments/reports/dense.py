"""The dense baseline's report: final test accuracy and the learning curve (``metrics.jsonl``)."""

from __future__ import annotations

import pathlib
from typing import Any

from jaxtickets import metrics
from jaxtickets import report as report_lib


def title(results: dict[str, Any]) -> str:
  return f"Dense {results['model']} on {results['dataset']}"


def add_sections(report: report_lib.Report, results: dict[str, Any],
                 workdir: pathlib.Path) -> None:
  records = metrics.MetricsLog(workdir / "metrics.jsonl").read()
  steps = [r["step"] for r in records]
  name = f"{results['model']} on {results['dataset']}"
  report.section(
      "Dense baseline",
      f"{results['model']} ({results['num_params']:,} parameters) trained on "
      f"{results['dataset']}: final test accuracy **{results['test_accuracy']:.2%}** after "
      f"{results['steps']} steps.")
  report.figure("dense_learning_curve", report_lib.line_plot(
      {"train accuracy": (steps, [r["train_accuracy"] for r in records]),
       "test accuracy": (steps, [r["test_accuracy"] for r in records])},
      xlabel="step", ylabel="accuracy", title=f"Dense {name}"),
      f"Dense {name}: learning curve")
