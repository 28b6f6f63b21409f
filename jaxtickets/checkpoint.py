"""The one place that talks to orbax.

A run directory holds ``config.json`` (what produced it) and ``checkpoints/<step>/``. A run is
only resumed by the same config: anything else is a :class:`UserError`, and nothing in the
directory is touched.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import sys
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxtickets import files, paths
from jaxtickets.errors import UserError, first_line

PyTree = Any


def _canonical(config: Any) -> str:
  return json.dumps(config, sort_keys=True, default=str)


def claim_workdir(workdir: str | pathlib.Path, config: dict[str, Any]) -> pathlib.Path:
  """Creates ``workdir`` for ``config`` or checks that it already belongs to ``config``.

  Raises:
    UserError: the directory holds a run of a different config.
  """
  workdir = pathlib.Path(workdir)
  config_path = workdir / "config.json"
  partial = files.partial_path(config_path)
  if workdir.exists() and not workdir.is_dir():
    raise UserError(f"workdir {workdir} is a file, not a directory")
  if config_path.exists():
    try:
      claimed = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
      raise UserError(f"{config_path} is not readable JSON; use a new --workdir") from None
    if _canonical(claimed) != _canonical(config):
      raise UserError(f"workdir {workdir} holds a run of a different config; "
                      "use a new --workdir or delete it")
    return workdir
  if workdir.exists() and any(path != partial for path in workdir.iterdir()):
    raise UserError(f"workdir {workdir} is not empty and holds no config.json; "
                    "use a new --workdir")
  try:
    workdir.mkdir(parents=True, exist_ok=True)
  except OSError as error:
    raise UserError(f"cannot create workdir {workdir}: {error.strerror}") from None
  # Written whole or not at all: a kill here must not leave a half-written claim behind.
  files.write_text(config_path, json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
  return workdir


def _leaf_name(path: tuple[Any, ...]) -> str:
  """orbax's name for a leaf: its keys, attribute names and indices joined by dots."""
  return paths.joined(path, ".")


def _leaf_specs(tree: PyTree) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  return {_leaf_name(path): (tuple(leaf.shape), np.dtype(leaf.dtype))
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _is_closed_loop_error(unraisable: Any) -> bool:
  return (isinstance(unraisable.exc_value, RuntimeError)
          and str(unraisable.exc_value) == "Event loop is closed")


def _drop_aborted_read_callbacks() -> None:
  """After a failed read orbax closes its event loop while tensorstore's reads of the other
  arrays are still in flight; each one's completion callback then fails on the closed loop and
  Python prints it as an unraisable exception, a traceback per array after our one-line error.
  From the first read on, this process drops exactly those (an error no caller could catch;
  every other unraisable exception reaches the previous hook)."""
  previous = sys.unraisablehook
  if getattr(previous, "drops_closed_loop_errors", False):
    return

  def hook(unraisable: Any) -> None:
    if not _is_closed_loop_error(unraisable):
      previous(unraisable)

  hook.drops_closed_loop_errors = True
  sys.unraisablehook = hook


class Checkpointer:
  """Saves and restores pytrees (train states, populations, tickets) by step.

  Saving blocks until the files are committed, so a process killed at any moment leaves either
  the previous or the new checkpoint (orbax writes to a temporary directory and renames it).
  """

  def __init__(self, directory: str | pathlib.Path, *, max_to_keep: int = 2):
    self.directory = pathlib.Path(directory).absolute()
    self._manager = ocp.CheckpointManager(
        self.directory,
        # Named up front so metadata can be read before the first save or restore.
        item_handlers=ocp.StandardCheckpointHandler(),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=False))

  def latest_step(self) -> int | None:
    """The newest saved step, or None before the first save."""
    return self._manager.latest_step()

  def save(self, step: int, tree: PyTree) -> None:
    """Saves ``tree`` as ``step`` and waits until it is on disk (a kill after this keeps it).

    Raises:
      UserError: a leaf is a typed PRNG key (``jax.random.key``): orbax stores its raw data,
        which would not restore into the same template; keep raw keys (``PRNGKey``) in states.
    """
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
      if hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        raise UserError(f"checkpoint leaf {_leaf_name(path)!r} is a typed PRNG key; store raw "
                        "keys (jax.random.PRNGKey or jax.random.key_data) instead")
    self._manager.save(int(step), args=ocp.args.StandardSave(tree))
    self._manager.wait_until_finished()

  def restore(self, template: PyTree, step: int | None = None) -> PyTree:
    """Restores the checkpoint at ``step`` (default: latest) into the structure of ``template``.

    Raises:
      UserError: no checkpoint, or its leaves differ in path, shape or dtype from ``template``.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise UserError(f"no checkpoint in {self.directory}")
    with self._readable(step):
      saved = _leaf_specs(self._manager.item_metadata(step).tree)
    expected = _leaf_specs(template)
    if saved != expected:
      leaf = next(name for name in sorted(saved.keys() | expected.keys())
                  if saved.get(name) != expected.get(name))
      raise UserError(f"checkpoint {self.directory}/{step} does not match this run: leaf {leaf!r} "
                      f"is {saved.get(leaf)} there, {expected.get(leaf)} here")
    with self._readable(step):
      return self._manager.restore(step, args=ocp.args.StandardRestore(template))

  @contextlib.contextmanager
  def _readable(self, step: int) -> Iterator[None]:
    """Turns orbax's failure to read a damaged checkpoint (any exception: its readers raise
    many kinds) into a one-line UserError."""
    # Before the read: the callbacks can fail before orbax's exception reaches us.
    _drop_aborted_read_callbacks()
    try:
      yield
    except Exception as error:  # noqa: BLE001
      raise UserError(f"checkpoint {self.directory}/{step} cannot be read "
                      f"({type(error).__name__}: {first_line(error)[:200]}); use a new "
                      "--workdir") from None

  def close(self) -> None:
    """Releases orbax's background resources."""
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
