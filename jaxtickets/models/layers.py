"""Building blocks shared by the model zoo: conv/norm/head factories, a base class.

Every model is a :class:`Classifier`: it carries the common options (``norm``, ``dtype``,
``use_bias``, ``head_bias``, ``kernel_init``, ``head_init``, ``width``), builds its layers through
:class:`Layers` so that initialization, padding and precision are the same everywhere, and sows
the output of each top-level module into ``intermediates[BLOCK_OUTPUTS][module name]``.

Conventions kept here (tickets.py relies on them): the first conv is named ``stem``, the
classifier ``head``; norm modules have ``norm`` in their name; projection shortcuts are named
``shortcut`` (their norm ``shortcut_norm``).
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxtickets.errors import UserError
from jaxtickets.models.conv import CONV_IMPLS
from jaxtickets.models.init import INITIALIZER_NAMES, get_initializer, pytorch_bias_init

NORM_KINDS: tuple[str, ...] = ("batch", "batch_noaffine", "group", "instance", "none")
SHORTCUT_KINDS: tuple[str, ...] = ("projection", "zero_pad")
# Entry of the "intermediates" collection holding {top-level module name: its output}.
BLOCK_OUTPUTS = "block_outputs"
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
MAX_GROUPS = 32  # GroupNorm's group count for "group" (fewer when the channels need it)

Array = jax.Array


def resolve_dtype(dtype: Any) -> jnp.dtype:
  """The compute dtype named by ``dtype``: "float32"/"bfloat16" or the matching jnp types."""
  known = {name: jnp.dtype(value) for name, value in _DTYPES.items()}
  if isinstance(dtype, str):
    resolved = known.get(dtype)
  else:
    try:
      resolved = jnp.dtype(dtype)
    except TypeError:
      resolved = None
  if resolved not in known.values():
    raise UserError(f"unknown dtype {dtype!r}; known: {', '.join(known)}")
  return resolved


def group_count(features: int) -> int:
  """GroupNorm groups for ``features`` channels: the largest divisor of it that is <= 32.

  PyTorch code usually hard-codes 32 groups; channel counts such as 16 or MobileNetV2's 144 are
  not multiples of 32, so the largest group count that divides them is used instead.
  """
  return max(g for g in range(1, min(MAX_GROUPS, features) + 1) if features % g == 0)


@dataclasses.dataclass(frozen=True)
class Layers:
  """Builds convs, norms and the classifier with one model's options.

  Call its methods from inside a module's ``@nn.compact`` ``__call__``: the layers they create
  become children of that module under the given names.

  Attributes:
    norm: one of ``NORM_KINDS``.
    dtype: compute dtype; parameters are always float32.
    use_bias: whether convs have a bias (PyTorch-style nets drop it before a norm).
    kernel_init: initializer name for conv kernels (see ``init.get_initializer``).
    stem_init: initializer name for the conv named ``stem``, or None for ``kernel_init``.
    head_init: initializer name for the classifier kernel.
    head_bias: whether the classifier has a bias.
    conv_impl: how convs are computed, a key of ``conv.CONV_IMPLS`` (see ``Classifier``).
  """

  norm: str
  dtype: Any
  use_bias: bool
  kernel_init: str
  stem_init: str | None
  head_init: str
  head_bias: bool
  conv_impl: str

  @property
  def has_norm(self) -> bool:
    return self.norm != "none"

  def conv(self, x: Array, features: int, kernel_size: int, *, name: str, strides: int = 1,
           groups: int = 1, use_bias: bool | None = None) -> Array:
    """Conv with PyTorch padding (``kernel_size // 2`` on every side) and PyTorch init.

    Args:
      x: f[B, H, W, C_in].
      features: output channels C_out.
      kernel_size: odd square kernel size k.
      name: module name of the conv.
      strides: spatial stride s.
      groups: feature groups (``groups == C_in`` makes it depthwise).
      use_bias: overrides the model-wide ``use_bias``.

    Returns:
      f[B, H', W', C_out] with H' = floor((H + 2 * (k // 2) - k) / s) + 1.
    """
    pad = kernel_size // 2
    bias = self.use_bias if use_bias is None else use_bias
    return nn.Conv(
        features, (kernel_size, kernel_size), strides=(strides, strides),
        padding=((pad, pad), (pad, pad)), feature_group_count=groups, use_bias=bias,
        dtype=self.dtype, param_dtype=jnp.float32,
        kernel_init=get_initializer(self.stem_init if name == "stem" and self.stem_init
                                    else self.kernel_init),
        bias_init=pytorch_bias_init(kernel_size * kernel_size * x.shape[-1] // groups),
        conv_general_dilated=CONV_IMPLS[self.conv_impl], name=name)(x)

  def norm_layer(self, x: Array, *, train: bool, name: str) -> Array:
    """Normalizes x: f[B, H, W, C] with the model's norm kind; identity for "none".

    BatchNorm uses PyTorch's momentum 0.1 and eps 1e-5 and normalizes with batch statistics in
    training, running statistics otherwise. Flax updates the running variance with the biased
    batch variance where PyTorch uses the unbiased one (a factor n/(n-1), n = B*H*W).
    GroupNorm ("group", "instance") uses PyTorch's eps 1e-5.
    """
    if self.norm == "none":
      return x
    if self.norm in ("batch", "batch_noaffine"):
      affine = self.norm == "batch"
      return nn.BatchNorm(
          use_running_average=not train, momentum=0.9, epsilon=1e-5, use_scale=affine,
          use_bias=affine, dtype=self.dtype, param_dtype=jnp.float32, name=name)(x)
    features = x.shape[-1]
    groups = features if self.norm == "instance" else group_count(features)
    return nn.GroupNorm(num_groups=groups, epsilon=1e-5, dtype=self.dtype,
                        param_dtype=jnp.float32, name=name)(x)

  def head(self, features: Array, num_classes: int) -> Array:
    """Classifier named ``head``: features f[B, D] -> logits f32[B, num_classes]."""
    logits = nn.Dense(
        num_classes, use_bias=self.head_bias, dtype=self.dtype, param_dtype=jnp.float32,
        kernel_init=get_initializer(self.head_init),
        bias_init=pytorch_bias_init(features.shape[-1]), name="head")(features)
    return logits.astype(jnp.float32)


def shortcut_branch(x: Array, layers: Layers, *, features: int, strides: int, kind: str,
                    train: bool) -> Array:
  """The residual branch's partner: identity, or a projection when the shape changes.

  Args:
    x: f[B, H, W, C] block input.
    layers: layer factory; creates ``shortcut`` and ``shortcut_norm`` in the calling module.
    features: output channels of the block.
    strides: spatial stride of the block.
    kind: "projection" (1x1 conv + norm) or "zero_pad" (subsample, pad channels with zeros).
    train: whether norms use batch statistics.

  Returns:
    f[B, H', W', features].
  """
  if strides == 1 and x.shape[-1] == features:
    return x
  if kind == "zero_pad":
    x = x[:, ::strides, ::strides, :]
    missing = features - x.shape[-1]
    if missing < 0:
      raise UserError(f"a zero_pad shortcut cannot narrow {x.shape[-1]} channels to {features}; "
                      "use shortcut='projection'")
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (missing // 2, missing - missing // 2)))
  x = layers.conv(x, features, 1, strides=strides, name="shortcut")
  return layers.norm_layer(x, train=train, name="shortcut_norm")


def check_names(model: nn.Module) -> None:
  """Raises UserError unless ``model``'s ``norm``, ``dtype``, initializers and ``conv_impl`` are
  known names (an unknown norm would otherwise run as GroupNorm), before anything is traced."""
  resolve_dtype(model.dtype)
  for option, known in (("norm", NORM_KINDS), ("kernel_init", INITIALIZER_NAMES),
                        ("stem_init", INITIALIZER_NAMES), ("head_init", INITIALIZER_NAMES),
                        ("conv_impl", tuple(CONV_IMPLS))):
    value = getattr(model, option)
    if value not in known and not (option == "stem_init" and value is None):
      raise UserError(f"unknown {option} {value!r}; known: {', '.join(known)}")


def norm_names(norm: str, *names: str) -> tuple[str, ...]:
  """``names`` when the model has norm layers, else nothing (no module is created for "none")."""
  return names if norm != "none" else ()


def global_average_pool(x: Array) -> Array:
  """f[B, H, W, C] -> f[B, C]."""
  return jnp.mean(x, axis=(1, 2))


def flatten(x: Array) -> Array:
  """f[B, H, W, C] -> f[B, H * W * C]."""
  return x.reshape(x.shape[0], -1)


class Classifier(nn.Module):
  """Base of every model in the zoo: the common options and the top-level helpers.

  Subclasses implement ``__call__(x: f32[B, H, W, C], train=False) -> f32[B, num_classes]`` and
  ``block_names``.

  Attributes:
    num_classes: number of logits, >= 1.
    norm: one of ``NORM_KINDS``; "instance" is GroupNorm with one group per channel.
    dtype: compute dtype (jnp.float32/jnp.bfloat16 or "float32"/"bfloat16"); params stay fp32
      and logits are returned in fp32.
    use_bias: conv biases (a bool).
    head_bias: classifier bias (a bool; RST's classifier is a bias-free 1x1 conv).
    kernel_init: conv kernel initializer name.
    stem_init: the ``stem`` conv's initializer name; None: ``kernel_init`` (torchvision's CIFAR
      ResNets, for one, replace the stem after initializing the rest their way).
    head_init: classifier kernel initializer name.
    width: base width, >= 1 (the first stage's channels for most architectures; WRN's and
      MobileNetV2's stem channels, see theirs); the architecture's default.
    conv_impl: "xla" (XLA's convolution: cuDNN on GPUs) or "im2col" (patches times kernel, one
      matrix product). Same function and params; "im2col" is for populations run by ``vmap``,
      where XLA's convolutions become slow grouped ones (``models.conv``), at the cost of
      ``k * k`` times the activation memory.
  """

  num_classes: int
  norm: str = "batch"
  dtype: Any = jnp.float32
  use_bias: bool = False
  head_bias: bool = True
  kernel_init: str = "pytorch"
  stem_init: str | None = None
  head_init: str = "pytorch"
  width: int = 64
  conv_impl: str = "xla"

  def _layers(self) -> Layers:
    return Layers(norm=self.norm, dtype=resolve_dtype(self.dtype), use_bias=self.use_bias,
                  kernel_init=self.kernel_init, stem_init=self.stem_init,
                  head_init=self.head_init,
                  head_bias=self.head_bias, conv_impl=self.conv_impl)

  def _emit(self, name: str, x: Array) -> Array:
    """Sows the output of top-level module ``name`` into ``intermediates[BLOCK_OUTPUTS][name]``.

    A no-op unless "intermediates" is mutable. The outputs share one dict-valued entry because
    flax refuses a variable named like a child module (``sow("intermediates", "stem", x)``
    collides with the ``stem`` conv).
    """
    self.sow("intermediates", BLOCK_OUTPUTS, {name: x}, init_fn=dict,
             reduce_fn=lambda outputs, new: {**outputs, **new})
    return x

  def _conv_unit(self, x: Array, layers: Layers, *, train: bool, conv_name: str, norm_name: str,
                 features: int, kernel_size: int,
                 post: Callable[[Array], Array] | None = None) -> Array:
    """Top-level conv -> norm -> ReLU -> ``post``, sowing the conv and the norm outputs.

    The conv's sown output is its raw output when a norm follows; the last module of the unit
    sows the activated (and ``post``-processed) tensor that the next module receives.
    """
    x = layers.conv(x, features, kernel_size, name=conv_name)
    if layers.has_norm:
      x = self._emit(conv_name, x)
      x = layers.norm_layer(x, train=train, name=norm_name)
      conv_name = norm_name
    x = nn.relu(x)
    return self._emit(conv_name, x if post is None else post(x))

  def _classify(self, features: Array, layers: Layers) -> Array:
    """features f[B, D] -> logits f32[B, num_classes] via ``head``, sown as "head"."""
    return self._emit("head", layers.head(features, self.num_classes))


class ConvNormBlock(nn.Module):
  """conv (``conv``) -> norm (``norm``) -> ReLU -> optional pooling.

  Attributes:
    layers: layer factory of the owning model.
    features: output channels.
    kernel_size: conv kernel size.
    pool: applied after the ReLU, or None.
  """

  layers: Layers
  features: int
  kernel_size: int
  pool: Callable[[Array], Array] | None = None

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    """x: f[B, H, W, C_in] -> f[B, H', W', features]."""
    x = self.layers.conv(x, self.features, self.kernel_size, name="conv")
    x = nn.relu(self.layers.norm_layer(x, train=train, name="norm"))
    return x if self.pool is None else self.pool(x)


class ConvStack(Classifier):
  """A plain stack of conv-norm-ReLU units with pooling, then a readout and the classifier.

  Top-level modules: ``stem`` (+ ``stem_norm``), ``block1`` ... ``block{n-1}`` (ConvNormBlock),
  ``head``. Subclasses describe the stack with ``_plan`` and pick ``_pooling`` and ``_readout``.

  Attributes:
    kernel_size: square kernel size of every conv.
  """

  kernel_size: int = 3

  def _plan(self) -> tuple[tuple[int, bool], ...]:
    """One (features, pool_after) pair per conv, in forward order."""
    raise NotImplementedError

  def _pooling(self) -> Callable[[Array], Array]:
    """A pure f[B, H, W, C] -> f[B, H', W', C] function applied after units marked pool_after."""
    raise NotImplementedError

  def _readout(self, x: Array) -> Array:
    """f[B, H, W, C] -> f[B, D] features for the classifier."""
    raise NotImplementedError

  @property
  def block_names(self) -> tuple[str, ...]:
    """Top-level modules in forward order: stem, stem_norm, block1..., head."""
    blocks = tuple(f"block{i}" for i in range(1, len(self._plan())))
    return ("stem", *norm_names(self.norm, "stem_norm"), *blocks, "head")

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    """x: f32[B, H, W, C] normalized images -> f32[B, num_classes] logits."""
    layers = self._layers()
    plan = self._plan()
    if not plan:
      raise UserError(f"{type(self).__name__} has no conv units; depth must be >= 1")
    pool = self._pooling()
    (features, pool_after), *rest = plan
    x = self._conv_unit(x, layers, train=train, conv_name="stem", norm_name="stem_norm",
                        features=features, kernel_size=self.kernel_size,
                        post=pool if pool_after else None)
    for index, (features, pool_after) in enumerate(rest, start=1):
      name = f"block{index}"
      x = ConvNormBlock(layers, features, self.kernel_size, pool if pool_after else None,
                        name=name)(x, train)
      x = self._emit(name, x)
    return self._classify(self._readout(x), layers)
