"""CIFAR MobileNetV2 as in the kuangliu/pytorch-cifar code (Sandler et al., 2018).

RST's released MobileNetV2 follows it but builds the depthwise conv without its stride (never
downsampling, which leaves its 1x1-conv classifier an 8x8 map); the strides here are kuangliu's.

``stem`` 3x3 stride-1 conv (32 channels) + norm + ReLU; 17 inverted-residual blocks from the
(expansion, channels, blocks, stride) table below, with the second stage's stride 2 -> 1 for
32x32 inputs; ``final_conv`` 1x1 to 1280 + ``final_norm`` + ReLU; global average pool; ``head``.
As in the reference: ReLU (not ReLU6), the expansion conv also runs when the expansion is 1,
stride-1 blocks always add a shortcut (a 1x1 conv + norm ``shortcut`` when channels change) and
stride-2 blocks have none. 2,296,922 params for 10 classes at ``width_multiplier=1``.

``width_multiplier`` scales the stem and block channels (rounded to multiples of 8 as in
torchvision); the last conv keeps 1280 channels unless the multiplier is above 1.
"""

import flax.linen as nn

from jaxtickets.models.layers import (Array, Classifier, Layers, global_average_pool, norm_names,
                                     shortcut_branch)

# (expansion, output channels, blocks, stride of the first block)
_STAGES = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
           (6, 160, 3, 2), (6, 320, 1, 1))
_LAST_CHANNELS = 1280


def make_divisible(channels: float, divisor: int = 8) -> int:
  """Rounds ``channels`` to the nearest multiple of ``divisor``, never more than 10% below it."""
  rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
  return rounded + divisor if rounded < 0.9 * channels else rounded


class InvertedResidual(nn.Module):
  """Expand (1x1) -> depthwise (3x3) -> project (1x1), each with a norm; ReLU after the first two.

  Attributes:
    layers: layer factory of the owning model.
    features: output channels.
    expansion: hidden channels = ``expansion * input channels``.
    strides: stride of the depthwise conv; stride-2 blocks have no shortcut.
  """

  layers: Layers
  features: int
  expansion: int
  strides: int = 1

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    """x: f[B, H, W, C] -> f[B, H / strides, W / strides, features]."""
    hidden = self.expansion * x.shape[-1]
    y = self.layers.conv(x, hidden, 1, name="conv1")
    y = nn.relu(self.layers.norm_layer(y, train=train, name="norm1"))
    y = self.layers.conv(y, hidden, 3, strides=self.strides, groups=hidden, name="conv2")
    y = nn.relu(self.layers.norm_layer(y, train=train, name="norm2"))
    y = self.layers.conv(y, self.features, 1, name="conv3")
    y = self.layers.norm_layer(y, train=train, name="norm3")
    if self.strides != 1:
      return y
    return y + shortcut_branch(x, self.layers, features=self.features, strides=1,
                               kind="projection", train=train)


class MobileNetV2(Classifier):
  """CIFAR MobileNetV2 (see module docstring).

  Attributes:
    width: stem channels before ``width_multiplier``.
    width_multiplier: scales every channel count (alpha in the paper), > 0.
  """

  width: int = 32
  width_multiplier: float = 1.0

  def _plan(self) -> tuple[tuple[str, int, int, int], ...]:
    """(name, features, expansion, strides) of every block in forward order."""
    return tuple((f"layer{stage + 1}_{index}", make_divisible(channels * self.width_multiplier),
                  expansion, stride if index == 0 else 1)
                 for stage, (expansion, channels, blocks, stride) in enumerate(_STAGES)
                 for index in range(blocks))

  @property
  def block_names(self) -> tuple[str, ...]:
    """Top-level modules in forward order: stem, stem_norm, layer1_0, ..., final_conv,
    final_norm, head."""
    blocks = tuple(name for name, _, _, _ in self._plan())
    return ("stem", *norm_names(self.norm, "stem_norm"), *blocks, "final_conv",
            *norm_names(self.norm, "final_norm"), "head")

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    """x: f32[B, H, W, C] normalized images -> f32[B, num_classes] logits."""
    layers = self._layers()
    x = self._conv_unit(x, layers, train=train, conv_name="stem", norm_name="stem_norm",
                        features=make_divisible(self.width * self.width_multiplier),
                        kernel_size=3)
    for name, features, expansion, strides in self._plan():
      x = self._emit(name, InvertedResidual(layers, features, expansion, strides,
                                            name=name)(x, train))
    x = self._conv_unit(x, layers, train=train, conv_name="final_conv", norm_name="final_norm",
                        features=make_divisible(_LAST_CHANNELS * max(1.0, self.width_multiplier)),
                        kernel_size=1)
    return self._classify(global_average_pool(x), layers)
