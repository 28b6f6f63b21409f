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


def program_of(fn, *args) -> jax.stages.Compiled:
  """``jax.jit(fn)`` compiled for ``args``, for ``jaxtickets.compiled``'s checks."""
  return jax.jit(fn).lower(*args).compile()


def host_waits_of(fn, *args) -> list[str]:
  """``compiled.host_waits`` of ``jax.jit(fn)`` compiled for ``args``."""
  return compiled.host_waits(program_of(fn, *args))


def assert_fast_in_a_loop(step, state, data) -> None:
  """Two ``step``s in a loop, as ``loop.fit`` compiles them, hold no conditional and no loop of
  data-dependent length (on a GPU each would stop the host once per step) and, on CPU, no
  convolution off Eigen's layout (~100x slower in a loop); see ``jaxtickets.compiled``."""
  program = program_of(train_lib.repeat(step, 2), state, data)
  assert compiled.host_waits(program) == []
  if jax.default_backend() == "cpu":
    assert compiled.noncanonical_convolutions(program) == []
