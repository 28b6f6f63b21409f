"""Datasets as uint8 arrays, and the on-device input pipeline that batches and augments them.

Loading happens once, on the host, into a :class:`Dataset` of uint8 NHWC images and int32 labels.
Everything after that is a pure ``jnp`` function of a PRNG key and a step number, so a population
of models can ``vmap`` the whole pipeline with one key per member, inside ``jit``:

    ds = load_dataset("digits", image_size=32)
    images, labels = jnp.asarray(ds.train.images), jnp.asarray(ds.train.labels)
    x, y = get_batch(key, step, images, labels, batch_size=128)
    x = normalize(to_unit(random_crop_flip(augment_key, x)), ds.mean, ds.std)

Sources: scikit-learn's bundled ``digits``; the TFDS datasets in :data:`TFDS_NAMES` (read from an
``array_record`` preparation, which needs no TensorFlow); and ``npz:PATH`` files in either the
MedMNIST layout or the JPEG-packed CIFAR-10 layout (see :func:`load_dataset`).
"""

from __future__ import annotations

import dataclasses
import io
import os
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from jaxtickets.errors import UserError

TFDS_NAMES = ("cifar10", "cifar100", "svhn_cropped", "mnist", "fashion_mnist")
KNOWN_NAMES = ("digits", *TFDS_NAMES, "npz:PATH")

DIGITS_IMAGE_SIZES = (8, 16, 32)
# Test share of the fixed digits split; the seed makes the split the same on every machine.
_DIGITS_TEST_FRACTION = 0.2
_DIGITS_SPLIT_SEED = 0

# The statistics published for CIFAR (RST's reference normalizes CIFAR-10 with these, to three
# decimals, and CIFAR-100 with CIFAR-10's).
_CANONICAL_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
# Named normalizations (``load_dataset(normalization=...)``): "dataset" uses the dataset's own
# statistics, "cifar10" CIFAR-10's published ones. "cifar10_common" is CIFAR-10's mean with the
# per-channel std that early PyTorch CIFAR code spread (the true std is ~0.25): DC/DSA/DM, IDC,
# Acc-DD and AWS normalize CIFAR-10 and CIFAR-100 alike with it, and inputs' scale matters there
# beyond the first layer (DSA's brightness range and the normalized-space image learning rates
# are in its units).
NORMALIZATIONS = {
    "dataset": None,
    "cifar10": _CANONICAL_STATS["cifar10"],
    "cifar10_common": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
}

# Where the shared (read-only, never copied) data sets live: this environment variable, else
# ``../shared/data`` beside the source checkout (``make`` installs the checkout editable).
SHARED_DATA_ENV = "JAXTICKETS_SHARED_DATA"
_DEFAULT_SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"

# Records fetched per TFDS read call: amortizes the call overhead, bounds the temporary list.
_RECORDS_PER_READ = 4096


@dataclasses.dataclass(frozen=True)
class Split:
  """One split of a dataset, in host memory.

  Attributes:
    images: u8[N, H, W, C] pixels.
    labels: i32[N] class indices.
  """

  images: np.ndarray
  labels: np.ndarray


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A labelled image dataset with its normalization statistics.

  Attributes:
    name: short name ("digits", "cifar10", or the stem of an npz file).
    train: the training split.
    test: the test split.
    val: the validation split, or None when the source has none (see :func:`with_validation`).
    num_classes: number of classes; labels lie in [0, num_classes).
    mean: per-channel mean of pixels scaled to [0, 1], length C: of the training pixels, or the
      fixed values of a named normalization / TFDS's CIFAR (see :func:`load_dataset`).
    std: the per-channel standard deviation, likewise.
  """

  name: str
  train: Split
  test: Split
  val: Split | None
  num_classes: int
  mean: tuple[float, ...]
  std: tuple[float, ...]

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(H, W, C) of every image."""
    return tuple(self.train.images.shape[1:])


# ----------------------------------------------------------------------------------------------
# Loading


def shared_data_dir() -> pathlib.Path:
  """``$JAXTICKETS_SHARED_DATA``, else ``../shared/data`` beside the checkout (may not exist)."""
  return pathlib.Path(os.environ.get(SHARED_DATA_ENV, _DEFAULT_SHARED_DATA))


