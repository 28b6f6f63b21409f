"""Weight initializers that match PyTorch's defaults and the papers' choices.

Every initializer is a flax-style ``(key, shape, dtype) -> Array`` function. Fans follow flax's
kernel layout ``[..., in, out]``: the receptive field is the product of the leading dimensions, so
``fan_in = prod(shape[:-1])`` and ``fan_out = shape[-1] * prod(shape[:-2])``. For a depthwise conv
(kernel ``[kh, kw, 1, C]``) this gives ``fan_in = kh * kw``, as PyTorch computes it.
"""

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from jaxtickets.errors import UserError

Initializer = Callable[..., jax.Array]


def fan_in(shape: Sequence[int]) -> int:
  """Number of inputs feeding one output unit of a kernel of this shape.

  Args:
    shape: kernel shape, ``[in, out]`` for a dense layer or ``[kh, kw, in, out]`` for a conv.

  Returns:
    ``prod(shape[:-1])``.

  Raises:
    UserError: fewer than 2 dims (a bias: its fan would silently be 1).
  """
  if len(shape) < 2:
    raise UserError(f"fan_in needs a kernel shape with at least 2 dims, got {tuple(shape)}")
  return math.prod(shape[:-1])


def fan_out(shape: Sequence[int]) -> int:
  """Number of outputs one input unit feeds: ``shape[-1] * prod(shape[:-2])`` (a kernel shape,
  as for :func:`fan_in`)."""
  return shape[-1] * math.prod(shape[:-2])


def _uniform(key: jax.Array, shape: Sequence[int], dtype, bound: float) -> jax.Array:
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def _normal(key: jax.Array, shape: Sequence[int], dtype, std: float) -> jax.Array:
  # Untruncated, as torch.nn.init.kaiming_normal_/xavier_normal_ sample.
  return std * jax.random.normal(key, shape, dtype)


def _signed_constant(key: jax.Array, shape: Sequence[int], dtype, magnitude: float) -> jax.Array:
  return magnitude * jax.random.rademacher(key, shape, dtype)


# name -> sampler(key, shape, dtype, scaled_fan_in, scaled_fan_out)
_SAMPLERS: dict[str, Callable[..., jax.Array]] = {
    # kaiming_uniform_(a=sqrt(5)): gain sqrt(1/3) * sqrt(3 / fan_in) = 1 / sqrt(fan_in).
    "pytorch": lambda key, shape, dtype, fi, fo: _uniform(key, shape, dtype, 1.0 / math.sqrt(fi)),
    "kaiming_normal": lambda key, shape, dtype, fi, fo: _normal(key, shape, dtype,
                                                                math.sqrt(2.0 / fi)),
    # kaiming_normal_(mode="fan_out", nonlinearity="relu"): torchvision ResNets' conv init.
    "kaiming_normal_fan_out": lambda key, shape, dtype, fi, fo: _normal(key, shape, dtype,
                                                                        math.sqrt(2.0 / fo)),
    "kaiming_uniform": lambda key, shape, dtype, fi, fo: _uniform(key, shape, dtype,
                                                                  math.sqrt(6.0 / fi)),
    "xavier_normal": lambda key, shape, dtype, fi, fo: _normal(key, shape, dtype,
                                                               math.sqrt(2.0 / (fi + fo))),
    "signed_kaiming_constant": lambda key, shape, dtype, fi, fo: _signed_constant(
        key, shape, dtype, math.sqrt(2.0 / fi)),
}

INITIALIZER_NAMES: tuple[str, ...] = tuple(_SAMPLERS)


def get_initializer(name: str, *, fan_scale: float = 1.0) -> Initializer:
  """Kernel initializer by name.

  Names: ``"pytorch"`` U(+-1/sqrt(fan_in)) (PyTorch's default conv/linear init),
  ``"kaiming_normal"`` N(0, 2/fan_in), ``"kaiming_normal_fan_out"`` N(0, 2/fan_out)
  (torchvision's ResNet convs), ``"kaiming_uniform"`` U(+-sqrt(6/fan_in)),
  ``"xavier_normal"`` N(0, 2/(fan_in + fan_out)), ``"signed_kaiming_constant"``
  random sign * sqrt(2/fan_in) (the edge-popup / RST default for frozen weights).

  Args:
    name: one of ``INITIALIZER_NAMES``.
    fan_scale: multiplies every fan before use, > 0; edge-popup's ``scale_fan`` passes the kept
      fraction so the surviving connections have the variance of a dense layer.

  Returns:
    ``init(key, shape, dtype=jnp.float32) -> Array[shape]``.

  Raises:
    UserError: unknown name.
  """
  if name not in _SAMPLERS:
    raise UserError(f"unknown initializer {name!r}; known: {', '.join(INITIALIZER_NAMES)}")
  sampler = _SAMPLERS[name]

  def init(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
    return sampler(key, shape, dtype, fan_in(shape) * fan_scale, fan_out(shape) * fan_scale)

  return init


def pytorch_bias_init(fan_in: int) -> Initializer:
  """PyTorch's default bias init for a layer with ``fan_in`` inputs per output: U(+-1/sqrt(fan_in)).

  Args:
    fan_in: inputs per output unit of the layer the bias belongs to (``kh * kw * in / groups``),
      >= 1.

  Returns:
    ``init(key, shape, dtype=jnp.float32) -> Array[shape]``.
  """
  bound = 1.0 / math.sqrt(fan_in)

  def init(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
    return _uniform(key, shape, dtype, bound)

  return init
