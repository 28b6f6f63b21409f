"""The one exception type for bad user input, and how command lines report it.

Command-line runners catch :class:`UserError`, print its message on one line and exit with
status 2; library callers get an ordinary ``ValueError`` subclass they can catch.
"""

import contextlib
import sys
from collections.abc import Iterator


class UserError(ValueError):
  """Bad input from a user: unknown names, wrong shapes, unprepared data, mismatched checkpoints."""


@contextlib.contextmanager
def exit_on_user_error() -> Iterator[None]:
  """Inside a command line's ``main``: a UserError prints ``error: ...`` on stderr, exits 2."""
  try:
    yield
  except UserError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
