"""Transfusion's report: findings, AUC table, convergence curves, CCA by unit, first-layer filters.

Reads a finished run's ``results.json`` and ``filters.npz`` (see ``experiments/transfusion.py``).
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from jaxtickets import report as report_lib

_MAX_FILTERS = 16
_PAIR_TITLES = {"random_init_vs_trained": "random: init vs trained",
                "transfer_init_vs_trained": "transfer: init vs trained",
                "transfer_vs_random": "trained transfer vs trained random",
                "random_vs_random": "trained random vs random (2 seeds)",
                "chance": "independent noise (chance level)"}


def title(results: dict[str, Any]) -> str:
  return f"Transfusion: {results['source']['dataset']} -> {results['target']['dataset']}"


def _mean_std(values: Sequence[float] | None) -> str:
  if values is None:
    return ""
  values = np.asarray(values, np.float64)
  return f"{values.mean():.3f} ± {values.std():.3f}"


def _mean_steps(values: Sequence[float | None]) -> str:
  reached = [v for v in values if v is not None]
  if len(reached) < len(values):
    return f"{len(values) - len(reached)}/{len(values)} never" + (
        f"; others {np.mean(reached):.0f}" if reached else "")
  return f"{np.mean(reached):.0f}"


def auc_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
  """One row per (model, arm): test AUC (mean ± std over seeds) per regime, and convergence."""
  rows = []
  for model, model_results in results["models"].items():
    regimes = model_results["regimes"]
    arm_names = list(dict.fromkeys(arm for regime in regimes.values() for arm in regime["arms"]))
    for arm in arm_names:
      row = {"model": model, "arm": arm}
      for regime, regime_results in regimes.items():
        arm_results = regime_results["arms"].get(arm)
        row[f"test AUC ({regime})"] = _mean_std(arm_results and arm_results["test_auc"])
      full = regimes["full"]["arms"].get(arm)
      if full is not None:
        row["steps to threshold (full)"] = _mean_steps(full["steps_to_threshold"])
        row["speed-up vs random (full)"] = ("" if full["speedup"] is None
                                            else f"{full['speedup']:.2f}x")
      rows.append(row)
  return rows


def _auc_gain(results: dict[str, Any], model: str, regime: str, arm: str) -> float | None:
  regimes = results["models"][model]["regimes"]
  if regime not in regimes or arm not in regimes[regime]["arms"]:
    return None
  arms = regimes[regime]["arms"]
  return float(np.mean(arms[arm]["test_auc"]) - np.mean(arms["random"]["test_auc"]))


def findings(results: dict[str, Any]) -> str:
  """The paper's findings on final AUC and convergence (numbers), and on how much each layer
  and model changes (numbers and a verdict), read off ``results``."""
  lines = []
  for model, model_results in results["models"].items():
    parts = []
    for regime in model_results["regimes"]:
      gain = _auc_gain(results, model, regime, "transfer")
      if gain is not None:
        parts.append(f"{regime} {gain:+.3f}")
    if parts:
      lines.append(f"  - {model} ({model_results['num_params']:,} params): "
                   + ", ".join(parts))
  if lines:
    lines.insert(0, "- **Transfer vs random init** (test AUC of transfer minus random, mean "
                    "over seeds):")
  speedups = []
  for model, model_results in results["models"].items():
    arms = model_results["regimes"]["full"]["arms"]
    for arm in ("meanvar", "transfer"):
      if arm in arms:
        value = arms[arm]["speedup"]
        speedups.append(f"{model} {arm} {'n/a' if value is None else f'{value:.2f}x'}")
  if speedups:
    lines.append(f"- **Convergence speed-up over random init** (steps until the validation AUC "
                 f"reaches {results['convergence_fraction']:.0%} of random init's final one, "
                 f"full data, measured every {results['eval_every_steps']} steps): "
                 + "; ".join(speedups) + ".")
  changes, by_size = [], []
  method = similarity_method(results)
  for model, result in results["similarity"].items():
    if result is None:
      continue
    curves = result[method]
    # Above chance: unrelated representations of few datapoints per neuron score well above 0.
    above = np.asarray(curves["random_init_vs_trained"]) - np.asarray(curves["chance"])
    half = max(len(above) // 2, 1)
    lower, upper = above[:half].mean(), above[half:].mean()
    listed = "; ".join(f"{arm} " + ", ".join(f"{value:.2f}" for value in curves[pair])
                       for arm, pair in (("random", "random_init_vs_trained"),
                                         ("transfer", "transfer_init_vs_trained"),
                                         ("chance", "chance")))
    changes.append(f"{model}: {listed} (random init, seed 0, above chance: lower half "
                   f"{lower:.3f} vs upper half {upper:.3f}, "
                   f"{_verdict(lower > upper, above)})")
    by_size.append((results["models"][model]["num_params"], model, above.mean()))
  if changes:
    lines.append(f"- **Do lower layers change less?** {method.upper()} of each unit (lowest "
                 "first) before vs after training (higher = changed less; chance: independent "
                 "noise of the unit's shape): " + " | ".join(changes) + ".")
  if len(by_size) > 1:
    by_size.sort()
    means = [mean for _, _, mean in by_size]
    confirmed = all(smaller < larger for smaller, larger in zip(means, means[1:]))
    lines.append("- **Do larger models change less?** Mean over units of the similarity above "
                 "chance (random init, seed 0), smallest model first: "
                 + ", ".join(f"{model} ({size:,} params) {mean:.3f}"
                             for size, model, mean in by_size)
                 + f": {_verdict(confirmed, means)}.")
  return "\n".join(lines)


def _verdict(confirmed: bool, values: Any) -> str:
  """"confirmed" or "NOT confirmed", or "undefined" when the similarities it was read from
  hold a NaN (a unit whose activations are constant, where CCA is undefined)."""
  if np.isnan(np.asarray(values, np.float64)).any():
    return "undefined (a unit's activations are constant on the probe)"
  return "confirmed" if confirmed else "NOT confirmed"


def similarity_method(results: dict[str, Any]) -> str | None:
  """The first configured similarity method (the one the findings and the figure show)."""
  for result in results["similarity"].values():
    if result:
      return next(key for key in result if key != "layers")
  return None


def convergence_figure(results: dict[str, Any]) -> plt.Figure:
  """Validation AUC vs step, mean over seeds: one panel per (model, regime)."""
  panels = [(model, regime) for model, model_results in results["models"].items()
            for regime in model_results["regimes"]]
  columns = min(2, len(panels))
  rows = -(-len(panels) // columns)
  fig, axes = plt.subplots(rows, columns, figsize=(5.5 * columns, 3.6 * rows), dpi=100,
                           squeeze=False)
  for ax, (model, regime) in zip(axes.flat, panels):
    regime_results = results["models"][model]["regimes"][regime]
    for arm, arm_results in regime_results["arms"].items():
      ax.plot(regime_results["steps"], np.mean(arm_results["val_auc"], axis=1), marker="o",
              markersize=2, label=arm)
    ax.axhline(regime_results["threshold"], color="gray", linestyle=":", linewidth=1)
    ax.set_title(f"{model}, {regime} data")
    ax.set_xlabel("step")
    ax.set_ylabel("validation ROC-AUC")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  for ax in list(axes.flat)[len(panels):]:
    ax.axis("off")
  fig.tight_layout()
  return fig


def similarity_figure(results: dict[str, Any], method: str) -> plt.Figure:
  """``method`` similarity by unit (lowest left), one panel per model."""
  entries = [(model, result) for model, result in results["similarity"].items() if result]
  fig, axes = plt.subplots(1, len(entries), figsize=(5.5 * len(entries), 3.8), dpi=100,
                           squeeze=False)
  for ax, (model, result) in zip(axes.flat, entries):
    for pair, values in result[method].items():
      style = {"color": "gray", "linestyle": ":"} if pair == "chance" else {}
      ax.plot(range(len(values)), values, marker="o", markersize=3, label=_PAIR_TITLES[pair],
              **style)
    ax.set_xticks(range(len(result["layers"])), result["layers"], rotation=45, ha="right",
                  fontsize=7)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel(method.upper())
    ax.set_title(model)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  return fig


def filter_rows(filters: dict[str, np.ndarray], seeds: int) -> dict[str, np.ndarray]:
  """The filter figure's rows, f[k, k, C_out] each, from ``filters.npz``: seed 0 of the arms
  (``arms``) at init (``initial``) and trained (``trained``), and the source's kernel."""
  arms = [str(arm) for arm in filters["arms"]]

  def seed0(name: str, arm: str) -> np.ndarray:
    return filters[name][arms.index(arm) * seeds]

  rows = {"random init": seed0("initial", "random"), "random, trained": seed0("trained", "random")}
  if "transfer" in arms:
    rows["pretrained (source)"] = filters["pretrained"]
    rows["transfer, trained"] = seed0("trained", "transfer")
  for arm, row in (("meanvar", "Mean-Var init"), ("gabor", "Gabor init")):
    if arm in arms:
      rows[row] = seed0("initial", arm)
  return rows


