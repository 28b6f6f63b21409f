"""Transfusion's CBR family (Raghu et al., 2019): stacks of conv-BN-ReLU units.

All convs stride 1 with SAME padding; maxpool 3x3 stride 2 (SAME) after the first ``pooled``
units; global average pool; Dense. Widths double from unit to unit, starting at ``width``.
There is no official code; the configurations are as read from secondary sources:

- CBR-LargeT: 7x7, 32-64-128-256-512, maxpool after the first four.
- CBR-LargeW: 7x7, 64-128-256-512, maxpool after each.
- CBR-Small: 7x7, 32-64-128-256, maxpool after each.
- CBR-Tiny: 5x5, 64-128-256-512, maxpool after each.

``unit_widths`` sets every unit's channels explicitly (Transfusion's "slim top": pretrained lower
units at their widths, narrower random units above).
"""

import functools
from collections.abc import Callable, Sequence

import flax.linen as nn

from jaxtickets.errors import UserError
from jaxtickets.models.layers import Array, ConvStack, global_average_pool


class CBR(ConvStack):
  """A CBR network (see module docstring); 7x7 kernels unless ``kernel_size`` says otherwise.

  Attributes:
    depth: number of conv-BN-ReLU units, >= 1.
    pooled: the first ``pooled`` units are followed by a maxpool.
    unit_widths: output channels (>= 1) of each of the ``depth`` units (stem first), or None for
      ``width`` doubling from unit to unit.
  """

  kernel_size: int = 7
  depth: int = 4
  pooled: int = 4
  unit_widths: Sequence[int] | None = None

  def _plan(self) -> tuple[tuple[int, bool], ...]:
    if self.unit_widths is None:
      widths = tuple(self.width * 2**index for index in range(self.depth))
    else:
      widths = tuple(self.unit_widths)
      if len(widths) != self.depth:  # Else it would silently override depth.
        raise UserError(f"unit_widths={widths!r}; expected {self.depth} ints (one per unit of "
                        f"{type(self).__name__})")
    return tuple((features, index < self.pooled) for index, features in enumerate(widths))

  def _pooling(self) -> Callable[[Array], Array]:
    return functools.partial(nn.max_pool, window_shape=(3, 3), strides=(2, 2), padding="SAME")

  def _readout(self, x: Array) -> Array:
    return global_average_pool(x)


class CBRLargeT(CBR):
  """CBR-LargeT: 7x7 convs 32-64-128-256-512, maxpool after the first four."""

  width: int = 32
  depth: int = 5
  pooled: int = 4


class CBRLargeW(CBR):
  """CBR-LargeW: 7x7 convs 64-128-256-512, maxpool after each."""

  width: int = 64


class CBRSmall(CBR):
  """CBR-Small: 7x7 convs 32-64-128-256, maxpool after each."""

  width: int = 32


class CBRTiny(CBR):
  """CBR-Tiny: 5x5 convs 64-128-256-512, maxpool after each."""

  width: int = 64
  kernel_size: int = 5