def load_dataset(
    name: str, *, data_dir: str | None = None, image_size: int | None = None,
    normalization: str = "dataset"
) -> Dataset:
  """Loads a dataset into host memory as uint8 images and int32 labels.

  Sources by ``name``:

  * ``"digits"``: scikit-learn's 1,797 8x8 grayscale digits (values 0..16 mapped to 0..255), split
    80/20 into train/test, stratified by class with a fixed seed (the same split everywhere).
  * ``"cifar10"``, ``"cifar100"``, ``"svhn_cropped"``, ``"mnist"``, ``"fashion_mnist"``: TFDS
    datasets, read from ``data_dir``, else ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``.
    They must have been prepared in the ``array_record`` format, which TFDS reads with NumPy and
    Pillow alone (the default ``tfrecord`` format needs TensorFlow to read). Prepare once with::

        pip install '.[tfds-prepare]'
        tfds build cifar10 --data_dir DIR --file_format=array_record

    A ``tfrecord`` preparation converts in place with
    ``tfds convert_format --dataset_dir DIR/cifar10 --out_file_format=array_record``.
  * ``"npz:PATH"``: a NumPy ``.npz`` file (name = file stem), in one of two layouts:

    - MedMNIST: ``{train,val,test}_images`` u8[N, H, W] or u8[N, H, W, C] and
      ``{train,val,test}_labels`` of shape [N] or [N, 1]; the ``val_*`` pair is optional.
      num_classes = largest label + 1.
    - JPEG-packed: ``{train,test}_jpeg`` u8[bytes], ``{train,test}_offsets`` i64[N + 1] (image i
      is ``jpeg[offsets[i]:offsets[i + 1]]``), ``{train,test}_labels`` [N] and optional
      ``classes`` str[K] (num_classes = K, else largest label + 1). Decoded to RGB with Pillow.

  Normalization statistics (``normalization="dataset"``) are the published ones for CIFAR-10/100
  from TFDS and are computed from the training pixels for every other source; another name of
  :data:`NORMALIZATIONS` replaces them.

  Args:
    name: a source name as above.
    data_dir: TFDS data directory (TFDS sources only).
    image_size: resize images to image_size x image_size (bilinear), a positive int; for digits
      one of :data:`DIGITS_IMAGE_SIZES`. None keeps the source's size.
    normalization: a name of :data:`NORMALIZATIONS`; fixed statistics need images with as many
      channels as they have.

  Returns:
    The dataset; ``val`` is None unless the source has a validation split.

  Raises:
    UserError: unknown name or normalization, unprepared TFDS data, a malformed npz file, or
      fixed statistics of another channel count (they would broadcast).
  """
  if normalization not in NORMALIZATIONS:
    raise UserError(f"unknown normalization {normalization!r}; known: "
                    f"{', '.join(NORMALIZATIONS)}")
  canonical_stats = None  # Published statistics, for TFDS's CIFAR (not an npz of that name).
  if name == "digits":
    splits, num_classes = _load_digits()
  elif name in TFDS_NAMES:
    splits, num_classes = _load_tfds(name, data_dir)
    canonical_stats = _CANONICAL_STATS.get(name)
  elif name.startswith("npz:"):
    path = pathlib.Path(name.removeprefix("npz:"))
    splits, num_classes = _load_npz(path)
    name = path.stem
  else:
    raise UserError(f"unknown dataset {name!r}; known: {', '.join(KNOWN_NAMES)}")

  if image_size is not None:
    splits = {key: Split(_resize(split.images, image_size), split.labels)
              for key, split in splits.items()}
  if NORMALIZATIONS[normalization] is not None:
    mean, std = NORMALIZATIONS[normalization]
    channels = splits["train"].images.shape[-1]
    if len(mean) != channels:
      raise UserError(f"normalization {normalization!r} has {len(mean)} channels; {name} images "
                      f"have {channels}")
  elif canonical_stats is not None:
    mean, std = canonical_stats
  else:
    mean, std = _channel_stats(splits["train"].images)
  return Dataset(name=name, train=splits["train"], test=splits["test"], val=splits.get("val"),
                 num_classes=num_classes, mean=mean, std=std)


