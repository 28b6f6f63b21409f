"""Differentiable Siamese Augmentation (DSA; Zhao & Bilen, ICML 2021) and CutMix.

An augmentation is split into a draw and an application: :func:`sample_params` draws
:class:`Params` from a key, :func:`apply` applies them to a batch and is differentiable in the
images. The Siamese pair of a matching step (a class's real batch and its synthetic images)
shares ONE draw (leading size 1, broadcast over each batch); evaluation draws per sample
(leading size B). The ops and their ranges are the reference's (IDC's ``DiffAug``, itself DSA's):

* ``color``: brightness ``x + (u - 0.5)``, saturation ``(x - mean_c) * 2u + mean_c`` (mean over
  channels), contrast ``(x - mean) * (u + 0.5) + mean`` (mean over the image); u ~ U(0, 1);
* ``crop``: integer translation by up to ``int(0.125 * size + 0.5)`` pixels with zero fill
  (the reference pads by one pixel and clamps its indices into the padding);
* ``scale``: x and y scaled by U(1/1.2, 1.2); ``rotate``: by U(-15, 15) degrees (bilinear
  resampling with zero fill, PyTorch's ``affine_grid``/``grid_sample`` with align_corners=False);
* ``flip``: left-right with probability 0.5;
* ``cutout``: a square of half the image side set to zero, centred anywhere in the image.

The reference applies the ops to NORMALIZED images, so zero fill means the mean color; pass the
dataset's ``mean``/``std`` to :func:`apply` to do the same on [0, 1] pixels.

Two compositions (:data:`COMPOSITIONS`): ``"idc"`` (IDC/Acc-DD's ``DiffAug``: flip, color, ONE of
the geometric ops crop/scale/rotate drawn per call, then cutout) and ``"one"`` (the DSA paper's
and DM's mode 'S': one op of the strategy drawn per call). The op chosen per call is shared by
the whole batch even in per-sample mode, as in both references. Flip and the geometric op are
composed into one affine map, so every draw costs one resampling.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxtickets import data as data_lib
from jaxtickets import train as train_lib
from jaxtickets.errors import UserError

OPS = ("color", "crop", "cutout", "flip", "scale", "rotate")
GEOMETRIC_OPS = ("crop", "scale", "rotate")
COMPOSITIONS = ("idc", "one")

FLIP_PROBABILITY = 0.5
SCALE_RATIO = 1.2
ROTATE_DEGREES = 15.0
CROP_PAD_RATIO = 0.125
CUTOUT_RATIO = 0.5
BRIGHTNESS = 1.0
SATURATION = 2.0
CONTRAST = 0.5


@dataclasses.dataclass(frozen=True)
class Strategy:
  """Which ops a DSA draw may use, and how they compose.

  Attributes:
    ops: a subset of :data:`OPS` (empty: no augmentation).
    composition: one of :data:`COMPOSITIONS`.
  """
  ops: tuple[str, ...]
  composition: str = "idc"

  def __post_init__(self):  # Unknown names would be silently ignored by the draws.
    unknown = [op for op in self.ops if op not in OPS]
    if unknown:
      raise UserError(f"unknown DSA op {unknown[0]!r}; known: {', '.join(OPS)}")
    if self.composition not in COMPOSITIONS:
      raise UserError(f"unknown DSA composition {self.composition!r}; known: "
                      f"{', '.join(COMPOSITIONS)}")

  @classmethod
  def parse(cls, text: str, composition: str = "idc") -> Strategy:
    """The reference's strategy strings: ``"color_crop_cutout"``; ``"none"`` or ``""``: no ops."""
    names = () if text.lower() in ("", "none") else tuple(text.lower().split("_"))
    return cls(tuple(dict.fromkeys(names)), composition)


class Params(NamedTuple):
  """One draw of DSA parameters; leading size 1 (shared by a batch) or B (per sample).

  Attributes:
    brightness: f32[B] added to every pixel.
    saturation: f32[B] factor on the deviation from the per-pixel channel mean.
    contrast: f32[B] factor on the deviation from the image mean.
    theta: f32[B, 2, 3] affine map from output to input coordinates in [-1, 1] (x = width,
      y = height), as PyTorch's ``affine_grid`` takes it.
    cutout_center: i32[B, 2] (row, column) of the cutout square.
    cutout: f32[B] 1 where the cutout is applied, 0 where not.
  """
  brightness: jax.Array
  saturation: jax.Array
  contrast: jax.Array
  theta: jax.Array
  cutout_center: jax.Array
  cutout: jax.Array


