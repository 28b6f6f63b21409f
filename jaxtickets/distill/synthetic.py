"""The synthetic set: initialization, IDC multi-formation (encode/decode), sampling, export.

Stored images are ``f32[K, ipc, H, W, C]`` in [0, 1] pixel space, class-major (class ``k``'s
images are ``images[k]``), so per-class work is a vmap over the leading axis. With a
multi-formation ``factor`` f > 1 (IDC), each stored image holds f x f downsampled images: decoding
cuts it into an f x f grid of ``ceil(H / f)``-pixel crops (padded with 0.5 when H is not a
multiple of f) and upsamples every crop bilinearly back to H x W (PyTorch's ``Upsample(mode=
'bilinear')``, align_corners=False), so ``ipc`` stored images give ``ipc * f^2`` training images.

Initializations (:data:`INITS`): ``noise`` (the reference's ``clamp(randn / 4 + 0.5, 0, 1)``),
``real`` (random real images of the class) and ``mix`` (IDC: each stored image is assembled from
f x f real images of the class, each downsampled by nearest neighbour, PyTorch's default
``interpolate``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxtickets import data as data_lib
from jaxtickets.errors import UserError

INITS = ("noise", "real", "mix")


def class_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
  """i64[K]: examples per class."""
  return np.bincount(np.asarray(labels), minlength=num_classes)[:num_classes]


def _sample_class_images(rng: np.random.Generator, images: np.ndarray, labels: np.ndarray,
                         num_classes: int, count: int) -> np.ndarray:
  """f32[K, count, H, W, C] in [0, 1]: ``count`` distinct random images of every class."""
  chosen = [images[rng.choice(np.flatnonzero(labels == label), count, replace=False)]
            for label in range(num_classes)]
  return np.stack(chosen).astype(np.float32) / 255.0


def _nearest_resize(images: np.ndarray, height: int, width: int) -> np.ndarray:
  """PyTorch's default ``interpolate`` (nearest): source index ``floor(i * in / out)``."""
  rows = np.floor(np.arange(height) * images.shape[-3] / height).astype(int)
  columns = np.floor(np.arange(width) * images.shape[-2] / width).astype(int)
  return images[..., rows, :, :][..., columns, :]


def _part_sizes(size: int, factor: int) -> list[int]:
  """The reference's split of ``size`` pixels into ``factor`` parts (the first ones 1 larger)."""
  base, remainder = divmod(size, factor)
  return [base + 1 if index < remainder else base for index in range(factor)]


def init_images(seed: int, images: np.ndarray, labels: np.ndarray, num_classes: int,
                images_per_class: int, *, factor: int = 1, init: str = "noise") -> np.ndarray:
  """The initial stored images.

  "real" and "mix" draw each class's images at random; IDC's code takes the class's first ones
  in dataset order (``class_sample(c, ipc)``), an arbitrary order that no seed varies.

  Args:
    seed: NumPy seed of the draw.
    images: u8[N, H, W, C] real training images.
    labels: i32[N].
    num_classes: K.
    images_per_class: IPC >= 1; "real" needs IPC real images in every class, "mix" IPC * f^2.
    factor: multi-formation factor f (only "mix" uses it at initialization).
    init: one of :data:`INITS`.

  Returns:
    f32[K, ipc, H, W, C] in [0, 1].
  """
  rng = np.random.default_rng(seed)
  height, width, channels = images.shape[1:]
  shape = (num_classes, images_per_class, height, width, channels)
  if init == "noise":
    return np.clip(rng.standard_normal(shape) / 4 + 0.5, 0.0, 1.0).astype(np.float32)
  if init == "real":
    return _sample_class_images(rng, images, labels, num_classes, images_per_class)
  parts = _sample_class_images(rng, images, labels, num_classes, images_per_class * factor ** 2)
  stored = np.empty(shape, np.float32)
  group, top = 0, 0
  for part_height in _part_sizes(height, factor):
    left = 0
    for part_width in _part_sizes(width, factor):
      source = parts[:, group * images_per_class:(group + 1) * images_per_class]
      stored[:, :, top:top + part_height, left:left + part_width] = _nearest_resize(
          source, part_height, part_width)
      left += part_width
      group += 1
    top += part_height
  return stored