def filter_figure(rows: dict[str, np.ndarray]) -> plt.Figure:
  """First-layer filters (kernels summed over input channels), one row per network."""
  count = min(_MAX_FILTERS, min(kernels.shape[-1] for kernels in rows.values()))
  fig, axes = plt.subplots(len(rows), count, figsize=(0.8 * count + 1.6, 0.9 * len(rows)),
                           dpi=100, squeeze=False)
  for row, (name, kernels) in zip(axes, rows.items()):
    for index, ax in enumerate(row):
      kernel = kernels[..., index]
      bound = max(float(np.abs(kernel).max()), 1e-12)
      ax.imshow(kernel, cmap="gray", vmin=-bound, vmax=bound)
      ax.set_xticks([])
      ax.set_yticks([])
    row[0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=7)
  fig.tight_layout()
  return fig


def add_sections(report: report_lib.Report, results: dict[str, Any],
                 workdir: pathlib.Path) -> None:
  """The Transfusion section: findings, AUC table, convergence, CCA by unit, filters."""
  source, target = results["source"], results["target"]
  sizes = target["split_sizes"]
  pretrained = ", ".join(f"{model} {summary['test_accuracy']:.3f}"
                         for model, summary in source["models"].items())
  report.section(
      "Transfusion: transfer learning vs random init",
      f"Source {source['dataset']} ({source['classes']} classes, "
      f"{'x'.join(map(str, source['image_shape']))}); source test accuracy after pretraining: "
      f"{pretrained}. Target {target['dataset']} ({target['classes']} classes, "
      f"{'x'.join(map(str, target['image_shape']))}; train {sizes['train_full']}"
      + (f", reduced {sizes['train_reduced']}" if "train_reduced" in sizes else "")
      + f", validation {sizes['val']}, test {sizes['test']}). Every arm trains "
      f"{results['steps']} steps in both regimes, {results['seeds']} seeds per arm as one "
      f"population; test ROC-AUC of the last step (one-vs-rest macro average for more than two "
      f"classes). Mean-Var BatchNorm choice: {results['meanvar_norm_init']}.")
  report.text(findings(results) + "\n")
  report.text(report_lib.markdown_table(auc_rows(results)))
  report.figure("transfusion_convergence", convergence_figure(results),
                "Validation ROC-AUC during training (mean over seeds; dotted: the convergence "
                "threshold)")
  method = similarity_method(results)
  if method is not None:
    report.figure("transfusion_cca_by_layer", similarity_figure(results, method),
                  f"{method.upper()} by unit (lowest left) on target test images")
  with np.load(workdir / "filters.npz") as filters:
    rows = filter_rows(dict(filters), results["seeds"])
  report.figure("transfusion_conv1_filters", filter_figure(rows),
                f"First-layer filters of {results['filters_model']} (seed 0)")