def identity_params(count: int = 1) -> Params:
  """Params that leave images unchanged (leading size ``count``)."""
  return Params(jnp.zeros((count,)), jnp.ones((count,)), jnp.ones((count,)),
                jnp.tile(jnp.eye(2, 3), (count, 1, 1)), jnp.zeros((count, 2), jnp.int32),
                jnp.zeros((count,)))


def _crop_shift(size: int) -> int:
  return int(size * CROP_PAD_RATIO + 0.5)


def _cutout_size(size: int) -> int:
  return int(size * CUTOUT_RATIO + 0.5)


def _affine(matrix: jax.Array) -> jax.Array:
  """f32[B, 2, 3] -> f32[B, 3, 3] homogeneous."""
  bottom = jnp.broadcast_to(jnp.array([0.0, 0.0, 1.0]), matrix.shape[:-2] + (1, 3))
  return jnp.concatenate([matrix, bottom], axis=-2)


def _geometric_thetas(key: jax.Array, count: int, height: int, width: int) -> jax.Array:
  """f32[3, count, 2, 3]: a crop, a scale and a rotation draw (in GEOMETRIC_OPS order)."""
  crop_key, scale_key, rotate_key = jax.random.split(key, 3)
  shifts = jnp.array([_crop_shift(height), _crop_shift(width)])
  # Reference: out[i, j] = padded[i + t_row + 1, j + t_col + 1] = x[i + t_row, j + t_col].
  offsets = jax.random.randint(crop_key, (count, 2), -shifts, shifts + 1).astype(jnp.float32)
  ones, zeros = jnp.ones((count,)), jnp.zeros((count,))
  crop = jnp.stack([jnp.stack([ones, zeros, 2 * offsets[:, 1] / width], -1),
                    jnp.stack([zeros, ones, 2 * offsets[:, 0] / height], -1)], 1)
  scales = jax.random.uniform(scale_key, (count, 2)) * (SCALE_RATIO - 1 / SCALE_RATIO) + \
      1 / SCALE_RATIO
  scale = jnp.stack([jnp.stack([scales[:, 0], zeros, zeros], -1),
                     jnp.stack([zeros, scales[:, 1], zeros], -1)], 1)
  angle = (jax.random.uniform(rotate_key, (count,)) - 0.5) * 2 * ROTATE_DEGREES / 180 * math.pi
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  rotate = jnp.stack([jnp.stack([cos, -sin, zeros], -1), jnp.stack([sin, cos, zeros], -1)], 1)
  return jnp.stack([crop, scale, rotate])


def sample_params(key: jax.Array, strategy: Strategy, image_shape: Sequence[int], *,
                  count: int = 1) -> Params:
  """Draws DSA parameters.

  Args:
    key: PRNG key.
    strategy: the ops and their composition.
    image_shape: (H, W, C) of the images they will be applied to.
    count: 1 for one draw shared by a batch (Siamese), B for one draw per sample.

  Returns:
    Params with leading size ``count``. Jittable and vmappable over keys.
  """
  height, width = image_shape[0], image_shape[1]
  if not strategy.ops:
    return identity_params(count)
  (choice_key, flip_key, color_key, geometric_key, pick_key,
   cutout_key) = jax.random.split(key, 6)
  ops = strategy.ops
  geometric = [op for op in GEOMETRIC_OPS if op in ops]
  if strategy.composition == "idc":
    # Python bools: flip, color and cutout always run when listed.
    active = {op: op in ops for op in ("flip", "color", "cutout")}
  else:  # One op of the strategy per call, shared by the batch.
    chosen = jax.random.randint(choice_key, (), 0, len(ops))
    active = {op: op in ops and chosen == ops.index(op) for op in ("flip", "color", "cutout")}

  def gate(op: str, value: jax.Array, identity: float) -> jax.Array:
    flag = active[op]
    if flag is True:
      return value
    if flag is False:
      return jnp.full_like(value, identity)
    return jnp.where(flag, value, identity)

  u = jax.random.uniform(color_key, (3, count))
  brightness = gate("color", (u[0] - 0.5) * BRIGHTNESS, 0.0)
  saturation = gate("color", u[1] * SATURATION, 1.0)
  contrast = gate("color", u[2] + CONTRAST, 1.0)

  theta = jnp.tile(jnp.eye(2, 3), (count, 1, 1))
  if geometric:
    thetas = _geometric_thetas(geometric_key, count, height, width)
    candidates = thetas[jnp.array([GEOMETRIC_OPS.index(op) for op in geometric])]
    if strategy.composition == "idc":
      theta = candidates[jax.random.randint(pick_key, (), 0, len(geometric))]
    else:
      hit = jnp.array([ops.index(op) for op in geometric]) == chosen
      theta = jnp.where(jnp.any(hit), candidates[jnp.argmax(hit)], theta)
  flip = jax.random.uniform(flip_key, (count,)) < FLIP_PROBABILITY
  flip = gate("flip", flip.astype(jnp.float32), 0.0)
  # Flip happens first: out(p) = x(F(A p)), i.e. the map F after A.
  mirror = jnp.stack([jnp.stack([1 - 2 * flip, jnp.zeros_like(flip), jnp.zeros_like(flip)], -1),
                      jnp.broadcast_to(jnp.array([0.0, 1.0, 0.0]), (count, 3))], 1)
  theta = (_affine(mirror) @ _affine(theta))[:, :2]

  cut_height, cut_width = _cutout_size(height), _cutout_size(width)
  bounds = jnp.array([height + 1 - cut_height % 2, width + 1 - cut_width % 2])
  center = jax.random.randint(cutout_key, (count, 2), 0, bounds)
  cutout = gate("cutout", jnp.ones((count,)), 0.0)
  return Params(brightness, saturation, contrast, theta, center, cutout)


