"""Representation similarity: CCA, SVCCA (Raghu et al. 2017) and PWCCA (Morcos et al. 2018).

A representation is ``f32[N, D]``: N datapoints (inputs, or inputs x spatial positions for conv
layers, see :func:`flatten_conv`) by D neurons. Two representations are compared on the same N
datapoints in the same order.

Everything is computed from the thin SVD of each centered representation, ``x_c = U S V^T``,
never from explicit covariance matrices, so the condition number is not squared. With a ridge
``epsilon * max(S)^2`` added to each covariance, the whitened cross-covariance is
``diag(g_x) U_x^T U_y diag(g_y)`` with ``g = S / sqrt(S^2 + epsilon * max(S)^2)``; its singular
values are the canonical correlations. Directions whose singular value falls below about
``sqrt(epsilon) * max(S)`` (float32 round-off of a rank-deficient representation, dead ReLUs, or
directions SVCCA drops) get a gain near zero and cannot produce spurious correlations. The ridge is
relative (as in google/svcca, which scales covariances before adding epsilon) so it does not depend
on the activations' units.

:func:`cca`, :func:`svcca` and :func:`pwcca` run jitted cores and can be traced inside a caller's
``jax.jit``; :func:`layerwise_similarity` returns Python floats and cannot.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp


class CCAResult(NamedTuple):
  """Canonical correlations of two representations and what produces them.

  Attributes:
    rho: f32[K], K = min(D1, D2): canonical correlations, descending, in [0, 1].
    x_directions: f32[D1, K]: column i maps centered x to its i-th canonical variable.
    y_directions: f32[D2, K]: the same for y.
    x_variables: f32[N, K]: ``(x - mean) @ x_directions``, unit variance (up to the ridge),
      mutually uncorrelated.
    y_variables: f32[N, K]: the same for y; ``corr(x_variables[:, i], y_variables[:, i]) = rho[i]``.
  """
  rho: jax.Array
  x_directions: jax.Array
  y_directions: jax.Array
  x_variables: jax.Array
  y_variables: jax.Array


METHODS = ("svcca", "pwcca")  # what layerwise_similarity computes

# Full f32 products even on GPUs, whose default f32 matmul (TF32) costs CCA about three digits.
_matmul = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)


def _centered_svd(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Thin SVD of the centered ``x: f32[N, D]`` as ``(u: f32[N, D], s: f32[D], vt: f32[D, D])``."""
  return jnp.linalg.svd(x - jnp.mean(x, axis=0), full_matrices=False)


def _ridged_scale(s: jax.Array, epsilon: jax.Array) -> jax.Array:
  """``sqrt(s^2 + epsilon * max(s)^2)`` for singular values ``s: f32[D]``."""
  return jnp.sqrt(s**2 + epsilon * jnp.max(s) ** 2)


