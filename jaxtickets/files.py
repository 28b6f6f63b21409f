"""Files that a run reads back on resume, written whole or not at all.

A ``kill -9`` (or a full disk) during a plain ``write_text`` leaves a truncated file that the
resumed run then cannot parse; writing a sibling and renaming it over the target is atomic on
POSIX file systems.
"""

import json
import pathlib
from typing import Any

PARTIAL_SUFFIX = ".partial"


def partial_path(path: pathlib.Path) -> pathlib.Path:
  """Where :func:`write_text` writes before the rename."""
  return path.with_name(path.name + PARTIAL_SUFFIX)


def write_text(path: str | pathlib.Path, text: str) -> None:
  """Replaces ``path``'s contents with ``text`` atomically."""
  path = pathlib.Path(path)
  partial = partial_path(path)
  partial.write_text(text)
  partial.replace(path)


def write_json(path: str | pathlib.Path, value: Any, indent: int = 2) -> None:
  """``value`` as indented JSON (one trailing newline), atomically."""
  write_text(path, json.dumps(value, indent=indent) + "\n")
