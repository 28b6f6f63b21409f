"""WideResNet-34-10 as in the TRADES and RST code (Zagoruyko & Komodakis, 2016).

``stem`` 3x3 conv (16 channels, no norm or activation: the blocks are pre-activation), three
stages of ``(depth - 4) / 6`` wide basic blocks with ``width * widen_factor * (1, 2, 4)``
channels (16 -> 160, 320, 640 for WRN-34-10) and strides 1, 2, 2, a final norm + ReLU
(``final_norm``), global average pool and the ``head``: 46,160,474 params for 10 classes.

A block whose channel count or stride changes normalizes and activates its input once and feeds
that activated tensor both to ``conv1`` and to its bias-free 1x1 ``shortcut`` conv (no norm on the
shortcut), as the reference does. The TRADES model also builds an unused ``sub_block1``; it never
runs, so it is left out. RST's classifier is a bias-free 1x1 conv (``head_bias=False``). TRADES
(not RST) re-initializes convs with N(0, 2/fan_out) and zeroes the classifier bias; here the
zoo's ``kernel_init`` applies.
"""

import flax.linen as nn

from jaxtickets.errors import UserError
from jaxtickets.models.layers import Array, Classifier, Layers, global_average_pool, norm_names


class WideBasicBlock(nn.Module):
  """Pre-activation block: conv2(relu(norm2(conv1(relu(norm1(x)))))) + shortcut.

  Attributes:
    layers: layer factory of the owning model.
    features: output channels.
    strides: stride of ``conv1`` and of the projection.
  """

  layers: Layers
  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    """x: f[B, H, W, C] -> f[B, H / strides, W / strides, features]."""
    activated = nn.relu(self.layers.norm_layer(x, train=train, name="norm1"))
    y = self.layers.conv(activated, self.features, 3, strides=self.strides, name="conv1")
    y = nn.relu(self.layers.norm_layer(y, train=train, name="norm2"))
    y = self.layers.conv(y, self.features, 3, name="conv2")
    if self.strides == 1 and x.shape[-1] == self.features:
      return y + x
    return y + self.layers.conv(activated, self.features, 1, strides=self.strides,
                                name="shortcut")


class WideResNet(Classifier):
  """WideResNet-``depth``-``widen_factor`` (see module docstring).

  Attributes:
    width: stem channels and base of the stage widths.
    widen_factor: stage width multiplier k.
    depth: total depth; ``(depth - 4) / 6`` blocks per stage.
  """

  width: int = 16
  widen_factor: int = 10
  depth: int = 34

  def _plan(self) -> tuple[tuple[str, int, int], ...]:
    """(name, features, strides) of every block in forward order."""
    if self.depth < 10 or (self.depth - 4) % 6:
      raise UserError(f"WideResNet depth must be 6n + 4 with n >= 1, got {self.depth}")
    blocks_per_stage = (self.depth - 4) // 6
    return tuple((f"layer{stage + 1}_{index}", self.width * self.widen_factor * 2**stage,
                  2 if stage > 0 and index == 0 else 1)
                 for stage in range(3) for index in range(blocks_per_stage))

  @property
  def block_names(self) -> tuple[str, ...]:
    """Top-level modules in forward order: stem, layer1_0, ..., final_norm, head."""
    blocks = tuple(name for name, _, _ in self._plan())
    return ("stem", *blocks, *norm_names(self.norm, "final_norm"), "head")

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    """x: f32[B, H, W, C] normalized images -> f32[B, num_classes] logits."""
    layers = self._layers()
    x = self._emit("stem", layers.conv(x, self.width, 3, name="stem"))
    for name, features, strides in self._plan():
      x = self._emit(name, WideBasicBlock(layers, features, strides, name=name)(x, train))
    if layers.has_norm:
      x = self._emit("final_norm", nn.relu(layers.norm_layer(x, train=train, name="final_norm")))
    else:
      x = nn.relu(x)
    return self._classify(global_average_pool(x), layers)


class WideResNet34x10(WideResNet):
  """WRN-34-10 (RST's "WideResNet32", TRADES' WideResNet)."""
