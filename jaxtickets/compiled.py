"""Where a compiled XLA program makes the host wait for the device.

XLA:GPU runs a conditional (``lax.cond``, ``lax.switch``) and a while loop whose trip count it
cannot infer by copying the predicate to the host and blocking until the device has caught up,
once per conditional and per loop iteration (``ConditionalThunk`` / ``WhileThunk``). The device
then idles while the host launches the next kernels: in a small network's training step that
wait can cost as much as the step. Loops with a static trip count (``lax.scan``, ``fori_loop``
with static bounds) run without it. :func:`host_waits` lists such operations from the optimized
HLO of any backend's compiled program, so that tests can keep them out of every step on CPU.

Usage::

  compiled = jax.jit(step).lower(state, data).compile()
  assert not host_waits(compiled)
"""

from __future__ import annotations

import re

import jax

_OPERATION = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.-]+)\s*=.*?\s(?P<op>while|conditional)\(")


def host_waits(compiled: jax.stages.Compiled) -> list[str]:
  """Names of the conditionals and of the while loops without a known trip count in
  ``compiled``'s optimized HLO, e.g. ``["while.27"]``; empty when the host never waits."""
  waits = []
  for line in compiled.as_text().splitlines():
    match = _OPERATION.match(line)
    if match and (match["op"] == "conditional" or "known_trip_count" not in line):
      waits.append(match["name"])
  return waits
