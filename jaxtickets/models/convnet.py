"""ConvNet-D: the dataset-distillation ConvNet (DC, DSA, DM, IDC, Acc-DD).

``depth`` x [conv3x3 ``width`` (bias, SAME), norm, ReLU, avgpool 2x2 stride 2], flatten, Dense.
The reference normalizes with ``GroupNorm(width, width, affine=True)`` ("instancenorm" there), so
``norm`` defaults to "instance". For 32x32x3 inputs ConvNet-3 ends in 4x4x128 = 2048 features.
The reference pads MNIST's first conv by 3; here every conv pads by 1.
"""

import functools
from collections.abc import Callable

import flax.linen as nn

from jaxtickets.models.layers import Array, ConvStack, flatten


class ConvNet(ConvStack):
  """ConvNet of ``depth`` conv-norm-ReLU-avgpool units (see module docstring).

  Attributes:
    depth: number of conv units.
  """

  norm: str = "instance"
  use_bias: bool = True
  width: int = 128
  depth: int = 3

  def _plan(self) -> tuple[tuple[int, bool], ...]:
    return ((self.width, True),) * self.depth

  def _pooling(self) -> Callable[[Array], Array]:
    return functools.partial(nn.avg_pool, window_shape=(2, 2), strides=(2, 2))

  def _readout(self, x: Array) -> Array:
    return flatten(x)
