"""Classification metrics (pure JAX) and the per-epoch JSONL log."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxtickets import files
from jaxtickets.errors import UserError


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Fraction of ``argmax(logits: f32[N, K]) == labels: i32[N]``."""
  return jnp.mean(jnp.argmax(logits, -1) == labels)


def _binary_auc(scores: jax.Array, positive: jax.Array) -> jax.Array:
  """Mann-Whitney ROC-AUC of ``scores: f32[N]`` for ``positive: bool[N]``; ties count one half."""
  ordered = jnp.sort(scores)
  # Average 1-based rank of each score, which gives tied scores half credit.
  ranks = (jnp.searchsorted(ordered, scores, side="left")
           + jnp.searchsorted(ordered, scores, side="right") + 1) / 2
  # Float counts: the int32 products num_pos * num_neg overflow past ~46k examples per side.
  num_pos = jnp.sum(positive, dtype=jnp.float32)
  num_neg = positive.shape[0] - num_pos
  rank_sum = jnp.sum(jnp.where(positive, ranks, 0.0))
  auc = (rank_sum - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg)
  # NaN scores (a diverged network) have no rank: the AUC is NaN, not a number near chance.
  return jnp.where(jnp.any(jnp.isnan(scores)), jnp.nan, auc)


def roc_auc(scores: jax.Array, labels: jax.Array) -> jax.Array:
  """ROC-AUC, binary or one-vs-rest macro average.

  Args:
    scores: f32[N] (score of the positive class) or f32[N, K] (per-class scores; for K = 2
      the second column is the positive class, and logits rank as probabilities do; for
      K > 2 pass probabilities, as scikit-learn's one-vs-rest does: logits rank differently).
    labels: i32[N] in [0, K).

  Returns:
    f32[]; NaN when a class has no positive or no negative example, or a score is NaN.

  Raises:
    UserError: scores f32[N, 1] (ambiguous: one class's column or the positive scores).
  """
  scores = jnp.asarray(scores, jnp.float32)
  if scores.ndim == 2 and scores.shape[1] == 1:
    raise UserError("roc_auc got scores f32[N, 1]: pass the positive class's scores as f32[N], "
                    "or one column per class")
  if scores.ndim == 1:
    return _binary_auc(scores, labels == 1)
  if scores.shape[1] == 2:
    # Softmax is monotone in the logit difference, so this ranks like the probability.
    return _binary_auc(scores[:, 1] - scores[:, 0], labels == 1)
  classes = jnp.arange(scores.shape[1])
  per_class = jax.vmap(lambda k: _binary_auc(scores[:, k], labels == k))(classes)
  return jnp.mean(per_class)


def jsonable(value: Any) -> Any:
  """Arrays and numpy scalars as plain Python numbers and lists, recursively."""
  if isinstance(value, Mapping):
    return {k: jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [jsonable(v) for v in value]
  if isinstance(value, (jax.Array, np.ndarray, np.generic)):
    value = np.asarray(value)
    return value.item() if value.ndim == 0 else value.tolist()
  return value


class MetricsLog:
  """Append-only JSONL file, one record per evaluation, keyed by ``step``.

  On resume, ``truncate(step)`` drops records written after the checkpoint being resumed, so a
  killed-and-resumed run ends with the same log as an uninterrupted one.
  """

  def __init__(self, path: str | pathlib.Path):
    self.path = pathlib.Path(path)

  def write(self, step: int, **values: Any) -> None:
    """Appends ``{"step": step, **values}`` (arrays as lists)."""
    self.path.parent.mkdir(parents=True, exist_ok=True)
    with self.path.open("a") as f:
      f.write(json.dumps({"step": int(step), **jsonable(values)}) + "\n")

  def read(self) -> list[dict[str, Any]]:
    """Every record, oldest first ([] before the first write); a last line cut short by a kill
    during its write is not a record."""
    if not self.path.exists():
      return []
    lines = self.path.read_text().splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
      lines.pop()
    records = []
    for number, line in enumerate(lines, 1):
      if not line.strip():
        continue
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        raise UserError(f"{self.path} line {number} is not a JSON record; the run directory "
                        "was modified, use a new --workdir") from None
    return records

  def truncate(self, step: int) -> None:
    """Drops the records after ``step`` (and a cut-short last line)."""
    kept = [r for r in self.read() if r["step"] <= step]
    files.write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
