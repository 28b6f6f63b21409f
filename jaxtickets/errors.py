"""The one exception type for bad user input, and how command lines report it.

Command-line runners catch :class:`UserError`, print its message on one line and exit with
status 2; library callers get an ordinary ``ValueError`` subclass they can catch.
"""

import argparse
import contextlib
import math
import numbers
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any


class UserError(ValueError):
  """Bad input from a user: unknown names, wrong shapes, unprepared data, mismatched checkpoints."""


def first_line(error: BaseException) -> str:
  """The first line of ``error``'s message (its type's name when empty), for one-line reports
  of errors raised by other libraries."""
  return (str(error).strip().splitlines() or [type(error).__name__])[0]


def check_int(name: str, value: Any, minimum: int = 1) -> None:
  """Raises UserError naming ``name`` unless ``value`` is an int (not a bool) >= ``minimum``."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
    raise UserError(f"{name}={value!r}; expected an int >= {minimum}")


def check_number(name: str, value: Any, minimum: float, maximum: float | None = None, *,
                 strict: bool = False) -> None:
  """Raises UserError naming ``name`` unless ``value`` is a finite real number >= ``minimum``
  (> with ``strict``) and, if given, <= ``maximum``; NaN, infinities and bools fail."""
  if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
      or not (value > minimum if strict else value >= minimum)
      or (maximum is not None and not value <= maximum)):
    expected = f"{'>' if strict else '>='} {minimum}"
    if maximum is not None:
      expected = f"in {'(' if strict else '['}{minimum}, {maximum}]"
    raise UserError(f"{name}={value!r}; expected a number {expected}")


def check_sequence(name: str, value: Any, *, nonempty: bool = True) -> None:
  """Raises UserError naming ``name`` unless ``value`` is a list or tuple (non-empty, unless
  ``nonempty`` is False); its entries are the caller's to check."""
  if not isinstance(value, (list, tuple)) or (nonempty and not value):
    raise UserError(f"{name}={value!r}; expected a {'non-empty ' if nonempty else ''}sequence")


def check_distinct(name: str, values: Iterable[Any], consequence: str) -> None:
  """Raises UserError naming ``name`` and its first repeated entry unless ``values`` are
  distinct (and hashable: names and numbers); ``consequence`` says what a repeat would do."""
  values = tuple(values)
  seen = set()
  for value in values:
    try:
      hash(value)
    except TypeError:
      raise UserError(f"{name}={values!r}; expected names or numbers, got {value!r}") from None
    if value in seen:
      raise UserError(f"{name}={values!r} repeats {value!r}; {consequence}")
    seen.add(value)


def check_names(name: str, values: Any, known: Sequence[str], *, repeat: str,
                nonempty: bool = True) -> None:
  """Raises UserError naming ``name`` unless ``values`` is a sequence (non-empty, unless
  ``nonempty`` is False) of distinct names from ``known``; ``repeat`` says what a repeat would
  do (see :func:`check_distinct`)."""
  check_sequence(name, values, nonempty=nonempty)
  check_distinct(name, values, repeat)
  unknown = [value for value in values if value not in known]
  if unknown:
    raise UserError(f"{name}={tuple(values)!r}; unknown {unknown[0]!r}, known: {', '.join(known)}")


@contextlib.contextmanager
def exit_on_user_error() -> Iterator[None]:
  """Inside a command line's ``main``: a UserError prints ``error: ...`` on stderr, exits 2."""
  try:
    yield
  except UserError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


class ArgumentParser(argparse.ArgumentParser):
  """``argparse.ArgumentParser`` whose usage errors (a missing or unknown flag) are one line on
  stderr and exit 2, like a :class:`UserError`, instead of the usage text plus the error."""

  def error(self, message: str):
    self.exit(2, f"error: {message} (see --help)\n")
