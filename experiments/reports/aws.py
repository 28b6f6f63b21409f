"""A Winning Sign's report: findings, pruning and transfer tables, accuracy and barrier plots."""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from typing import Any

import numpy as np

from jaxtickets import report as report_lib

# Curve names in tables and plots, by transfer variant.
_TRANSFER_TITLES = {"sign": "sign transfer", "mask": "mask transfer", "retrain": "retrain"}


def title(results: dict[str, Any]) -> str:
  return f"A Winning Sign: {results['model']} on {results['dataset']}"


def _paired(first: dict[str, list], second: dict[str, list], value: str) -> list[tuple]:
  """(density, first's value, second's value) at the rounds both curves have."""
  by_round = dict(zip(second["round"], second[value]))
  return [(density, a, by_round[round_index])
          for round_index, density, a in zip(first["round"], first["density"], first[value])
          if round_index in by_round]


def _comparison(pairs: list[tuple], wins_key: str, aws_wins: Callable[[float, float], bool],
                ) -> dict[str, Any]:
  """AWS vs LRR at each density of ``pairs`` ((density, aws, lrr)), and how often AWS wins."""
  return {"density": [d for d, _, _ in pairs], "aws": [a for _, a, _ in pairs],
          "lrr": [b for _, _, b in pairs], wins_key: sum(aws_wins(a, b) for _, a, b in pairs),
          "ties": sum(a == b for _, a, b in pairs), "points": len(pairs)}


def findings(results: dict[str, Any]) -> dict[str, Any]:
  """The paper's two claims, read off the results: lower init-norm barrier for AWS than LRR,
  and higher accuracy of AWS's sign transfer than LRR's at the same density."""
  found = {}
  barriers = results["barriers"].get("init_norm", {})
  if {"lrr", "aws"} <= set(barriers):
    def rows(method):
      return {"round": [row["round"] for row in barriers[method]],
              "density": [row["density"] for row in barriers[method]],
              "barrier": [row["barrier"] for row in barriers[method]]}
    found["init_norm_barrier"] = _comparison(_paired(rows("aws"), rows("lrr"), "barrier"),
                                             "aws_lower", lambda a, b: a < b)
  transfer = results["transfer"]
  if "aws_sign" in transfer and "lrr_sign" in transfer:
    found["sign_transfer_accuracy"] = _comparison(
        _paired(transfer["aws_sign"], transfer["lrr_sign"], "mean_accuracy"), "aws_higher",
        lambda a, b: a > b)
  return found


# Per finding: the line's opening, its ``_comparison`` wins key, and the wins' wording.
_FINDING_TEXT = {
    "init_norm_barrier": (
        "Error barrier between each round's trained network and the same network with "
        "initialized norm params, AWS vs LRR (density: AWS vs LRR)", "aws_lower", "AWS lower at"),
    "sign_transfer_accuracy": (
        "Test accuracy of sign transfer to a fresh init, AWS vs LRR ticket (density: AWS vs "
        "LRR, mean over seeds)", "aws_higher", "AWS higher at"),
}


def findings_text(found: dict[str, Any]) -> str:
  lines = []
  for name, (opening, wins_key, wins_words) in _FINDING_TEXT.items():
    if name not in found:
      continue
    f = found[name]
    pairs = ", ".join(f"{d:.3g}: {a:.3f} vs {b:.3f}"
                      for d, a, b in zip(f["density"], f["aws"], f["lrr"]))
    lines.append(f"- {opening}: {pairs}. {wins_words} {f[wins_key]} of {f['points']} densities "
                 f"({f['ties']} ties).")
  return "\n".join(lines)


def _curve_title(name: str) -> str:
  if name == "dense":
    return "dense"
  method, variant = name.split("_", 1)
  return f"{method.upper()} {_TRANSFER_TITLES[variant]}"


def accuracy_figure(results: dict[str, Any]):
  transfer = results["transfer"]
  series = {}
  for name, curve in transfer.items():
    if name == "dense":
      densities = [d for other in transfer.values() for d in other["density"]] or [1.0]
      series["dense"] = ([min(densities), 1.0], [curve["mean_accuracy"][0]] * 2)
    else:
      series[_curve_title(name)] = (curve["density"], curve["mean_accuracy"])
  fig = report_lib.line_plot(series, xlabel="density (fraction of prunable weights kept)",
                             ylabel="test accuracy", logx=True,
                             title=f"{results['model']} on {results['dataset']}")
  fig.axes[0].invert_xaxis()
  return fig