def _load_digits() -> tuple[dict[str, Split], int]:
  """The digits train/test splits (u8[N, 8, 8, 1]) and the class count."""
  from sklearn.datasets import load_digits  # noqa: PLC0415  (scikit-learn imports slowly)

  bunch = load_digits()
  images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  labels = bunch.target.astype(np.int32)
  test_index = _stratified_sample(labels, _DIGITS_TEST_FRACTION, seed=_DIGITS_SPLIT_SEED)
  train_index = np.setdiff1d(np.arange(len(labels)), test_index)
  splits = {"train": Split(images[train_index], labels[train_index]),
            "test": Split(images[test_index], labels[test_index])}
  return splits, int(labels.max()) + 1


def _load_tfds(name: str, data_dir: str | None) -> tuple[dict[str, Split], int]:
  """The train/test splits of a TFDS dataset prepared as array_record, and its class count."""
  # Imported here: TFDS is only needed for these sources and costs import time for all others.
  import tensorflow_datasets as tfds  # noqa: PLC0415

  # A quoted or config-given "~/..." reaches here unexpanded by any shell.
  root = os.path.expanduser(data_dir or os.environ.get("TFDS_DATA_DIR")
                            or "~/tensorflow_datasets")
  prepare = (f"pip install '.[tfds-prepare]' && tfds build {name} --data_dir {root} "
             "--file_format=array_record")
  not_prepared = UserError(f"tfds dataset {name!r} is not prepared in {root}; prepare it with: "
                           f"{prepare}")
  # Checked before asking TFDS, which logs a warning about the missing folder first.
  if not os.path.isdir(os.path.join(root, name)):
    raise not_prepared
  try:
    builder = tfds.builder(name, data_dir=root)
    if not builder.is_prepared():
      raise not_prepared
    try:
      sources = builder.as_data_source()
    except NotImplementedError:
      raise UserError(
          f"tfds dataset {name!r} in {root} is stored as {builder.info.file_format.value}, which "
          f"needs TensorFlow to read; convert it with: tfds convert_format --dataset_dir "
          f"{os.path.join(root, name)} --out_file_format=array_record") from None
    image_key, label_key = builder.info.supervised_keys
    image_shape = builder.info.features[image_key].shape
    splits = {split: _read_records(sources[split], image_key, label_key, image_shape)
              for split in ("train", "test")}
    num_classes = builder.info.features[label_key].num_classes
  except UserError:
    raise
  except Exception as error:  # TFDS raises many types; users need one line, not a traceback.
    reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
    raise UserError(f"cannot read tfds dataset {name!r} from {root}: {type(error).__name__}: "
                    f"{reason} (prepare it with: {prepare})") from error
  return splits, num_classes


def _read_records(source: Sequence[dict], image_key: str, label_key: str,
                  image_shape: tuple[int, ...]) -> Split:
  """Reads every record of a TFDS random-access source into a Split (u8[N, *image_shape])."""
  count = len(source)
  images = np.empty((count, *image_shape), np.uint8)
  labels = np.empty((count,), np.int32)
  for start in range(0, count, _RECORDS_PER_READ):
    for index, record in enumerate(
        source.__getitems__(range(start, min(start + _RECORDS_PER_READ, count))), start):
      images[index] = record[image_key]
      labels[index] = record[label_key]
  return Split(images, labels)


def _load_npz(path: pathlib.Path) -> tuple[dict[str, Split], int]:
  """The splits and class count of an npz file in the MedMNIST or JPEG-packed layout."""
  if not path.is_file():
    raise UserError(f"npz file not found: {path}")
  try:
    with np.load(path, allow_pickle=False) as archive:
      arrays = {key: archive[key] for key in archive.files}
  except Exception as error:  # Zip, pickle and format errors all mean "not a usable npz".
    raise UserError(f"{path}: not a readable .npz file ({type(error).__name__}: "
                    f"{str(error).splitlines()[0] if str(error) else ''})") from error

  if "train_jpeg" in arrays:
    split_names, read_split = ("train", "test"), _jpeg_split
  else:
    split_names = ("train", "val", "test") if "val_images" in arrays or "val_labels" in arrays \
        else ("train", "test")
    read_split = _medmnist_split
  splits = {split: read_split(path, arrays, split) for split in split_names}
  empty = [split for split, data in splits.items() if not len(data.labels)]
  if empty:
    raise UserError(f"{path}: the {empty[0]} split has no images")
  shapes = {split: data.images.shape[1:] for split, data in splits.items()}
  if len(set(shapes.values())) > 1:
    raise UserError(f"{path}: the splits' images differ in shape "
                    f"({', '.join(f'{split} {shape}' for split, shape in shapes.items())})")

  max_label = max(int(split.labels.max(initial=-1)) for split in splits.values())
  if "classes" in arrays:
    num_classes = len(arrays["classes"])
    if max_label >= num_classes:
      raise UserError(f"{path}: a label is {max_label} but 'classes' names only {num_classes}")
  else:
    num_classes = max_label + 1
  return splits, num_classes


