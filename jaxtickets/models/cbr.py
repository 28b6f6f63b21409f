"""Transfusion's CBR family (Raghu et al., 2019): stacks of conv-BN-ReLU units.

All convs stride 1 with SAME padding; maxpool 3x3 stride 2 (SAME) after the first ``pooled``
units; global average pool; Dense. Widths double from unit to unit, starting at ``width``.
There is no official code; the configurations are as read from secondary sources:

- CBR-LargeT: 7x7, 32-64-128-256-512, maxpool after the first four.
- CBR-LargeW: 7x7, 64-128-256-512, maxpool after each.
- CBR-Small: 7x7, 32-64-128-256, maxpool after each.
- CBR-Tiny: 5x5, 64-128-256-512, maxpool after each.
"""

import functools
from collections.abc import Callable

import flax.linen as nn

from jaxtickets.models.layers import Array, ConvStack, global_average_pool


class CBR(ConvStack):
  """A CBR network (see module docstring); 7x7 kernels unless ``kernel_size`` says otherwise.

  Attributes:
    depth: number of conv-BN-ReLU units.
    pooled: the first ``pooled`` units are followed by a maxpool.
  """

  kernel_size: int = 7
  depth: int = 4
  pooled: int = 4

  def _plan(self) -> tuple[tuple[int, bool], ...]:
    return tuple((self.width * 2**index, index < self.pooled) for index in range(self.depth))

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
