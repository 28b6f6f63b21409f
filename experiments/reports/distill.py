"""The dataset distillation report: evaluation table, matching loss, the distilled images."""

from __future__ import annotations

import pathlib
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from jaxtickets import report as report_lib


def title(results: dict[str, Any]) -> str:
  return f"Dataset distillation: {results['method']['name']} on {results['dataset']}"


def evaluation_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
  """One row per evaluated set: what it is, its size and cost, and its test accuracy."""
  distill_summary = results["distill"]
  method = results["method"]
  pool_seconds = results["pool"]["seconds"] if results["pool"] else 0.0
  rows = [{"training set": f"{method['name']} (factor {method['factor']})",
           "stored images / class": results["ipc"],
           "training images / class": results["decoded_per_class"],
           "outer iterations": distill_summary["outer_iterations"],
           "nets per update": distill_summary["num_models"],
           ("pool + distill s" if results["pool"] else "distill s"):
               distill_summary["seconds"] + pool_seconds,
           "test accuracy": _mean_std(results["evaluation"]["distilled"])}]
  if "random_real" in results["evaluation"]:
    rows.append({"training set": "random real images", "stored images / class": results["ipc"],
                 "training images / class": results["ipc"],
                 "test accuracy": _mean_std(results["evaluation"]["random_real"])})
  return rows


def _mean_std(evaluation: dict[str, Any]) -> str:
  return f"{100 * evaluation['mean']:.2f} +- {100 * evaluation['std']:.2f}"


def image_grid(images: np.ndarray) -> plt.Figure:
  """Stored images f32[K, ipc, H, W, C] as a K x min(ipc, 10) grid, one row per class."""
  num_classes, per_class = images.shape[:2]
  columns = min(per_class, 10)
  fig, axes = plt.subplots(num_classes, columns, figsize=(columns * 0.8, num_classes * 0.8),
                           squeeze=False, dpi=100)
  for label in range(num_classes):
    for column in range(columns):
      ax = axes[label, column]
      image = np.clip(images[label, column], 0, 1)
      ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1)
      ax.set_xticks([])
      ax.set_yticks([])
      if column == 0:
        ax.set_ylabel(str(label), fontsize=7)
  fig.tight_layout(pad=0.2)
  return fig


def add_sections(report: report_lib.Report, results: dict[str, Any],
                 workdir: pathlib.Path) -> None:
  """The distillation section: evaluation table, loss curve and the images of
  ``workdir/synthetic.npz`` (drawn into ``workdir/synthetic.png``)."""
  method = results["method"]
  protocol = results["evaluation"]["protocol"]
  distill_summary = results["distill"]
  pool = results["pool"]
  pool_text = (f" The {pool['size']} early-stage nets ({pool['epochs']} epochs on the real data) "
               f"reach {100 * pool['mean']:.1f}% test accuracy; each outer iteration draws one "
               f"per matched net{' and perturbs it' if method['perturb'] else ''}."
               if pool else "")
  augmentation = " + ".join(
      ["DSA"] * (protocol["strategy"] != "none") + ["CutMix"] * (protocol["mix_probability"] > 0))
  report.section(
      "Dataset distillation",
      f"{method['name']} on {results['dataset']} ({results['train_size']} training images, "
      f"{results['num_classes']} classes, {'x'.join(map(str, results['image_shape']))}), "
      f"{results['ipc']} stored images per class (factor {method['factor']}: "
      f"{results['decoded_per_class']} training images per class), "
      f"{distill_summary['outer_iterations']} outer x {distill_summary['inner_iterations']} "
      f"inner iterations with {distill_summary['num_models']} net(s) per update."
      f"{pool_text} Evaluation: {protocol['num_nets']} fresh {results['model']}s per set trained "
      f"as one population for {protocol['epochs']} epochs ({augmentation or 'no augmentation'}), "
      f"final test accuracy "
      f"mean +- std over the nets, in %. Wall times: training with compilation, summed over "
      f"resumed runs; the last ran on {results['device']}.")
  report.text(report_lib.markdown_table(evaluation_rows(results), float_format="{:.0f}"))
  report.figure("distill_loss", report_lib.line_plot(
      {"matching loss": (distill_summary["loss_steps"], distill_summary["loss"])},
      xlabel="inner iteration", ylabel="loss (mean over the interval)",
      title=f"{method['name']} matching loss"), "Matching loss during distillation")
  workdir = pathlib.Path(workdir)
  with np.load(workdir / "synthetic.npz") as saved:
    figure = image_grid(saved["images"])
  figure.savefig(workdir / "synthetic.png")
  plt.close(figure)
  report.text(f"![Distilled images, one row per class]({_relative(workdir, report)}"
              "synthetic.png)\n")


def _relative(workdir: pathlib.Path, report: report_lib.Report) -> str:
  """Path prefix of ``workdir`` as seen from the report's directory."""
  try:
    relative = workdir.resolve().relative_to(report.directory.resolve())
  except ValueError:
    return f"{workdir.resolve()}/"
  return "" if str(relative) == "." else f"{relative}/"
