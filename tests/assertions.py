"""Assertions shared by test modules (pytest puts this folder on sys.path)."""

import pytest

from jaxtickets.errors import UserError


def assert_one_line_user_error(call, *fragments: str) -> None:
  """``call()`` raises a UserError whose message is one line containing every fragment."""
  with pytest.raises(UserError) as caught:
    call()
  message = str(caught.value)
  assert "\n" not in message
  for fragment in fragments:
    assert fragment in message
