"""CIFAR ResNets with post-activation residual blocks (He et al., 2016).

Layout (RST's ``cResNet`` and kuangliu/pytorch-cifar): 3x3 stride-1 ``stem`` conv + norm + ReLU
(no max-pool), stages of residual blocks whose first block strides by 2 (except stage 1), global
average pool, Dense ``head``. Stage ``i`` has ``width * 2**i`` planes.

- ResNet-18: BasicBlocks [2, 2, 2, 2], width 64 (11,173,962 params for 10 classes).
- ResNet-50: Bottlenecks [3, 4, 6, 3] with expansion 4, width 64.
- ResNet-20 / ResNet-56: BasicBlocks [3, 3, 3] / [9, 9, 9], width 16, as in He et al.'s CIFAR
  experiments. Their paper uses identity shortcuts with zero-padding (option A); this zoo
  defaults to 1x1 conv + norm projections (option B, the RST/kuangliu code), and
  ``shortcut="zero_pad"`` gives option A.

``unit_widths`` sets the stem's channels and every block's planes explicitly (Transfusion's "slim
top": pretrained lower blocks at their widths, narrower random blocks above).
"""

from collections.abc import Sequence

import flax.linen as nn

from jaxtickets.errors import UserError
from jaxtickets.models.layers import (SHORTCUT_KINDS, Array, Classifier, Layers,
                                     global_average_pool, norm_names, shortcut_branch)

# block kind -> convs (output features, kernel size, stride) for a block of `planes` planes.
_BLOCK_CONVS = {
    "basic": lambda planes, strides: ((planes, 3, strides), (planes, 3, 1)),
    "bottleneck": lambda planes, strides: ((planes, 1, 1), (planes, 3, strides),
                                           (4 * planes, 1, 1)),
}


class ResidualBlock(nn.Module):
  """Post-activation residual block: relu(norm(conv(...)) + shortcut(x)).

  Children: ``conv1``/``norm1``, ``conv2``/``norm2`` (and ``conv3``/``norm3`` for bottlenecks),
  optionally ``shortcut``/``shortcut_norm``.

  Attributes:
    layers: layer factory of the owning model.
    kind: "basic" (two 3x3 convs) or "bottleneck" (1x1, 3x3, 1x1 with expansion 4).
    planes: planes of the block; the output has ``planes`` (basic) or ``4 * planes`` channels.
    strides: stride of the block's 3x3 conv and of its projection.
    shortcut_kind: see ``shortcut_branch``.
  """

  layers: Layers
  kind: str
  planes: int
  strides: int = 1
  shortcut_kind: str = "projection"

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    """x: f[B, H, W, C] -> f[B, H / strides, W / strides, C_out]."""
    convs = _BLOCK_CONVS[self.kind](self.planes, self.strides)
    y = x
    for index, (features, kernel_size, strides) in enumerate(convs, start=1):
      if index > 1:
        y = nn.relu(y)
      y = self.layers.conv(y, features, kernel_size, strides=strides, name=f"conv{index}")
      y = self.layers.norm_layer(y, train=train, name=f"norm{index}")
    shortcut = shortcut_branch(x, self.layers, features=y.shape[-1], strides=self.strides,
                               kind=self.shortcut_kind, train=train)
    return nn.relu(y + shortcut)


class ResNet(Classifier):
  """CIFAR ResNet (see module docstring).

  Attributes:
    stage_sizes: residual blocks per stage.
    block: "basic" or "bottleneck".
    shortcut: "projection" (1x1 conv + norm, option B) or "zero_pad" (option A).
    unit_widths: the stem's channels then each residual block's planes (each >= 1), in forward
      order, or None for ``width * 2**stage``. A block whose input has other channels gets a
      projection.
  """

  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  block: str = "basic"
  shortcut: str = "projection"
  unit_widths: Sequence[int] | None = None

  def _plan(self) -> tuple[tuple[str, int, int], ...]:
    """(name, planes, strides) of every residual block in forward order."""
    plan = tuple((f"layer{stage + 1}_{index}", self.width * 2**stage,
                  2 if stage > 0 and index == 0 else 1)
                 for stage, size in enumerate(self.stage_sizes) for index in range(size))
    if self.unit_widths is None:
      return plan
    widths = tuple(self.unit_widths)
    if len(widths) != 1 + len(plan):  # zip below would silently drop or ignore blocks.
      raise UserError(f"unit_widths={widths!r}; expected {1 + len(plan)} ints (the stem, then "
                      "each residual block)")
    return tuple((name, planes, strides)
                 for (name, _, strides), planes in zip(plan, widths[1:]))

  def _stem_width(self) -> int:
    return self.width if self.unit_widths is None else self.unit_widths[0]

  @property
  def block_names(self) -> tuple[str, ...]:
    """Top-level modules in forward order: stem, stem_norm, layer1_0, ..., head."""
    blocks = tuple(name for name, _, _ in self._plan())
    return ("stem", *norm_names(self.norm, "stem_norm"), *blocks, "head")

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    """x: f32[B, H, W, C] normalized images -> f32[B, num_classes] logits."""
    if self.block not in _BLOCK_CONVS:
      raise UserError(f"unknown ResNet block {self.block!r}; known: {', '.join(_BLOCK_CONVS)}")
    if self.shortcut not in SHORTCUT_KINDS:
      raise UserError(f"unknown ResNet shortcut {self.shortcut!r}; "
                      f"known: {', '.join(SHORTCUT_KINDS)}")
    layers = self._layers()
    plan = self._plan()
    x = self._conv_unit(x, layers, train=train, conv_name="stem", norm_name="stem_norm",
                        features=self._stem_width(), kernel_size=3)
    for name, planes, strides in plan:
      x = ResidualBlock(layers, self.block, planes, strides, self.shortcut, name=name)(x, train)
      x = self._emit(name, x)
    return self._classify(global_average_pool(x), layers)


class ResNet18(ResNet):
  """CIFAR ResNet-18 (RST's cResNet18): BasicBlocks [2, 2, 2, 2], planes 64..512."""


class ResNet20(ResNet):
  """CIFAR ResNet-20: BasicBlocks [3, 3, 3], planes 16/32/64."""

  width: int = 16
  stage_sizes: Sequence[int] = (3, 3, 3)


class ResNet56(ResNet):
  """CIFAR ResNet-56: BasicBlocks [9, 9, 9], planes 16/32/64."""

  width: int = 16
  stage_sizes: Sequence[int] = (9, 9, 9)


class ResNet50(ResNet):
  """CIFAR ResNet-50 (3x3 stride-1 stem, no max-pool): Bottlenecks [3, 4, 6, 3]."""

  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  block: str = "bottleneck"