def _medmnist_split(path: pathlib.Path, arrays: dict[str, np.ndarray], split: str) -> Split:
  """The `split` of a MedMNIST-layout archive, with u8[N, H, W] images given a channel axis."""
  images = _require(path, arrays, f"{split}_images")
  if images.dtype != np.uint8:
    raise UserError(f"{path}: array '{split}_images' has dtype {images.dtype}; expected uint8")
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4:
    raise UserError(f"{path}: array '{split}_images' has shape {images.shape}; expected "
                    "[N, H, W] or [N, H, W, C]")
  labels = _labels(path, arrays, split, len(images), f"{split}_images")
  return Split(np.ascontiguousarray(images), labels)


def _jpeg_split(path: pathlib.Path, arrays: dict[str, np.ndarray], split: str) -> Split:
  """Decodes the `split` of a JPEG-packed archive into u8[N, H, W, 3].

  One thread: a small JPEG decodes faster than a thread pool hands it over (GIL contention).
  """
  data = _require(path, arrays, f"{split}_jpeg")
  offsets = _require(path, arrays, f"{split}_offsets")
  if data.dtype != np.uint8 or data.ndim != 1:
    raise UserError(f"{path}: array '{split}_jpeg' has dtype {data.dtype} and shape {data.shape}; "
                    "expected 1-D uint8 bytes")
  if offsets.ndim != 1 or not np.issubdtype(offsets.dtype, np.integer) or len(offsets) < 2:
    raise UserError(f"{path}: array '{split}_offsets' has dtype {offsets.dtype} and shape "
                    f"{offsets.shape}; expected 1-D integers [N + 1]")
  if offsets[0] < 0 or offsets[-1] > len(data) or np.any(np.diff(offsets) <= 0):
    raise UserError(f"{path}: array '{split}_offsets' is not increasing within "
                    f"[0, {len(data)}] (the size of '{split}_jpeg')")
  count = len(offsets) - 1
  labels = _labels(path, arrays, split, count, f"{split}_offsets")

  encoded = data.tobytes()
  images = None
  for index in range(count):
    try:
      with Image.open(io.BytesIO(encoded[offsets[index]:offsets[index + 1]]),
                      formats=["JPEG"]) as image:
        pixels = np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    except Exception as error:  # Pillow raises OSError, ValueError, SyntaxError for bad bytes.
      raise UserError(f"{path}: image {index} of '{split}_jpeg' is not a decodable JPEG "
                      f"({type(error).__name__})") from error
    if images is None:
      images = np.empty((count, *pixels.shape), np.uint8)
    if pixels.shape != images.shape[1:]:
      raise UserError(f"{path}: image {index} of '{split}_jpeg' has shape {pixels.shape}, "
                      f"image 0 has {images.shape[1:]}")
    images[index] = pixels
  return Split(images, labels)


def _require(path: pathlib.Path, arrays: dict[str, np.ndarray], key: str) -> np.ndarray:
  """arrays[key], or a UserError naming the file and the missing array."""
  if key not in arrays:
    raise UserError(f"{path}: missing array '{key}' (has: {', '.join(sorted(arrays))})")
  return arrays[key]


def _labels(path: pathlib.Path, arrays: dict[str, np.ndarray], split: str, count: int,
            images_key: str) -> np.ndarray:
  """The `split`'s labels as i32[count], accepting [N] or MedMNIST's [N, 1].

  Args:
    path: the npz file, for messages.
    arrays: the file's arrays.
    split: "train", "val" or "test".
    count: number of images in the split.
    images_key: the array that gave `count`, for messages.
  """
  key = f"{split}_labels"
  labels = _require(path, arrays, key)
  if not np.issubdtype(labels.dtype, np.integer):
    raise UserError(f"{path}: array '{key}' has dtype {labels.dtype}; expected integers")
  if labels.ndim == 2 and labels.shape[1] == 1:
    labels = labels[:, 0]
  if labels.ndim != 1:
    raise UserError(f"{path}: array '{key}' has shape {labels.shape}; expected [N] or [N, 1]")
  if len(labels) != count:
    raise UserError(f"{path}: array '{key}' has {len(labels)} labels but '{images_key}' "
                    f"holds {count} images")
  if count and labels.min() < 0:
    raise UserError(f"{path}: array '{key}' has a negative label {labels.min()}")
  return labels.astype(np.int32)