def check_factor(factor: int, image_shape: tuple[int, ...]) -> None:
  """Raises UserError unless :func:`decode` can decode images of ``image_shape`` (H, W, C) with
  ``factor``: IDC's crops are square, of the height's size, so f > 1 needs H == W (otherwise
  the decoded crops would be silently wrong)."""
  height, width = image_shape[:2]
  if factor > 1 and height != width:
    raise UserError(f"multi-formation (factor {factor}) decodes square images; got "
                    f"{height}x{width}")


def decode(images: jax.Array, factor: int) -> jax.Array:
  """IDC's uniform multi-formation: every stored image -> f x f upsampled crops.

  Args:
    images: f32[N, H, W, C] stored images.
    factor: f >= 1 (1 returns ``images``; f > 1 needs H == W, see :func:`check_factor`).

  Returns:
    f32[N * f^2, H, W, C]: crop (i, j) of image n at index ``(i * f + j) * N + n``, as the
    reference concatenates them. Differentiable.
  """
  check_factor(factor, images.shape[1:])
  if factor == 1:
    return images
  count, height, width, channels = images.shape
  crop = math.ceil(height / factor)
  padded = jnp.pad(images, ((0, 0), (0, crop * factor - height), (0, crop * factor - width),
                            (0, 0)), constant_values=0.5)
  crops = [padded[:, i * crop:(i + 1) * crop, j * crop:(j + 1) * crop]
           for i in range(factor) for j in range(factor)]
  stacked = jnp.concatenate(crops)
  return jax.image.resize(stacked, (stacked.shape[0], height, width, channels), "bilinear")


def decoded_size(images_per_class: int, factor: int, max_size: int | None = None) -> int:
  """Training images per class after decoding, capped at ``max_size``."""
  decoded = images_per_class * factor ** 2
  return decoded if max_size is None else min(decoded, max_size)


def sample_class(key: jax.Array, class_images: jax.Array, factor: int,
                 max_size: int) -> jax.Array:
  """One class's decoded images for a matching step, randomly subsampled to ``max_size``.

  Args:
    key: PRNG key of the subsample (unused when nothing is dropped).
    class_images: f32[ipc, H, W, C] stored images of the class.
    factor: multi-formation factor.
    max_size: at most this many decoded images (the reference's ``batch_syn_max``, 128).

  Returns:
    f32[min(ipc * f^2, max_size), H, W, C], differentiable in ``class_images``.
  """
  decoded = decode(class_images, factor)
  size = decoded_size(class_images.shape[0], factor, max_size)
  if size == decoded.shape[0]:
    return decoded
  return decoded[jax.random.permutation(key, decoded.shape[0])[:size]]


def clamp(images: jax.Array) -> jax.Array:
  """Stored images clipped to the [0, 1] pixel range."""
  return jnp.clip(images, 0.0, 1.0)


def to_uint8(images: np.ndarray | jax.Array) -> np.ndarray:
  """Pixels in [0, 1] (clipped) -> u8, rounded."""
  return np.round(np.clip(np.asarray(images, np.float32), 0.0, 1.0) * 255).astype(np.uint8)


def decoded_split(images: jax.Array, factor: int) -> data_lib.Split:
  """The training set a distilled set stands for: every class decoded, quantized to 8 bits.

  Args:
    images: f32[K, ipc, H, W, C] stored images.
    factor: multi-formation factor.

  Returns:
    Split with u8[K * ipc * f^2, H, W, C] images and their i32 labels (class-major).
  """
  num_classes = images.shape[0]
  decoded = jax.vmap(lambda class_images: decode(class_images, factor))(jnp.asarray(images))
  per_class = decoded.shape[1]
  labels = np.repeat(np.arange(num_classes, dtype=np.int32), per_class)
  return data_lib.Split(to_uint8(decoded.reshape(-1, *decoded.shape[2:])), labels)


def random_real_split(seed: int, images: np.ndarray, labels: np.ndarray, num_classes: int,
                      images_per_class: int) -> data_lib.Split:
  """The baseline of the same size: ``images_per_class`` random real images per class (every
  class must have that many)."""
  rng = np.random.default_rng(seed)
  index = np.concatenate([rng.choice(np.flatnonzero(labels == label), images_per_class,
                                     replace=False) for label in range(num_classes)])
  return data_lib.Split(images[index], labels[index].astype(np.int32))
