"""The one exception type for bad user input.

Command-line runners catch :class:`UserError`, print its message on one line and exit with
status 2; library callers get an ordinary ``ValueError`` subclass they can catch.
"""


class UserError(ValueError):
  """Bad input from a user: unknown names, wrong shapes, unprepared data, mismatched checkpoints."""
