"""The training loop: compiled chunks of steps, evaluation, JSONL metrics, checkpoints, resume.

Works the same for one model and for a population: it only sees a step function and a state
whose ``step`` field counts optimizer steps (per member, all equal).
"""

from __future__ import annotations

import pathlib
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxtickets import checkpoint as checkpoint_lib
from jaxtickets import metrics as metrics_lib
from jaxtickets import train as train_lib
from jaxtickets.errors import UserError

Step = Callable[[Any, train_lib.Data], tuple[Any, Mapping[str, jax.Array]]]


def _current_step(state: Any) -> int:
  return int(np.asarray(jax.device_get(state.step)).reshape(-1)[0])


def default_steps_per_call() -> int:
  """Steps fused into one compiled call: a whole evaluation interval on accelerators, to save a
  dispatch per step; 1 on CPU, where a dispatch costs little next to a step, and one compiled
  step serves intervals of every length (a scan compiles once per length, as long as a step)."""
  return 1 if jax.default_backend() == "cpu" else 1 << 30


def fit(step: Step, state: Any, data: train_lib.Data, *, num_steps: int, eval_every: int,
        evaluate: Callable[[Any], Mapping[str, Any]] | None = None,
        workdir: str | pathlib.Path | None = None, steps_per_call: int | None = None,
        progress: bool = True, description: str = "train",
        step_size: int = 1) -> tuple[Any, list[dict[str, Any]]]:
  """Trains ``state`` for ``num_steps`` steps, resuming from ``workdir`` when it has a checkpoint.

  Every ``eval_every`` steps (and at the end) it evaluates, appends a record to
  ``workdir/metrics.jsonl`` and checkpoints. Because each step draws its batch from
  ``(state.key, state.step)``, a resumed run computes exactly what an uninterrupted one would;
  only the records' ``"seconds"`` differ: the wall time since the training started (compilation
  and evaluations included), summed over the processes that ran it up to their last checkpoint,
  so a resumed or rerun study reports what its training cost, not what its last process did.

  Args:
    step: ``(state, data) -> (state, metrics)``.
    state: a ``TrainState`` or a population of them (leading axis).
    data: the training split.
    num_steps: total optimizer steps, an int >= 0.
    eval_every: steps between evaluations/checkpoints (usually one epoch), an int >= 1.
    evaluate: ``state -> {name: value}`` for the log, or None.
    workdir: where metrics and checkpoints go; None keeps everything in memory.
    steps_per_call: calls of ``step`` run by one compiled ``lax.scan``, an int >= 1 (default:
      ``default_steps_per_call``).
    progress: show a tqdm bar.
    description: the bar's label.
    step_size: how far one call of ``step`` advances ``state.step`` (a step that runs several
      iterations at once), an int >= 1; ``num_steps``, ``eval_every`` and a restored
      ``state.step`` count ``state.step`` and must be multiples of it.

  Returns:
    The final state and the list of logged records (``{"step", "seconds", "train_<metric>",
    <evaluate's names>}``).

  Raises:
    UserError: counts that are not multiples of ``step_size`` (the restored step included: a
      checkpoint of another schedule).
  """
  started = time.perf_counter()
  steps_per_call = steps_per_call or default_steps_per_call()
  log = checkpointer = None
  if workdir is not None:
    workdir = pathlib.Path(workdir)
    log = metrics_lib.MetricsLog(workdir / "metrics.jsonl")
    checkpointer = checkpoint_lib.Checkpointer(workdir / "checkpoints")
    if checkpointer.latest_step() is not None:
      state = checkpointer.restore(state)
    # Records past the restored step (a kill between a record and its checkpoint) are redone.
    log.truncate(_current_step(state))
  records = log.read() if log else []
  earlier_seconds = wall_seconds(records)
  compiled: dict[int, Callable] = {}
  current = _current_step(state)
  if num_steps % step_size or eval_every % step_size or current % step_size:
    raise UserError(f"num_steps {num_steps}, eval_every {eval_every} and the restored step "
                    f"{current} must be multiples of step_size {step_size}")
  with tqdm(total=num_steps, initial=current, desc=description, disable=not progress,
            dynamic_ncols=True) as bar:
    while current < num_steps:
      interval_end = min(current + eval_every - current % eval_every, num_steps)
      chunks = []
      while current < interval_end:
        length = min(steps_per_call, (interval_end - current) // step_size)
        if length not in compiled:
          compiled[length] = jax.jit(train_lib.repeat(step, length))
        state, metrics = compiled[length](state, data)
        chunks.append(metrics)
        current += length * step_size
        bar.update(length * step_size)
      train_metrics = jax.tree_util.tree_map(lambda *m: np.concatenate(m), *jax.device_get(chunks))
      record = {f"train_{k}": v.mean(axis=0) for k, v in train_metrics.items()}
      if evaluate is not None:
        record.update(evaluate(state))
      seconds = earlier_seconds + time.perf_counter() - started
      record = {"step": current, "seconds": round(seconds, 3), **metrics_lib.jsonable(record)}
      records.append(record)
      if log is not None:
        log.write(**record)
        checkpointer.save(current, state)
      bar.set_postfix({k: _short(v) for k, v in record.items() if k not in ("step", "seconds")},
                      refresh=False)
  if checkpointer is not None:
    checkpointer.close()
  return state, records


def wall_seconds(records: list[dict[str, Any]]) -> float:
  """The training wall time :func:`fit`'s records count up to their last (0 when none)."""
  return float(records[-1].get("seconds", 0.0)) if records else 0.0


def _short(value: Any) -> str:
  value = np.asarray(value)
  return f"{value.mean():.4g}" if value.size else ""