def affine_warp(x: jax.Array, theta: jax.Array) -> jax.Array:
  """Bilinear resampling with zero fill, PyTorch's ``grid_sample(affine_grid(theta))``.

  Args:
    x: f32[B, H, W, C].
    theta: f32[B, 2, 3] output -> input map in normalized coordinates (align_corners=False).

  Returns:
    f32[B, H, W, C]; differentiable in ``x``.
  """
  count, height, width, channels = x.shape
  xs = (2 * jnp.arange(width) + 1) / width - 1
  ys = (2 * jnp.arange(height) + 1) / height - 1
  grid = jnp.stack([jnp.broadcast_to(xs[None, :], (height, width)),
                    jnp.broadcast_to(ys[:, None], (height, width)),
                    jnp.ones((height, width))], -1)  # [H, W, 3]
  source = jnp.einsum("bij,hwj->bhwi", theta, grid)
  column = ((source[..., 0] + 1) * width - 1) / 2
  row = ((source[..., 1] + 1) * height - 1) / 2
  column0, row0 = jnp.floor(column), jnp.floor(row)
  flat = x.reshape(count, height * width, channels)
  out = jnp.zeros_like(x)
  for d_row in (0, 1):
    for d_col in (0, 1):
      r, c = row0 + d_row, column0 + d_col
      weight = (1 - jnp.abs(row - r)) * (1 - jnp.abs(column - c))
      inside = (r >= 0) & (r < height) & (c >= 0) & (c < width)
      index = (jnp.clip(r, 0, height - 1) * width + jnp.clip(c, 0, width - 1)).astype(jnp.int32)
      values = jnp.take_along_axis(flat, index.reshape(count, -1, 1), axis=1)
      out = out + jnp.where(inside, weight, 0.0)[..., None] * values.reshape(x.shape)
  return out


def apply(params: Params, x: jax.Array, *, mean: Sequence[float] | None = None,
          std: Sequence[float] | None = None) -> jax.Array:
  """Applies one draw to a batch; differentiable in ``x``.

  Args:
    params: leading size 1 (broadcast over the batch) or B.
    x: f32[B, H, W, C] pixels.
    mean: per-channel mean; with ``std``, the ops run on ``(x - mean) / std`` (as the reference
      runs them on normalized images) and the result is mapped back to pixels.
    std: per-channel std.

  Returns:
    f32[B, H, W, C].
  """
  count = x.shape[0]
  params = jax.tree.map(lambda leaf: jnp.broadcast_to(leaf, (count,) + leaf.shape[1:]), params)
  if mean is not None:
    x = data_lib.normalize(x, mean, std)
  column = lambda value: value[:, None, None, None]  # noqa: E731
  x = x + column(params.brightness)
  channel_mean = jnp.mean(x, axis=-1, keepdims=True)
  x = (x - channel_mean) * column(params.saturation) + channel_mean
  image_mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
  x = (x - image_mean) * column(params.contrast) + image_mean
  x = affine_warp(x, params.theta)
  height, width = x.shape[1:3]
  cut_height, cut_width = _cutout_size(height), _cutout_size(width)
  top = params.cutout_center[:, 0] - cut_height // 2
  left = params.cutout_center[:, 1] - cut_width // 2
  rows, columns = jnp.arange(height), jnp.arange(width)
  in_rows = (rows[None] >= top[:, None]) & (rows[None] < (top + cut_height)[:, None])
  in_columns = (columns[None] >= left[:, None]) & (columns[None] < (left + cut_width)[:, None])
  hole = in_rows[:, :, None] & in_columns[:, None, :]
  x = x * (1 - column(params.cutout) * hole[..., None])
  if mean is not None:
    x = x * jnp.asarray(std, jnp.float32) + jnp.asarray(mean, jnp.float32)
  return x


