"""What in a compiled XLA program is slow on one backend but invisible on another.

**Host waits (GPU).** XLA:GPU runs a conditional (``lax.cond``, ``lax.switch``) and a while loop
whose trip count it cannot infer by copying the predicate to the host and blocking until the
device has caught up, once per conditional and per loop iteration (``ConditionalThunk`` /
``WhileThunk``). The device then idles while the host launches the next kernels: in a small
network's training step that wait can cost as much as the step. Loops with a static trip count
(``lax.scan``, ``fori_loop`` with static bounds) run without it. :func:`host_waits` lists such
operations from the optimized HLO of any backend's compiled program, so that tests can keep
them out of every step on CPU.

**Naive convolutions (CPU).** XLA:CPU runs a convolution through Eigen only in NHWC / HWIO /
NHWC form, and rewrites the others into it only outside loop bodies; inside a loop they run on
a naive emitter, far slower (``models.conv``). :func:`noncanonical_convolutions` lists
them from an XLA:CPU program.

Usage::

  compiled = jax.jit(step).lower(state, data).compile()
  assert not host_waits(compiled) and not noncanonical_convolutions(compiled)
"""

from __future__ import annotations

import re

import jax

_OPERATION = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.-]+)\s*=.*?\s(?P<op>while|conditional)\(")
_CONVOLUTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.-]+)\s*=.*?\sconvolution\(.*?dim_labels=(?P<labels>[\w>-]+)")


def host_waits(compiled: jax.stages.Compiled) -> list[str]:
  """Names of the conditionals and of the while loops without a known trip count in
  ``compiled``'s optimized HLO, e.g. ``["while.27"]``; empty when the host never waits."""
  waits = []
  for line in compiled.as_text().splitlines():
    match = _OPERATION.match(line)
    if match and (match["op"] == "conditional" or "known_trip_count" not in line):
      waits.append(match["name"])
  return waits


def _is_canonical(labels: str) -> bool:
  """Whether HLO ``dim_labels`` such as ``b01f_01io->b01f`` are NHWC / HWIO / NHWC."""
  lhs, _, rest = labels.partition("_")
  rhs, _, out = rest.partition("->")
  spatial = "".join(map(str, range(len(lhs) - 2)))
  return lhs == out == f"b{spatial}f" and rhs == f"{spatial}io"


def noncanonical_convolutions(compiled: jax.stages.Compiled) -> list[str]:
  """Names of the convolutions in ``compiled``'s optimized HLO that are not in Eigen's
  NHWC / HWIO / NHWC form (e.g. ``dim_labels=f01b_i01o->01bf``), e.g. ``["convolution.3"]``;
  in a loop body XLA:CPU runs them on its naive emitter."""
  return [match["name"] for match in map(_CONVOLUTION.match, compiled.as_text().splitlines())
          if match and not _is_canonical(match["labels"])]
