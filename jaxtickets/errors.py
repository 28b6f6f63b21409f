"""The one exception type for bad user input, and how command lines report it.

Command-line runners catch :class:`UserError`, print its message on one line and exit with
status 2; library callers get an ordinary ``ValueError`` subclass they can catch.
"""

import argparse
import contextlib
import sys
from collections.abc import Iterator


class UserError(ValueError):
  """Bad input from a user: unknown names, wrong shapes, unprepared data, mismatched checkpoints."""


def first_line(error: BaseException) -> str:
  """The first line of ``error``'s message (its type's name when empty), for one-line reports
  of errors raised by other libraries."""
  return (str(error).strip().splitlines() or [type(error).__name__])[0]


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
