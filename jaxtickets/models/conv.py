"""The models' convolutions: XLA's, with loop-safe gradients on XLA:CPU, or im2col matmuls.

Why: XLA:CPU runs a convolution through Eigen only when its dimension numbers are NHWC / HWIO /
NHWC, and its ``ConvCanonicalization`` pass rewrites the others into that form only in the
entry computation. JAX's gradient of a conv w.r.t. its kernel is such an "other" conv (the
batch contracted as features), and so, for the stride-1 case, is its input gradient (the
kernel's in/out swapped). Inside a ``lax.scan``, ``fori_loop`` or ``lax.map`` body these run
on XLA's naive loop emitter instead, tens of times slower (``benchmarks/cpu_loops.py``). Every
training loop, PGD attack and one-member-at-a-time population is such a loop body.

:func:`conv_general_dilated` is a drop-in for ``lax.conv_general_dilated`` (flax's
``nn.Conv(conv_general_dilated=...)``). On CPU, for the models' convolutions (NHWC input, HWIO
kernel, no dilation, one feature group) it is :func:`canonical_conv`, whose custom VJP spells
both gradients as NHWC / HWIO / NHWC convolutions of transposed operands; the stride-1 ones
call :func:`canonical_conv` again, so second-order gradients are written canonically too. Values
and gradients equal lax's to second order (tested). Other backends, and the other convolutions
(depthwise, dilated), use ``lax.conv_general_dilated`` itself: cuDNN and XLA:GPU choose their
own layouts.

XLA's ``ConvOperandSwapper`` turns a conv whose window is larger than its input (a 3x3 kernel on
a 2x2 feature map; in second-order gradients, the input gradient of a kernel gradient) into a
swapped form Eigen cannot run either; such inputs are padded explicitly first (``_eigen_conv``).
``compiled.noncanonical_convolutions`` checks the result in the tests.

:func:`im2col_conv_general_dilated` is the other implementation a model can choose
(``conv_impl="im2col"``): the same convolution as one matrix product of the input's patches with
the reshaped kernel. Why: under ``vmap`` over the kernel (a population of nets) XLA turns a
convolution into a grouped one, slow on CPUs and GPUs, and under ``vmap`` over the input with a
shared kernel (matching one net on several classes) its kernel gradient becomes a batch-grouped
one, slow as well. The matrix product batches into a batched GEMM instead. The price is
memory: the patches are ``k * k`` times the input. Which is faster where is measured by
``benchmarks/population.py`` and ``benchmarks/distill.py`` (``benchmarks/RESULTS.md``).

A custom VJP has no forward mode: on CPU, ``jax.jvp`` / ``jax.jacfwd`` through a model raise
(reverse mode, to any order, works). Nothing in jaxtickets uses forward mode.
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

_CANONICAL = ("NHWC", "HWIO", "NHWC")
Padding = tuple[tuple[int, int], ...]


def _eigen_conv(x: jax.Array, kernel: jax.Array, strides: Sequence[int], padding: Padding, *,
                lhs_dilation: Sequence[int] | None = None,
                rhs_dilation: Sequence[int] | None = None) -> jax.Array:
  """``lax.conv_general_dilated`` in NHWC / HWIO / NHWC, in a form XLA keeps on Eigen.

  XLA swaps the operands of a conv whose window is larger than its (undilated) input, into a
  form Eigen cannot run; Eigen takes no negative padding. In both cases the input is padded
  (and dilated) beforehand, behind a barrier, or XLA folds the pad back into the conv.
  """
  lhs_dilation = tuple(lhs_dilation or (1,) * len(padding))
  if (any(n < k for n, k in zip(x.shape[1:-1], kernel.shape[:-2]))
      or any(lo < 0 or hi < 0 for lo, hi in padding)):
    x = lax.optimization_barrier(lax.pad(
        x, jnp.zeros((), x.dtype),
        [(0, 0, 0), *((lo, hi, d - 1) for (lo, hi), d in zip(padding, lhs_dilation)), (0, 0, 0)]))
    padding, lhs_dilation = ((0, 0),) * len(padding), None
  return lax.conv_general_dilated(x, kernel, strides, padding, lhs_dilation=lhs_dilation,
                                  rhs_dilation=rhs_dilation, dimension_numbers=_CANONICAL)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def canonical_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, ...],
                   padding: Padding) -> jax.Array:
  """``lax.conv_general_dilated(x, kernel, strides, padding)`` in NHWC / HWIO / NHWC.

  Args:
    x: f[B, *spatial, C_in].
    kernel: f[*window, C_in, C_out].
    strides: one per spatial dimension.
    padding: (low, high) per spatial dimension.

  Returns:
    f[B, *spatial_out, C_out]; its VJP is made of canonical convolutions (module docstring).
  """
  return _eigen_conv(x, kernel, strides, padding)


def _forward(x, kernel, strides, padding):
  return canonical_conv(x, kernel, strides, padding), (x, kernel)


def _backward(strides, padding, residuals, dy):
  x, kernel = residuals
  spatial, window = x.shape[1:-1], kernel.shape[:-2]
  # Extent of dy with (stride - 1) zeros between its rows: what the window really slid over.
  extent = [s * (n - 1) + 1 for s, n in zip(strides, dy.shape[1:-1])]
  ones = (1,) * len(spatial)
  # dx: the full correlation of (dilated) dy with the flipped kernel, C_out -> C_in.
  flipped = jnp.flip(kernel, axis=tuple(range(len(window)))).swapaxes(-1, -2)
  dx_padding = tuple((k - 1 - lo, n + lo - e)
                     for n, k, (lo, _), e in zip(spatial, window, padding, extent))
  # dkernel: C_in plays the batch, B the contracted features, dy the kernel.
  x_t = jnp.moveaxis(x, (0, -1), (-1, 0))  # [C_in, *spatial, B]
  dy_t = jnp.moveaxis(dy, 0, -2)  # [*spatial_out, B, C_out]
  dk_padding = tuple((lo, k - 1 + e - n - lo)
                     for n, k, (lo, _), e in zip(spatial, window, padding, extent))
  if tuple(strides) == ones:
    dx = canonical_conv(dy, flipped, ones, dx_padding)
    dk = canonical_conv(x_t, dy_t, ones, dk_padding)
  else:
    # Dilated convs are canonical for Eigen too; their own gradients (second order through a
    # strided conv) fall back to lax's rules.
    dx = _eigen_conv(dy, flipped, ones, dx_padding, lhs_dilation=strides)
    dk = _eigen_conv(x_t, dy_t, ones, dk_padding, rhs_dilation=strides)
  return dx.astype(x.dtype), jnp.moveaxis(dk, 0, -2).astype(kernel.dtype)


canonical_conv.defvjp(_forward, _backward)


def _is_plain_2d(lhs, rhs, dimension_numbers, feature_group_count, batch_group_count,
                 lhs_dilation, rhs_dilation) -> bool:
  """Whether a ``lax.conv_general_dilated`` call is 2-D NHWC / HWIO / NHWC, undilated and
  ungrouped: the convolutions both implementations rewrite."""
  return (lhs.ndim == rhs.ndim == 4
          and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
          == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _CANONICAL)
          and feature_group_count == 1 and batch_group_count == 1
          and all(d == 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ()))))


def _explicit_padding(lhs, rhs, window_strides, padding) -> Padding:
  """((low, high), ...) of a ``lax.conv_general_dilated`` padding ("SAME", "VALID" or pairs)."""
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:-1], rhs.shape[:-2], window_strides, padding)
  return tuple((int(lo), int(hi)) for lo, hi in padding)


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                         padding: str | Sequence[tuple[int, int]],
                         lhs_dilation: Sequence[int] | None = None,
                         rhs_dilation: Sequence[int] | None = None,
                         dimension_numbers=None, feature_group_count: int = 1,
                         batch_group_count: int = 1, precision=None,
                         preferred_element_type=None) -> jax.Array:
  """``lax.conv_general_dilated``'s signature; :func:`canonical_conv` where it applies (CPU,
  2-D NHWC / HWIO, no dilation, one group, default precision)."""
  canonical = (
      jax.default_backend() == "cpu"
      and _is_plain_2d(lhs, rhs, dimension_numbers, feature_group_count, batch_group_count,
                       lhs_dilation, rhs_dilation)
      and precision is None and preferred_element_type is None)
  if not canonical:
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, batch_group_count, precision, preferred_element_type)
  return canonical_conv(lhs, rhs, tuple(window_strides),
                        _explicit_padding(lhs, rhs, window_strides, padding))


def im2col_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: Padding,
                precision=None, preferred_element_type=None) -> jax.Array:
  """A 2-D NHWC / HWIO / NHWC convolution as patches times kernel (module docstring).

  Args:
    x: f[B, H, W, C_in].
    kernel: f[kh, kw, C_in, C_out].
    strides: (s_h, s_w).
    padding: ((low, high), (low, high)), each >= 0.
    precision: as for ``lax.dot_general``.
    preferred_element_type: as for ``lax.dot_general``.

  Returns:
    f[B, H', W', C_out], H' = (H + low + high - kh) // s_h + 1 (likewise W'); equal to
    ``lax.conv_general_dilated`` up to the order of the sums.
  """
  window_h, window_w, channels, features = kernel.shape
  x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
  out_h = (x.shape[1] - window_h) // strides[0] + 1
  out_w = (x.shape[2] - window_w) // strides[1] + 1
  # Patch channels ordered (row, column, C_in), as the HWIO kernel flattens.
  patches = jnp.concatenate([
      lax.slice(x, (0, row, column, 0),
                (x.shape[0], row + strides[0] * (out_h - 1) + 1,
                 column + strides[1] * (out_w - 1) + 1, channels), (1, *strides, 1))
      for row in range(window_h) for column in range(window_w)], axis=-1)
  return lax.dot_general(patches, kernel.reshape(window_h * window_w * channels, features),
                         (((3,), (0,)), ((), ())), precision=precision,
                         preferred_element_type=preferred_element_type)


def im2col_conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                                padding: str | Sequence[tuple[int, int]],
                                lhs_dilation: Sequence[int] | None = None,
                                rhs_dilation: Sequence[int] | None = None,
                                dimension_numbers=None, feature_group_count: int = 1,
                                batch_group_count: int = 1, precision=None,
                                preferred_element_type=None) -> jax.Array:
  """``lax.conv_general_dilated``'s signature; :func:`im2col_conv` where it applies (2-D
  NHWC / HWIO, no dilation, one group, padding >= 0), :func:`conv_general_dilated` otherwise
  (depthwise convolutions)."""
  if _is_plain_2d(lhs, rhs, dimension_numbers, feature_group_count, batch_group_count,
                  lhs_dilation, rhs_dilation):
    pads = _explicit_padding(lhs, rhs, window_strides, padding)
    if all(lo >= 0 and hi >= 0 for lo, hi in pads):
      return im2col_conv(lhs, rhs, tuple(window_strides), pads, precision,
                         preferred_element_type)
  return conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
      feature_group_count, batch_group_count, precision, preferred_element_type)


CONV_IMPLS = {"xla": conv_general_dilated, "im2col": im2col_conv_general_dilated}
