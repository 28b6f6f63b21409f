"""CIFAR VGG-16 with BatchNorm, as in the RST and kuangliu/pytorch-cifar code.

Convs 3x3 (no bias, as RST's builder makes them) with cfg 64,64,M,128,128,M,256x3,M,512x3,M,
512x3,M, each followed by norm and ReLU, maxpool 2x2 stride 2 at every M, then the classifier on
the flattened 1x1x512 map (for 32x32 inputs). RST's classifier is a bias-free 1x1 conv on that
map, which is ``head_bias=False`` here; the default ``head_bias=True`` is kuangliu's Linear.
"""

import functools
from collections.abc import Callable

import flax.linen as nn

from jaxtickets.models.layers import Array, ConvStack, flatten


class VGG16(ConvStack):
  """VGG-16 with BN for 32x32 inputs.

  Attributes:
    width: channels of the first stage; later stages have 2x, 4x, 8x, 8x.
  """

  width: int = 64

  def _plan(self) -> tuple[tuple[int, bool], ...]:
    stages = ((2, 1), (2, 2), (3, 4), (3, 8), (3, 8))  # (convs, width multiple)
    return tuple((self.width * multiple, index == convs - 1)
                 for convs, multiple in stages for index in range(convs))

  def _pooling(self) -> Callable[[Array], Array]:
    return functools.partial(nn.max_pool, window_shape=(2, 2), strides=(2, 2))

  def _readout(self, x: Array) -> Array:
    return flatten(x)
