"""Markdown reports with matplotlib figures (PNG files next to the markdown)."""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # Reports are written on headless machines.
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from jaxtickets.errors import UserError  # noqa: E402


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None,
                   float_format: str = "{:.4g}") -> str:
  """A GitHub markdown table of ``rows`` (dicts), columns in first-seen order by default."""
  if columns is None:
    columns = list(dict.fromkeys(k for row in rows for k in row))

  def cell(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
      return float_format.format(value)
    return "" if value is None else str(value)

  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
  return "\n".join(lines)


def line_plot(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], *, xlabel: str,
              ylabel: str, title: str = "", logx: bool = False) -> plt.Figure:
  """One axes, one line per ``name -> (x, y)``; returns the figure (caller saves it)."""
  fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
  for name, (x, y) in series.items():
    ax.plot(x, y, marker="o", markersize=3, label=name)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  if logx:
    ax.set_xscale("log")
  if title:
    ax.set_title(title)
  ax.grid(alpha=0.3)
  if len(series) > 1:
    ax.legend()
  fig.tight_layout()
  return fig


class Report:
  """Accumulates markdown sections and figures, then writes ``report.md`` into ``directory``."""

  def __init__(self, directory: str | pathlib.Path, title: str):
    self.directory = pathlib.Path(directory)
    try:
      self.directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
      raise UserError(f"cannot create report directory {self.directory}: "
                      f"{error.strerror or error}") from None
    self._parts = [f"# {title}\n"]

  def section(self, title: str, text: str = "") -> None:
    """A ``##`` heading, optionally followed by a paragraph."""
    self._parts.append(f"## {title}\n\n{text}\n" if text else f"## {title}\n")

  def text(self, text: str) -> None:
    """Markdown appended as is."""
    self._parts.append(text + "\n")

  def figure(self, name: str, fig: plt.Figure, caption: str) -> pathlib.Path:
    """Saves ``fig`` as ``<name>.png`` next to the report, closes it, and links it."""
    path = self.directory / f"{name}.png"
    fig.savefig(path)
    plt.close(fig)
    self._parts.append(f"![{caption}]({path.name})\n")
    return path

  def write(self, filename: str = "report.md") -> pathlib.Path:
    """Writes the report; returns its path."""
    path = self.directory / filename
    path.write_text("\n".join(self._parts))
    return path
