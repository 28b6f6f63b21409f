"""Assertions shared by test modules (pytest puts this folder on sys.path)."""

import jax
import pytest

from jaxtickets import compiled
from jaxtickets import train as train_lib
from jaxtickets.errors import UserError


def assert_one_line_user_error(call, *fragments: str) -> None:
  """``call()`` raises a UserError whose message is one line containing every fragment."""
  with pytest.raises(UserError) as caught:
    call()
  message = str(caught.value)
  assert "\n" not in message
  for fragment in fragments:
    assert fragment in message


def host_waits_of(fn, *args) -> list[str]:
  """``compiled.host_waits`` of ``jax.jit(fn)`` compiled for ``args``."""
  return compiled.host_waits(jax.jit(fn).lower(*args).compile())


def assert_no_host_waits(step, state, data) -> None:
  """Two ``step``s in a loop, as ``loop.fit`` compiles them, hold no conditional and no loop of
  data-dependent length: on a GPU each would stop the host once per step (``compiled``)."""
  assert host_waits_of(train_lib.repeat(step, 2), state, data) == []
