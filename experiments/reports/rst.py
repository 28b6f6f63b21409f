"""The RST + R2S report: per-ticket test accuracies, the paper's two findings, R2S's evaluations
and the transfer matrix as a heatmap (from ``experiments/rst.py``'s ``results.json``)."""

from __future__ import annotations

import pathlib
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from jaxtickets import report as report_lib

SELECTIONS = ("last", "best")
STAGE_TITLES = {"rst": "RST (adversarial search)", "natural": "natural search (edge-popup)",
                "dense": "dense, adversarially trained", "finetune": "RST, fine-tuned"}


def title(results: dict[str, Any]) -> str:
  return f"RST + R2S: {results['model']} on {results['dataset']}"


def _column_titles(steps: int) -> dict[str, str]:
  """Test-split columns of the per-ticket table, in order."""
  return {"clean": "clean", "pgd": f"PGD-{steps}", "cw": f"CW-{steps}", "apgd_ce": "APGD-CE",
          "apgd_dlr": "APGD-DLR"}


def ticket_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
  """One row per (stage, selection, member) with its test accuracies."""
  steps = results["attack"]["eval"]["pgd_steps"]
  titles = _column_titles(steps)
  rows = []
  for stage, tables in results["tickets"].items():
    for selection in SELECTIONS:
      table = tables[selection]
      for member in range(len(table["clean"])):
        row = {"network": STAGE_TITLES[stage],
               "keep ratio": 1.0 if stage == "dense" else results["keep_ratios"][member],
               "checkpoint": selection if selection == "last" else
               f"best val PGD-{steps} (epoch {table['epoch'][member]})"}
        row.update({title: table[column][member] for column, title in titles.items()
                    if column in table})
        rows.append(row)
  return rows


def r2s_rows(r2s: dict[str, Any], keep_ratios: list[float], steps: int) -> list[dict[str, Any]]:
  return [
      {"evaluation": "clean (expected over the switch)", "accuracy": r2s["clean"]},
      {"evaluation": f"(a) white-box PGD-{steps} on each single RST, mean of "
                     + ", ".join(f"{a:.3f}" for a in r2s["white_box"]),
       "accuracy": r2s["white_box_mean"]},
      {"evaluation": f"(b) transfer: PGD-{steps} crafted on RST i, evaluated on RST j != i "
                     f"(mean of {len(keep_ratios) * (len(keep_ratios) - 1)} pairs)",
       "accuracy": r2s["transfer_mean"]},
      {"evaluation": "(c) R2S vs an attacker who white-box attacks a randomly drawn RST",
       "accuracy": r2s["random_ticket_attacker"]},
      {"evaluation": f"(d) R2S vs adaptive EOT-PGD-{steps} ({r2s['eot_samples']} switch samples "
                     f"per step): the honest number", "accuracy": r2s["eot_attacker"]},
  ]


def findings(results: dict[str, Any]) -> str:
  """The paper's two claims, read off ``results``: inborn robustness and poor transfer."""
  steps = results["attack"]["eval"]["pgd_steps"]
  lines = []
  if "natural" in results["tickets"]:
    pairs = ", ".join(
        f"{ratio:g}: {adversarial:.3f} vs {natural:.3f}" for ratio, adversarial, natural in zip(
            results["keep_ratios"], results["tickets"]["rst"]["last"]["pgd"],
            results["tickets"]["natural"]["last"]["pgd"]))
    lines.append(f"- PGD-{steps} test accuracy, adversarially vs naturally searched ticket at "
                 f"the same keep ratio (last epoch): {pairs}.")
  r2s = results["r2s"]
  if len(results["keep_ratios"]) > 1:  # One ticket has no transfer to compare.
    lines.append(f"- Transfer between RSTs of different ratios: off-diagonal mean "
                 f"{r2s['transfer_mean']:.3f} vs white-box diagonal mean "
                 f"{r2s['white_box_mean']:.3f}; the adaptive EOT attacker leaves R2S "
                 f"{r2s['eot_attacker']:.3f}.")
  return "\n".join(lines)


def transfer_heatmap(matrix: Any, keep_ratios: list[float], steps: int) -> plt.Figure:
  """Matplotlib figure of the transfer matrix (rows: attacked ticket, columns: evaluated)."""
  matrix = np.asarray(matrix)
  fig, ax = plt.subplots(figsize=(4.5, 4), dpi=100)
  vmax = max(float(matrix.max()), 1e-6)
  image = ax.imshow(matrix, cmap="viridis", vmin=0.0, vmax=vmax)
  labels = [f"{ratio:g}" for ratio in keep_ratios]
  ax.set_xticks(range(len(labels)), labels)
  ax.set_yticks(range(len(labels)), labels)
  ax.set_xlabel("evaluated on RST (keep ratio)")
  ax.set_ylabel(f"PGD-{steps} crafted on RST (keep ratio)")
  for (row, column), value in np.ndenumerate(matrix):
    ax.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=8,
            color="k" if value > 0.6 * vmax else "w")  # legible on viridis' light end
  fig.colorbar(image, ax=ax, label="accuracy")
  fig.tight_layout()
  return fig


def add_sections(report: report_lib.Report, results: dict[str, Any],
                 workdir: pathlib.Path) -> None:
  """The RST + R2S section: per-ticket table, R2S table and the transfer heatmap."""
  del workdir  # Everything is in results.json.
  attack = results["attack"]
  steps = attack["eval"]["pgd_steps"]
  # The attacks that ran (APGD-DLR needs 3 classes: the evaluator drops it on fewer).
  ran = results["tickets"]["rst"]["last"]
  attacks = [name for name in attack["eval"]["attacks"] if name in ran]
  attack_names = ", ".join(_column_titles(steps)[name] for name in attacks)
  stepped = " and ".join(name.upper() for name in ("pgd", "cw") if name in attacks)
  apgd = [name for name in attacks if name.startswith("apgd")]
  sizes = results["split_sizes"]
  report.section(
      "Robust Scratch Tickets and R2S",
      f"{results['model']} on {results['dataset']} (train {sizes['train']}, validation "
      f"{sizes['val']}, test {sizes['test']}); {len(results['keep_ratios'])} tickets of keep "
      f"ratios {results['keep_ratios']} drawn from one random network and searched as one "
      f"population for {results['epochs']} epochs with PGD-{attack['train']['num_steps']} "
      f"(eps {attack['train']['eps']:.4g}). Test accuracies under white-box attacks of eps "
      f"{attack['eval']['eps']:.4g}: {attack_names} ("
      + ", ".join([f"{stepped} step {attack['eval']['step_size']:.4g}"] * bool(stepped)
                  + [f"APGD {attack['eval']['apgd_steps']} steps"] * bool(apgd))
      + "). "
      f"Checkpoints: the last epoch, and per ticket the epoch of best PGD-{steps} accuracy on the "
      f"validation split (never the test split).")
  report.text(findings(results) + "\n")
  report.text(report_lib.markdown_table(ticket_rows(results), float_format="{:.3f}"))
  r2s = results["r2s"]
  report.text(f"\n**R2S** over the selected RSTs (switch {r2s['switch']}; accuracies are exact "
              f"expectations over the switch):\n")
  report.text(report_lib.markdown_table(r2s_rows(r2s, results["keep_ratios"], steps),
                                        float_format="{:.3f}"))
  report.figure("rst_transfer_matrix",
                transfer_heatmap(r2s["transfer_matrix"], results["keep_ratios"], steps),
                f"Transfer matrix: PGD-{steps} crafted on one RST, accuracy of another")