def _resize(images: np.ndarray, image_size: int) -> np.ndarray:
  """Bilinear resize of u8[N, H, W, C] to u8[N, image_size, image_size, C]."""
  count, height, width, channels = images.shape
  if (height, width) == (image_size, image_size):
    return images
  resized = np.empty((count, image_size, image_size, channels), np.uint8)
  for index in range(count):
    # Pillow takes one channel as [H, W]; [H, W, 3] resizes each channel alike.
    image = Image.fromarray(images[index, ..., 0] if channels == 1 else images[index])
    resized[index] = np.asarray(
        image.resize((image_size, image_size), Image.Resampling.BILINEAR)
    ).reshape(image_size, image_size, channels)
  return resized


def _channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel mean and std of u8[N, H, W, C] pixels scaled to [0, 1].

  A 256-bin histogram per channel gives exact statistics without a float copy of the images.
  """
  levels = np.arange(256) / 255.0
  means, stds = [], []
  for channel in range(images.shape[-1]):
    counts = np.bincount(images[..., channel].ravel(), minlength=256)
    probabilities = counts / counts.sum()
    mean = float(probabilities @ levels)
    means.append(mean)
    stds.append(float(np.sqrt(probabilities @ (levels - mean) ** 2)))
  return tuple(means), tuple(stds)


# ----------------------------------------------------------------------------------------------
# Splitting


def _stratified_sample(labels: np.ndarray, fraction: float, *, seed: int,
                       leave_per_class: int = 0) -> np.ndarray:
  """Sorted indices of a random `fraction` of each class (at least one per class).

  Args:
    labels: i32[N].
    fraction: share of each class to take.
    seed: numpy seed of the draw.
    leave_per_class: take at most (class size - leave_per_class) of each class, so the rest
      keeps every class.

  Returns:
    i64[M] sorted indices into labels.
  """
  rng = np.random.default_rng(seed)
  taken = []
  for label in np.unique(labels):
    members = np.flatnonzero(labels == label)
    count = min(max(1, round(fraction * len(members))), len(members) - leave_per_class)
    taken.append(rng.choice(members, size=max(count, 0), replace=False))
  return np.sort(np.concatenate([np.zeros(0, np.int64), *taken]))


def with_validation(ds: Dataset, fraction: float, *, seed: int = 0) -> Dataset:
  """Carves a stratified validation split out of the training split.

  Each class gives round(fraction * class size) of its training examples (at least one, and never
  its last one) to the validation split; the rest stay in train, in their original order.
  Normalization statistics are left as they are. A dataset that already has a validation split
  is returned unchanged.

  Args:
    ds: the dataset.
    fraction: share of each class moved to validation, in (0, 1).
    seed: seed of the draw; the same seed gives the same split.

  Returns:
    The dataset with ``val`` set and ``train`` reduced accordingly.
  """
  if ds.val is not None:
    return ds
  val_index = _stratified_sample(ds.train.labels, fraction, seed=seed, leave_per_class=1)
  train_index = np.setdiff1d(np.arange(len(ds.train.labels)), val_index)
  return dataclasses.replace(ds, train=_take(ds.train, train_index), val=_take(ds.train, val_index))


def subsample(split: Split, fraction: float, *, seed: int = 0) -> Split:
  """A stratified random subset of a split, for reduced-data experiments.

  Args:
    split: the split.
    fraction: share of each class to keep (at least one example per class), in (0, 1].
    seed: seed of the draw; the same seed gives the same subset.

  Returns:
    The subset, in the split's original order.
  """
  return _take(split, _stratified_sample(split.labels, fraction, seed=seed))


def _take(split: Split, index: np.ndarray) -> Split:
  return Split(split.images[index], split.labels[index])


# ----------------------------------------------------------------------------------------------
# On-device pipeline (pure; jit- and vmap-safe)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Full batches per epoch (the remainder is dropped).

  Raises:
    UserError: batch_size <= 0 or larger than num_examples (a split smaller than one batch
      would make every batch index a division by zero).
  """
  if not 0 < batch_size <= num_examples:
    raise UserError(f"batch_size={batch_size} must be in [1, {num_examples}] (the split size)")
  return num_examples // batch_size