def _canonical_rotations(
    u_x: jax.Array, s_x: jax.Array, u_y: jax.Array, s_y: jax.Array, epsilon: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Canonical correlations from the two SVD bases.

  Args:
    u_x: f32[N, D1] and ``s_x: f32[D1]``: left singular vectors and values of the centered x
      (a zero in ``s_x`` removes that direction from the comparison).
    u_y: f32[N, D2] and ``s_y: f32[D2]``: the same for y.
    epsilon: ridge relative to each representation's largest variance.

  Returns:
    ``rho: f32[K]`` descending, and ``left: f32[D1, K]``, ``right: f32[D2, K]``, the singular
    vectors of the whitened cross-covariance: the canonical variables are
    ``sqrt(N) * u_x @ (gain_x[:, None] * left)`` and likewise for y.
  """
  gain_x = s_x / _ridged_scale(s_x, epsilon)
  gain_y = s_y / _ridged_scale(s_y, epsilon)
  whitened_cross = gain_x[:, None] * _matmul(u_x.T, u_y) * gain_y[None, :]
  left, rho, right_t = jnp.linalg.svd(whitened_cross, full_matrices=False)
  # Round-off can lift a perfect correlation just above one.
  return jnp.minimum(rho, 1.0), left, right_t.T


@jax.jit
def _cca(x: jax.Array, y: jax.Array, epsilon: jax.Array) -> CCAResult:
  (u_x, s_x, vt_x), (u_y, s_y, vt_y) = _centered_svd(x), _centered_svd(y)
  rho, left, right = _canonical_rotations(u_x, s_x, u_y, s_y, epsilon)
  root_n = math.sqrt(x.shape[0])

  def directions_and_variables(u, s, vt, rotation):
    # x_c @ a = u s vt a, so a = vt^T (rotation / ridged s) gives u (gain * rotation).
    directions = root_n * _matmul(vt.T, rotation / _ridged_scale(s, epsilon)[:, None])
    variables = root_n * _matmul(u, (s / _ridged_scale(s, epsilon))[:, None] * rotation)
    return directions, variables

  x_directions, x_variables = directions_and_variables(u_x, s_x, vt_x, left)
  y_directions, y_variables = directions_and_variables(u_y, s_y, vt_y, right)
  return CCAResult(rho, x_directions, y_directions, x_variables, y_variables)


def _kept_directions(s: jax.Array, keep_variance: jax.Array, num_rows: int) -> jax.Array:
  """bool[D]: the fewest leading directions of ``s: f32[D]`` (singular values of an
  ``[num_rows, D]`` matrix) that hold ``keep_variance``, never one of its null space."""
  variance = s**2
  # Keep a direction while the ones before it hold less than the target fraction.
  before = (jnp.cumsum(variance) - variance) / jnp.sum(variance)
  # Round-off leaves null directions a tiny singular value (numpy's matrix_rank threshold);
  # with keep_variance 1 they would count as uncorrelated directions.
  null = s <= jnp.max(s) * max(num_rows, s.shape[0]) * jnp.finfo(s.dtype).eps
  return (before < keep_variance) & ~null


@jax.jit
def _svcca(x: jax.Array, y: jax.Array, keep_variance: jax.Array, epsilon: jax.Array) -> jax.Array:
  (u_x, s_x, _), (u_y, s_y, _) = _centered_svd(x), _centered_svd(y)
  keep_x = _kept_directions(s_x, keep_variance, x.shape[0])
  keep_y = _kept_directions(s_y, keep_variance, y.shape[0])
  # Shapes stay static under jit: dropped directions get a zero singular value instead of being
  # sliced off, which leaves exactly min(kept_x, kept_y) nonzero canonical correlations first.
  rho, _, _ = _canonical_rotations(
      u_x, jnp.where(keep_x, s_x, 0.0), u_y, jnp.where(keep_y, s_y, 0.0), epsilon)
  num_correlations = jnp.minimum(jnp.sum(keep_x), jnp.sum(keep_y))
  counted = jnp.arange(rho.shape[0]) < num_correlations
  return jnp.sum(jnp.where(counted, rho, 0.0)) / num_correlations


@jax.jit
def _pwcca(x: jax.Array, y: jax.Array, epsilon: jax.Array) -> jax.Array:
  result = _cca(x, y, epsilon)
  # Weigh by the side with fewer neurons, whose K canonical variables span all of it (the
  # google/svcca choice). As in Morcos et al., the weights are the whitened canonical variables'
  # correlations with that side's own (centered) neurons; google/svcca's pwcca.py instead
  # projects unwhitened activations, uncentered, and takes y's variables from acts1.
  if x.shape[1] <= y.shape[1]:
    variables, neurons = result.x_variables, x
  else:
    variables, neurons = result.y_variables, y
  # Variables of round-off directions are not exactly centered; against uncentered neurons the
  # neuron means would give them weight.
  centered_neurons = neurons - jnp.mean(neurons, axis=0)
  weights = jnp.sum(jnp.abs(_matmul(variables.T, centered_neurons)), axis=1)
  return jnp.sum(weights * result.rho) / jnp.sum(weights)


def _representations(x: jax.Array, y: jax.Array, x_name: str = "x",
                     y_name: str = "y") -> tuple[jax.Array, jax.Array]:
  """``x, y`` as float32; ValueError unless each is [N, D] with N >= D."""
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
  for name, rep in ((x_name, x), (y_name, y)):
    # With fewer datapoints than neurons CCA finds correlations near 1 in any data.
    if rep.ndim != 2 or rep.shape[0] < rep.shape[1]:
      raise ValueError(f"{name} has shape {tuple(rep.shape)}; expected f32[datapoints, neurons] "
                       "with at least as many datapoints as neurons (see flatten_conv)")
  return x, y


def cca(x: jax.Array, y: jax.Array, *, epsilon: float = 1e-10) -> CCAResult:
  """Canonical correlation analysis of two representations of the same datapoints.

  Args:
    x: f32[N, D1] and ``y: f32[N, D2]``, with N >= max(D1, D2).
    epsilon: >= 0, ridge added to each covariance, relative to its largest eigenvalue; it
      silences directions with less than about ``epsilon`` of the top direction's variance.

  Returns:
    A :class:`CCAResult` with ``rho: f32[min(D1, D2)]`` descending; NaN where a side is constant
    (no variance, e.g. a layer of dead ReLUs), for which canonical correlations are undefined.
  """
  return _cca(*_representations(x, y), epsilon)


def svcca(x: jax.Array, y: jax.Array, *, keep_variance: float = 0.99,
          epsilon: float = 1e-10) -> jax.Array:
  """SVCCA: mean canonical correlation after reducing each side to its top singular directions.

  Each centered representation keeps the fewest leading singular directions that explain at least
  ``keep_variance`` of its variance (the SVCCA paper keeps 0.99); the result is the
  mean of the min(kept_x, kept_y) canonical correlations between the reduced representations.

  Args:
    x: f32[N, D1] and ``y: f32[N, D2]``, with N >= max(D1, D2).
    keep_variance: fraction in (0, 1].
    epsilon: relative ridge, as in :func:`cca`.

  Returns:
    f32[] in [0, 1]; NaN when a side is constant (see :func:`cca`).
  """
  return _svcca(*_representations(x, y), keep_variance, epsilon)


def pwcca(x: jax.Array, y: jax.Array, *, epsilon: float = 1e-10) -> jax.Array:
  """Projection-weighted CCA (Morcos et al. 2018): canonical correlations weighted by importance.

  The weight of canonical pair i is ``sum_j |<h_i, z_j>|`` over the neurons ``z_j`` of the side
  with fewer neurons (x on a tie) and its canonical variables ``h_i``, normalized to sum to one.

  Args:
    x: f32[N, D1] and ``y: f32[N, D2]``, with N >= max(D1, D2).
    epsilon: relative ridge, as in :func:`cca`.

  Returns:
    f32[] in [0, 1]; symmetric in x and y when D1 != D2; NaN when a side is constant (see
    :func:`cca`).
  """
  return _pwcca(*_representations(x, y), epsilon)


def flatten_conv(acts: jax.Array, *, max_datapoints: int | None = None) -> jax.Array:
  """Conv activations as a representation: each image position is a datapoint.

  Args:
    acts: f32[B, H, W, C].
    max_datapoints: None, or >= B: then positions are subsampled with the smallest spatial
      stride s for which ``B * ceil(H/s) * ceil(W/s) <= max_datapoints`` (every s-th row and
      column, so two networks' maps of one size keep the same positions).

  Returns:
    f32[B * H' * W', C], with H' = W' = the full size or the subsampled one.
  """
  batch, height, width, channels = acts.shape
  if max_datapoints is not None:
    if max_datapoints < batch:  # No stride would do.
      raise ValueError(f"max_datapoints={max_datapoints} is below the batch size {batch}")
    stride = next(s for s in range(1, max(height, width) + 1)
                  if batch * -(-height // s) * -(-width // s) <= max_datapoints)
    acts = acts[:, ::stride, ::stride, :]
  return jnp.reshape(acts, (-1, channels))


def layerwise_similarity(
    acts_a: Mapping[str, jax.Array],
    acts_b: Mapping[str, jax.Array],
    method: str = "svcca",
    *,
    keep_variance: float = 0.99,
    epsilon: float = 1e-10,
    max_datapoints: int | None = None,
) -> dict[str, float]:
  """Similarity of two networks' activations, layer by layer, on the same inputs.

  Args:
    acts_a: layer name -> f32[B, H, W, C] (conv, flattened with :func:`flatten_conv`) or
      f32[B, D] activations of network a.
    acts_b: the same layer names for network b, with the same inputs in the same order.
    method: one of :data:`METHODS`.
    keep_variance: SVCCA's kept variance fraction (ignored by PWCCA).
    epsilon: relative ridge, as in :func:`cca`.
    max_datapoints: bound on datapoints per conv layer (see :func:`flatten_conv`).

  Returns:
    Layer name -> similarity in [0, 1] (NaN for a constant layer, see :func:`cca`), in the
    order of ``acts_a``.
  """
  similarities = {
      "svcca": functools.partial(svcca, keep_variance=keep_variance, epsilon=epsilon),
      "pwcca": functools.partial(pwcca, epsilon=epsilon),
  }
  if method not in METHODS:
    raise ValueError(f"unknown similarity method {method!r}; known: {', '.join(METHODS)}")

  result = {}
  for name in acts_a:
    x, y = _representations(_representation(acts_a[name], max_datapoints),
                            _representation(acts_b[name], max_datapoints),
                            f"acts_a[{name!r}]", f"acts_b[{name!r}]")
    result[name] = float(similarities[method](x, y))
  return result


def _representation(acts: jax.Array, max_datapoints: int | None) -> jax.Array:
  """A layer's activations as f32[N, D]: conv outputs flattened by :func:`flatten_conv`."""
  acts = jnp.asarray(acts)
  return flatten_conv(acts, max_datapoints=max_datapoints) if acts.ndim == 4 else acts