def barrier_figure(results: dict[str, Any]):
  series = {}
  titles = {"init_norm": "trained vs initialized norms", "sign_vs_retrain": "sign vs retrain",
            "sign_seeds": "sign transfer, two seeds"}
  for family, by_method in results["barriers"].items():
    for method, rows in by_method.items():
      series[f"{method.upper()}: {titles[family]}"] = ([row["density"] for row in rows],
                                                      [row["barrier"] for row in rows])
  fig = report_lib.line_plot(series, xlabel="density", ylabel="error barrier", logx=True,
                             title="Linear mode connectivity")
  fig.axes[0].invert_xaxis()
  return fig


def curves_figure(results: dict[str, Any]):
  """Error along the line at the sparsest density of every family."""
  series = {}
  for family, by_method in results["barriers"].items():
    for method, rows in by_method.items():
      row = min(rows, key=lambda row: row["density"])
      points = np.linspace(0, 1, len(row["errors"]))
      series[f"{method.upper()} {family} (density {row['density']:.3g})"] = (points,
                                                                             row["errors"])
  return report_lib.line_plot(series, xlabel="interpolation t (0: first network)",
                              ylabel="test error", title="Error along the linear path")


# How the report names ``pruning.rewind`` (with "init", LRR is IMP with rewinding to init).
_REWIND_TEXT = {"none": " from the pruned network's trained weights",
                "init": " from the run's starting weights under the new mask (rewinding: "
                        "\"lrr\" is then IMP)"}


def add_sections(report: report_lib.Report, results: dict[str, Any],
                 workdir: pathlib.Path) -> None:
  """The AWS section: findings, pruning table, transfer table, three figures."""
  del workdir  # results.json holds everything
  epochs = results["epochs"]
  sizes = results["split_sizes"]
  report.section(
      "A Winning Sign: iterative pruning, sign transfer, linear mode connectivity",
      f"{results['model']} on {results['dataset']} (train {sizes['train']}, test "
      f"{sizes['test']}; {results['prunable_params']} prunable weights). "
      f"{' and '.join(m.upper() for m in results['methods'])} pruned side by side as one "
      f"population: {epochs['warmup']} warm-up epochs, then {results['rounds']} rounds that "
      f"each remove {results['fraction']:.0%} of the surviving weights (global magnitude; "
      f"classifier, biases and norms dense) and train {epochs['per_round']} epochs"
      f"{_REWIND_TEXT[results['rewind']]}; each round's trained network is its ticket. "
      f"Tickets transferred to a fresh init and trained "
      f"{epochs['transfer']} epochs as one population; "
      f"error barriers with BatchNorm recalibrated at each of the {results['lmc_points']} "
      f"points of a path (so a curve's end can differ from the pruning table's accuracy, "
      f"which uses the running statistics of training, for AWS gathered under random "
      f"interpolation).")
  report.text(findings_text(findings(results)) + "\n")
  rows = []
  for method, curve in results["pruning"].items():
    for round_index, (density, accuracy) in enumerate(zip(curve["density"],
                                                          curve["test_accuracy"])):
      rows.append({"method": method.upper(), "round": round_index, "trained at density": density,
                   "test accuracy": accuracy})
  report.text(report_lib.markdown_table(rows, float_format="{:.3f}"))
  rows = [{"network": _curve_title(name), "density": density, "test accuracy": mean}
          for name, curve in results["transfer"].items()
          for density, mean in zip(curve["density"], curve["mean_accuracy"])]
  report.text("\n" + report_lib.markdown_table(rows, float_format="{:.3f}"))
  report.figure("aws_accuracy_vs_density", accuracy_figure(results),
                "Test accuracy vs density after training from each transfer")
  if results["barriers"]:
    report.figure("aws_barriers", barrier_figure(results), "Error barrier vs density")
    report.figure("aws_error_curves", curves_figure(results), "Test error along linear paths")