def _mix32(x: jax.Array) -> jax.Array:
  """A 32-bit integer hash with full avalanche (Wellons' "lowbias32"); ``x: u32[...]``."""
  x = (x ^ (x >> 16)) * jnp.uint32(0x7FEB352D)
  x = (x ^ (x >> 15)) * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


# Rounds of the swap-or-not shuffle. A round sends a point to a uniformly random place with
# probability 1/2 and treats two points differently with probability 1/2, so after R rounds two
# positions' images are still a constant apart (or otherwise tied) with probability ~2**-R: 24
# make that ~6e-8 per pair and pass the uniformity tests of tests/test_data.py on tiny splits.
# The 6 lg N rounds that prove the whole permutation indistinguishable from a uniform one against
# an adversary (Hoang, Morris, Rogaway, CRYPTO 2012) would be 96 on CIFAR-10, for no visible gain
# in training and 4x the hashing in every step.
_SHUFFLE_ROUNDS = 24


def shuffled_positions(key: jax.Array, positions: jax.Array, num_examples: int) -> jax.Array:
  """Entries ``positions`` of a pseudo-random permutation of ``[0, num_examples)`` chosen by key.

  The swap-or-not shuffle: round r pairs x with ``k_r - x (mod N)`` for a random ``k_r`` and swaps
  the pair when a keyed hash of the pair's larger member says so, which makes each round an
  involution and the whole a bijection of exactly ``[0, N)``. Unlike a Feistel network on a
  power-of-two domain it needs no cycle-walking, so no loop whose length depends on data: XLA:GPU
  stops the host at every iteration of such a loop (and at every ``lax.cond``) to read the
  condition, and a batch is drawn in every training step (``jaxtickets.compiled``). Cost is
  O(len(positions)), not the O(N log N) of materializing ``jax.random.permutation``, which
  matters when every member of a population draws a batch.

  Args:
    key: PRNG key choosing the permutation.
    positions: i32[B] in ``[0, num_examples)``.
    num_examples: N (static).

  Returns:
    i32[B], distinct where the positions are distinct.
  """
  n = jnp.uint32(num_examples)
  # Two words per round: the pair sum (bias of the modulo < N / 2**32) and the swap hash's key.
  pair_sums, swap_keys = jax.random.bits(key, (2, _SHUFFLE_ROUNDS), jnp.uint32)
  pair_sums = pair_sums % n
  x = positions.astype(jnp.uint32)
  # Unrolled: the rounds fuse into one elementwise kernel.
  for pair_sum, hash_key in zip(pair_sums, swap_keys):
    partner = jnp.where(x <= pair_sum, pair_sum - x, pair_sum + n - x)
    swap = (_mix32(jnp.maximum(x, partner) ^ hash_key) >> 31) == 1
    x = jnp.where(swap, partner, x)
  return x.astype(jnp.int32)


def batch_indices(key: jax.Array, step: int | jax.Array, num_examples: int,
                  batch_size: int) -> jax.Array:
  """Example indices of batch `step`: each epoch is a fresh permutation, visited in order.

  Every example appears at most once per epoch (exactly once when batch_size divides
  num_examples). The order depends only on (key, epoch), so a run resumes exactly from a step.
  Only the batch's B entries of the epoch's permutation are computed
  (:func:`shuffled_positions`).

  Args:
    key: PRNG key of this model's data order.
    step: global step (may be traced).
    num_examples: N, the split size (static).
    batch_size: B (static).

  Returns:
    i32[B] indices into the split.
  """
  per_epoch = steps_per_epoch(num_examples, batch_size)
  epoch, step_in_epoch = jnp.divmod(step, per_epoch)
  positions = step_in_epoch * batch_size + jnp.arange(batch_size)
  return shuffled_positions(jax.random.fold_in(key, epoch), positions, num_examples)