def augment(key: jax.Array, x: jax.Array, strategy: Strategy, *, per_sample: bool,
            mean: Sequence[float] | None = None, std: Sequence[float] | None = None
            ) -> jax.Array:
  """``apply(sample_params(key, ...), x)``: one draw for the batch, or one per sample."""
  params = sample_params(key, strategy, x.shape[1:], count=x.shape[0] if per_sample else 1)
  return apply(params, x, mean=mean, std=std)


# ----------------------------------------------------------------------------------------------
# CutMix (the nets of IDC/Acc-DD train with it, on top of per-sample DSA)


def cutmix(key: jax.Array, x: jax.Array, labels: jax.Array, *, probability: float,
           beta: float = 1.0) -> tuple[jax.Array, jax.Array, jax.Array]:
  """CutMix as IDC's ``train_epoch`` does it: with ``probability``, one box for the batch.

  The box has area fraction ``1 - lam`` (lam ~ Beta(beta, beta)), a uniform centre and is clipped
  to the image; it is pasted from a random permutation of the batch.

  Args:
    key: PRNG key.
    x: f32[B, H, W, C].
    labels: i32[B].
    probability: chance that the batch is mixed at all.
    beta: Beta distribution parameter.

  Returns:
    (x f32[B, H, W, C], other_labels i32[B], weight f32[]) for ``train.make_train_step``'s
    ``mix``: the loss is ``weight * CE(labels) + (1 - weight) * CE(other_labels)``.
  """
  apply_key, lam_key, permute_key, center_key = jax.random.split(key, 4)
  count, height, width, _ = x.shape
  # Beta(1, 1) (the reference's) is U(0, 1); jax's Beta rejection-samples in a while loop, and
  # XLA:GPU copies a loop's condition to the host every iteration, in every training step.
  lam = jax.random.uniform(lam_key) if beta == 1.0 else jax.random.beta(lam_key, beta, beta)
  cut_ratio = jnp.sqrt(1.0 - lam)
  cut_height = jnp.floor(height * cut_ratio).astype(jnp.int32)
  cut_width = jnp.floor(width * cut_ratio).astype(jnp.int32)
  center = jax.random.randint(center_key, (2,), 0, jnp.array([height, width]))
  top = jnp.clip(center[0] - cut_height // 2, 0, height)
  bottom = jnp.clip(center[0] + cut_height // 2, 0, height)
  left = jnp.clip(center[1] - cut_width // 2, 0, width)
  right = jnp.clip(center[1] + cut_width // 2, 0, width)
  rows, columns = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
  box = (rows >= top) & (rows < bottom) & (columns >= left) & (columns < right)
  permutation = jax.random.permutation(permute_key, count)
  mixed = jnp.where(box[None, :, :, None], x[permutation], x)
  weight = 1.0 - ((bottom - top) * (right - left)) / (height * width)
  apply_mix = jax.random.uniform(apply_key) < probability
  return (jnp.where(apply_mix, mixed, x), labels[permutation],
          jnp.where(apply_mix, weight, 1.0).astype(jnp.float32))


def dsa_cutmix(strategy: Strategy, *, mix_probability: float, beta: float = 1.0,
               mean: Sequence[float] | None = None,
               std: Sequence[float] | None = None) -> train_lib.Mix:
  """The ``mix`` of ``train.make_train_step`` for nets trained the IDC way.

  Per-sample DSA (``strategy``; the reference drops cutout when CutMix is on), then
  :func:`cutmix` with ``mix_probability`` (0 disables it).
  """

  def mix(key, x, labels):
    augment_key, mix_key = jax.random.split(key)
    x = augment(augment_key, x, strategy, per_sample=True, mean=mean, std=std)
    if mix_probability <= 0:
      return x, labels, jnp.float32(1.0)
    return cutmix(mix_key, x, labels, probability=mix_probability, beta=beta)

  return mix