def get_batch(key: jax.Array, step: int | jax.Array, images: jax.Array, labels: jax.Array,
              batch_size: int) -> tuple[jax.Array, jax.Array]:
  """Batch `step` of a whole split held on device (order as in :func:`batch_indices`).

  Args:
    key: PRNG key of this model's data order.
    step: global step (may be traced).
    images: u8[N, H, W, C] the split's images.
    labels: i32[N] the split's labels.
    batch_size: B (static).

  Returns:
    (u8[B, H, W, C] images, i32[B] labels).
  """
  index = batch_indices(key, step, images.shape[0], batch_size)
  return jnp.take(images, index, axis=0), jnp.take(labels, index, axis=0)


def random_crop_flip(key: jax.Array, images_u8: jax.Array, *, pad: int = 4) -> jax.Array:
  """Standard CIFAR augmentation: random crop of the zero-padded image, and a random mirror.

  Each image is padded by `pad` zeros on every side, cropped back to H x W at a uniform offset in
  [0, 2 * pad] per axis, and mirrored left-right with probability 1/2, independently per image.

  Args:
    key: PRNG key.
    images_u8: u8[B, H, W, C].
    pad: zero padding per side (static); 0 disables the crop.

  Returns:
    u8[B, H, W, C] augmented images.
  """
  count, height, width, channels = images_u8.shape
  crop_key, flip_key = jax.random.split(key)
  offsets = jax.random.randint(crop_key, (count, 2), 0, 2 * pad + 1)
  mirror = jax.random.bernoulli(flip_key, 0.5, (count,))
  padded = jnp.pad(images_u8, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

  def crop_and_flip(image: jax.Array, offset: jax.Array, flip: jax.Array) -> jax.Array:
    crop = jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (height, width, channels))
    return jnp.where(flip, crop[:, ::-1], crop)

  return jax.vmap(crop_and_flip)(padded, offsets, mirror)


def to_unit(images_u8: jax.Array) -> jax.Array:
  """u8[..., C] pixels -> f32[..., C] in [0, 1]."""
  return images_u8.astype(jnp.float32) / 255.0


def normalize(x_unit: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
  """(x - mean) / std per channel: f32[..., C] in [0, 1] -> f32[..., C]."""
  return (x_unit - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def pad_to_batches(images: jax.Array | np.ndarray, labels: jax.Array | np.ndarray,
                   batch_size: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Pads a whole split to full batches, for exact evaluation with one compiled shape.

  Args:
    images: u8[N, H, W, C].
    labels: i32[N].
    batch_size: B >= 1.

  Returns:
    (u8[nb, B, H, W, C] images, i32[nb, B] labels, bool[nb, B] valid) with nb = ceil(N / B);
    padding entries are zeros and have valid False.
  """
  count = images.shape[0]
  num_batches = -(-count // batch_size)
  padding = num_batches * batch_size - count
  images = jnp.pad(jnp.asarray(images), ((0, padding),) + ((0, 0),) * (images.ndim - 1))
  labels = jnp.pad(jnp.asarray(labels), (0, padding))
  valid = jnp.arange(num_batches * batch_size) < count
  return (images.reshape(num_batches, batch_size, *images.shape[1:]),
          labels.reshape(num_batches, batch_size), valid.reshape(num_batches, batch_size))


def map_batches(fn: Callable[..., Any], images: jax.Array | np.ndarray,
                labels: jax.Array | np.ndarray, batch_size: int,
                key: jax.Array | None = None) -> Any:
  """``fn`` over a whole split in padded batches (:func:`pad_to_batches`), run by ``lax.map``,
  so a split of any size compiles once.

  Args:
    fn: ``(images u8[B, H, W, C], labels i32[B], valid bool[B], key) -> outputs`` (a pytree).
    images: u8[N, H, W, C].
    labels: i32[N].
    batch_size: B.
    key: PRNG key; batch b gets ``jax.random.split(key, nb)[b]`` (None: ``fn`` gets None).

  Returns:
    ``fn``'s outputs stacked on a leading axis of nb = ceil(N / B) batches.
  """
  batches, batch_labels, valid = pad_to_batches(images, labels, batch_size)
  keys = None if key is None else jax.random.split(key, batches.shape[0])
  return jax.lax.map(lambda inputs: fn(*inputs), (batches, batch_labels, valid, keys))
