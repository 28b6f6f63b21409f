"""Tests for jaxtickets.data: loaders on real data, stratified splitting, the on-device pipeline."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtickets import data

from assertions import assert_one_line_user_error, host_waits_of


def _examples(split: data.Split) -> collections.Counter:
  """The multiset of (image bytes, label) pairs of a split, to compare splits by content."""
  return collections.Counter(
      (image.tobytes(), int(label)) for image, label in zip(split.images, split.labels))


# ----------------------------------------------------------------------------------------------
# digits


def test_digits_shapes_dtypes_ranges_and_stats(digits):
  assert digits.name == "digits"
  assert digits.num_classes == 10
  assert digits.val is None
  assert digits.image_shape == (8, 8, 1)
  assert len(digits.train.images) + len(digits.test.images) == 1797
  assert abs(len(digits.test.images) - 0.2 * 1797) <= 10
  for split in (digits.train, digits.test):
    assert split.images.dtype == np.uint8 and split.labels.dtype == np.int32
    assert len(split.images) == len(split.labels)
    assert split.images.min() == 0 and split.images.max() == 255
    assert set(np.unique(split.labels)) == set(range(10))
  pixels = digits.train.images / 255.0
  np.testing.assert_allclose(digits.mean, [pixels.mean()], rtol=1e-6)
  np.testing.assert_allclose(digits.std, [pixels.std()], rtol=1e-6)


def test_digits_split_is_a_deterministic_stratified_partition(digits):
  from sklearn.datasets import load_digits

  again = data.load_dataset("digits")
  np.testing.assert_array_equal(again.train.images, digits.train.images)
  np.testing.assert_array_equal(again.test.labels, digits.test.labels)

  bunch = load_digits()
  everything = data.Split(np.round(bunch.images * 255 / 16).astype(np.uint8)[..., None],
                          bunch.target.astype(np.int32))
  assert _examples(digits.train) + _examples(digits.test) == _examples(everything)
  test_share = np.bincount(digits.test.labels) / np.bincount(everything.labels)
  np.testing.assert_allclose(test_share, 0.2, atol=0.02)


@pytest.mark.parametrize("image_size", [16, 32])
def test_digits_upsampling_keeps_content(digits, image_size):
  big = data.load_dataset("digits", image_size=image_size)
  assert big.image_shape == (image_size, image_size, 1)
  assert big.train.images.dtype == np.uint8
  np.testing.assert_array_equal(big.train.labels, digits.train.labels)
  factor = image_size // 8
  pooled = big.train.images.reshape(-1, 8, factor, 8, factor).mean(axis=(2, 4))
  assert np.corrcoef(pooled.ravel(), digits.train.images.ravel())[0, 1] > 0.95
  assert abs(big.mean[0] - digits.mean[0]) < 0.01


def test_unknown_dataset_is_a_one_line_error():
  assert_one_line_user_error(lambda: data.load_dataset("imagenet"), "imagenet", "cifar10",
                              "npz:PATH")


# ----------------------------------------------------------------------------------------------
# with_validation / subsample


def test_with_validation_is_stratified_disjoint_and_seeded(digits):
  carved = data.with_validation(digits, 0.1, seed=1)
  assert _examples(carved.train) + _examples(carved.val) == _examples(digits.train)
  val_share = np.bincount(carved.val.labels) / np.bincount(digits.train.labels)
  np.testing.assert_allclose(val_share, 0.1, atol=0.01)
  assert carved.test is digits.test and carved.mean == digits.mean

  same = data.with_validation(digits, 0.1, seed=1)
  np.testing.assert_array_equal(same.val.images, carved.val.images)
  other = data.with_validation(digits, 0.1, seed=2)
  assert _examples(other.val) != _examples(carved.val)
  assert data.with_validation(carved, 0.5) is carved  # An existing val split is kept.


def test_subsample_is_a_stratified_subset(digits):
  small = data.subsample(digits.train, 0.25, seed=3)
  full_counts = np.bincount(digits.train.labels)
  np.testing.assert_array_equal(np.bincount(small.labels), np.round(0.25 * full_counts))
  assert not _examples(small) - _examples(digits.train)
  tiny = data.subsample(digits.train, 1e-4)
  np.testing.assert_array_equal(np.bincount(tiny.labels), np.ones(10))  # One per class.
  assert len(data.subsample(digits.train, 1.0).labels) == len(digits.train.labels)


# ----------------------------------------------------------------------------------------------
# npz files


def test_npz_medmnist_files(shared_data):
  breast = data.load_dataset(f"npz:{shared_data / 'medmnist' / 'breastmnist.npz'}")
  assert breast.name == "breastmnist" and breast.num_classes == 2
  assert breast.image_shape == (28, 28, 1)
  assert [len(s.labels) for s in (breast.train, breast.val, breast.test)] == [546, 78, 156]
  np.testing.assert_array_equal(np.bincount(breast.train.labels), [147, 399])

  pneumonia = data.load_dataset(f"npz:{shared_data / 'medmnist' / 'pneumoniamnist_reduced.npz'}")
  for split in (pneumonia.train, pneumonia.val, pneumonia.test):  # Stored as (N, 1) labels.
    assert split.labels.shape == (len(split.images),) and split.labels.dtype == np.int32
  assert [len(s.labels) for s in (pneumonia.train, pneumonia.val, pneumonia.test)] == [3882, 524,
                                                                                        624]
  np.testing.assert_array_equal(np.bincount(pneumonia.train.labels), [388, 3494])
  np.testing.assert_allclose(pneumonia.mean, [pneumonia.train.images.mean() / 255], rtol=1e-6)


def test_npz_jpeg_cifar10(shared_data):
  cifar = data.load_dataset(f"npz:{shared_data / 'cifar10' / 'cifar10_jpeg.npz'}")
  assert cifar.name == "cifar10_jpeg" and cifar.num_classes == 10
  assert cifar.train.images.shape == (50000, 32, 32, 3)
  assert cifar.test.images.shape == (10000, 32, 32, 3)
  np.testing.assert_array_equal(np.bincount(cifar.train.labels), np.full(10, 5000))
  np.testing.assert_array_equal(np.bincount(cifar.test.labels), np.full(10, 1000))
  # JPEG decoding in RGB order reproduces CIFAR-10's published statistics.
  np.testing.assert_allclose(cifar.mean, (0.4914, 0.4822, 0.4465), atol=0.005)
  np.testing.assert_allclose(cifar.std, (0.2470, 0.2435, 0.2616), atol=0.005)


def _medmnist_arrays(**overrides) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  arrays = {f"{split}_{kind}": value for split, n in (("train", 6), ("test", 4))
            for kind, value in (("images", rng.integers(0, 256, (n, 5, 5), np.uint8)),
                                ("labels", np.arange(n) % 2))}
  arrays.update(overrides)
  return {key: value for key, value in arrays.items() if value is not None}


@pytest.mark.parametrize("overrides, fragment", [
    ({"test_labels": None}, "'test_labels'"),
    ({"train_labels": np.zeros(5, np.int64)}, "'train_labels'"),
    ({"train_images": np.zeros((6, 5), np.uint8)}, "'train_images'"),
    ({"train_images": np.zeros((6, 5, 5), np.float32)}, "'train_images'"),
    ({"val_images": np.zeros((2, 5, 5), np.uint8)}, "'val_labels'"),
    ({"test_images": np.zeros((4, 8, 8), np.uint8)}, "test (8, 8, 1)"),
    ({"test_images": np.zeros((0, 5, 5), np.uint8), "test_labels": np.zeros(0, np.int64)},
     "the test split has no images"),
])
def test_bad_npz_raises_one_line_error_naming_the_array(tmp_path, overrides, fragment):
  path = tmp_path / "bad.npz"
  np.savez(path, **_medmnist_arrays(**overrides))
  assert_one_line_user_error(lambda: data.load_dataset(f"npz:{path}"), str(path), fragment)


def test_npz_small_file_loads_and_missing_file_errors(tmp_path):
  path = tmp_path / "small.npz"
  np.savez(path, **_medmnist_arrays(train_labels=np.arange(6)[:, None] % 3))
  small = data.load_dataset(f"npz:{path}")
  assert small.name == "small" and small.num_classes == 3 and small.val is None
  assert small.image_shape == (5, 5, 1)
  assert data.load_dataset(f"npz:{path}", image_size=10).image_shape == (10, 10, 1)
  # A config's image_size resizes any source, not only digits (a preset's size was dropped).
  from experiments import build  # noqa: PLC0415
  from experiments.configs import common  # noqa: PLC0415
  assert build.dataset(common.training(dataset=f"npz:{path}", image_size=10)).image_shape == (
      10, 10, 1)
  assert_one_line_user_error(lambda: data.load_dataset(f"npz:{tmp_path / 'absent.npz'}"),
                              "absent.npz")


def test_an_npz_named_like_cifar10_gets_its_own_statistics(tmp_path):
  # The published CIFAR statistics belong to TFDS's CIFAR, not to any file of that name.
  path = tmp_path / "cifar10.npz"
  np.savez(path, **_medmnist_arrays())
  dataset = data.load_dataset(f"npz:{path}")
  assert len(dataset.mean) == 1
  np.testing.assert_allclose(dataset.mean, [dataset.train.images.mean() / 255], rtol=1e-5)


def test_a_named_normalization_replaces_the_measured_statistics(tmp_path):
  rng = np.random.default_rng(0)
  path = tmp_path / "rgb.npz"
  np.savez(path, **_medmnist_arrays(train_images=rng.integers(0, 256, (6, 5, 5, 3), np.uint8),
                                    test_images=rng.integers(0, 256, (4, 5, 5, 3), np.uint8)))
  measured = data.load_dataset(f"npz:{path}")
  pixels = measured.train.images.reshape(-1, 3) / 255
  np.testing.assert_allclose(measured.std, pixels.std(axis=0), rtol=1e-5)
  common = data.load_dataset(f"npz:{path}", normalization="cifar10_common")
  assert (common.mean, common.std) == data.NORMALIZATIONS["cifar10_common"]
  np.testing.assert_array_equal(common.train.images, measured.train.images)
  assert_one_line_user_error(lambda: data.load_dataset("digits", normalization="cifar10_common"),
                              "'cifar10_common' has 3 channels", "digits images have 1")
  assert_one_line_user_error(lambda: data.load_dataset("digits", normalization="imagenet"),
                              "unknown normalization 'imagenet'",
                              "dataset, cifar10, cifar10_common")


def test_tfds_not_prepared_says_how_to_prepare(tmp_path):
  assert_one_line_user_error(lambda: data.load_dataset("cifar10", data_dir=str(tmp_path)),
                              "not prepared", f"tfds build cifar10 --data_dir {tmp_path}",
                              "--file_format=array_record", "tfds-prepare")


# ----------------------------------------------------------------------------------------------
# On-device pipeline


def test_steps_per_epoch():
  assert data.steps_per_epoch(50, 8) == 6
  assert data.steps_per_epoch(8, 8) == 1
  for batch_size in (0, -1, 51):
    assert_one_line_user_error(lambda: data.steps_per_epoch(50, batch_size), str(batch_size))


# Jitted once, vmapped over member keys and over (traced) steps.
_indices_for_keys_and_steps = jax.jit(
    jax.vmap(jax.vmap(data.batch_indices, in_axes=(None, 0, None, None)),
             in_axes=(0, None, None, None)),
    static_argnums=(2, 3))


def test_batch_indices_visit_every_example_once_per_epoch():
  num_examples, batch_size = 48, 8
  keys = jax.random.split(jax.random.key(0), 3)
  keys = jnp.stack([keys[0], keys[1], keys[0]])  # Members 0 and 2 share a key.
  steps = jnp.arange(3 * 6)  # Three epochs of six steps.
  indices = np.asarray(_indices_for_keys_and_steps(keys, steps, num_examples, batch_size))
  assert indices.shape == (3, 18, batch_size) and indices.dtype == np.int32
  epochs = indices.reshape(3, 3, num_examples)
  for member_epochs in epochs:
    for epoch in member_epochs:
      np.testing.assert_array_equal(np.sort(epoch), np.arange(num_examples))
    assert not np.array_equal(member_epochs[0], member_epochs[1])  # Reshuffled per epoch.
  np.testing.assert_array_equal(epochs[0], epochs[2])
  assert not np.array_equal(epochs[0, 0], epochs[1, 0])


@pytest.mark.parametrize("num_examples", [1, 2, 3, 5, 17, 64, 1438, 50000])
def test_shuffled_positions_is_a_permutation_of_the_split(num_examples):
  keys = jax.random.split(jax.random.key(num_examples), 2)
  orders = [np.asarray(data.shuffled_positions(key, jnp.arange(num_examples), num_examples))
            for key in keys]
  for order in orders:
    np.testing.assert_array_equal(np.sort(order), np.arange(num_examples))
  if num_examples >= 17:
    assert not np.array_equal(orders[0], orders[1])


def test_shuffled_positions_look_uniform():
  """Over many keys, each position is equally likely to hold each example, and each pair of
  positions each ordered pair of distinct examples."""
  num_examples, num_keys = 10, 4000
  keys = jax.random.split(jax.random.key(3), num_keys)
  orders = np.asarray(jax.vmap(data.shuffled_positions, in_axes=(0, None, None))(
      keys, jnp.arange(num_examples), num_examples))
  counts = np.zeros((num_examples, num_examples))
  np.add.at(counts, (np.broadcast_to(np.arange(num_examples), orders.shape), orders), 1)
  expected = num_keys / num_examples
  chi_square = ((counts - expected) ** 2 / expected).sum()
  # 81 degrees of freedom: the 99.9% quantile is about 126.
  assert chi_square < 126, chi_square
  pairs = np.zeros((num_examples, num_examples))
  np.add.at(pairs, (orders[:, 0], orders[:, 1]), 1)
  assert not np.diagonal(pairs).any()
  distinct = pairs[~np.eye(num_examples, dtype=bool)]
  expected = num_keys / distinct.size
  chi_square = ((distinct - expected) ** 2 / expected).sum()
  # 89 degrees of freedom: the 99.9% quantile is about 136.
  assert chi_square < 136, chi_square


def test_host_waits_finds_conditionals_and_data_dependent_loops_only():
  cond = lambda p, x: jax.lax.cond(p, lambda: x + 1, lambda: x * 2)
  assert len(host_waits_of(cond, True, 1.0)) == 1
  loop = lambda x: jax.lax.while_loop(lambda v: v < 10, lambda v: v * 2, x)
  assert len(host_waits_of(loop, 1.0)) == 1
  assert host_waits_of(lambda x: jax.lax.fori_loop(0, 5, lambda _, v: v * 2, x), 1.0) == []
  # The batch's indices take a fixed number of rounds, however many examples the split has.
  for num_examples in (2, 1797, 50000):
    assert host_waits_of(lambda key, step: data.batch_indices(key, step, num_examples, 2),
                         jax.random.key(0), 3) == []


def test_get_batch_pairs_images_with_labels_and_drops_the_remainder(digits):
  images, labels = jnp.asarray(digits.train.images), jnp.asarray(digits.train.labels)
  batch_size = 16
  per_epoch = data.steps_per_epoch(len(labels), batch_size)
  assert len(labels) % batch_size  # The split leaves a remainder to drop.
  get = jax.jit(jax.vmap(jax.vmap(data.get_batch, in_axes=(None, 0, None, None, None)),
                         in_axes=(0, None, None, None, None)), static_argnums=4)
  keys = jax.random.split(jax.random.key(2), 2)
  batch_images, batch_labels = get(keys, jnp.arange(per_epoch), images, labels, batch_size)
  assert batch_images.shape == (2, per_epoch, batch_size, 8, 8, 1)
  assert batch_images.dtype == jnp.uint8 and batch_labels.dtype == jnp.int32
  for member in range(2):
    epoch = data.Split(np.asarray(batch_images[member]).reshape(-1, 8, 8, 1),
                       np.asarray(batch_labels[member]).ravel())
    # Every (image, label) pair is a real example, none repeats, and only the remainder is missing.
    assert not _examples(epoch) - _examples(digits.train)
    assert len(epoch.labels) == per_epoch * batch_size == len(labels) - len(labels) % batch_size
  assert not np.array_equal(batch_labels[0], batch_labels[1])


def _crop_origins(original: np.ndarray, augmented: np.ndarray, pad: int) -> list[tuple]:
  """Every (row offset, column offset, mirrored) that maps `original` onto `augmented`."""
  height, width = original.shape[:2]
  padded = np.pad(original, ((pad, pad), (pad, pad), (0, 0)))
  return [(row, column, mirrored)
          for row in range(2 * pad + 1) for column in range(2 * pad + 1)
          for mirrored in (False, True)
          if np.array_equal(
              padded[row:row + height, column:column + width][:, ::-1 if mirrored else 1],
              augmented)]


_crop_flip_per_member = jax.jit(jax.vmap(data.random_crop_flip, in_axes=(0, None)))


def test_random_crop_flip_shifts_and_mirrors_per_member():
  # Nonzero noise: each crop offset and mirror gives a distinct image, so origins are unique.
  images = np.random.default_rng(0).integers(1, 256, (32, 6, 7, 2), np.uint8)
  keys = jax.random.split(jax.random.key(3), 2)
  augmented = np.asarray(_crop_flip_per_member(keys, images))
  assert augmented.shape == (2, *images.shape) and augmented.dtype == np.uint8
  origins = [[_crop_origins(images[i], augmented[member, i], pad=4) for i in range(len(images))]
             for member in range(2)]
  assert all(len(found) == 1 for member in origins for found in member)
  used = {found[0] for member in origins for found in member}
  assert {mirrored for _, _, mirrored in used} == {False, True}
  assert len({(row, column) for row, column, _ in used}) > 10
  assert origins[0] != origins[1]  # Each member draws its own augmentation.


def test_random_crop_flip_without_padding_only_mirrors():
  images = np.random.default_rng(1).integers(0, 256, (16, 5, 5, 3), np.uint8)
  augmented = np.asarray(data.random_crop_flip(jax.random.key(4), images, pad=0))
  mirrored = [np.array_equal(out, image[:, ::-1]) for out, image in zip(augmented, images)]
  kept = [np.array_equal(out, image) for out, image in zip(augmented, images)]
  assert all(m or k for m, k in zip(mirrored, kept))
  assert any(mirrored) and any(kept)


def test_to_unit_and_normalize(digits):
  np.testing.assert_allclose(data.to_unit(jnp.array([0, 51, 255], jnp.uint8)), [0, 0.2, 1])
  x = data.to_unit(jnp.asarray(digits.train.images))
  standardized = np.asarray(data.normalize(x, digits.mean, digits.std))
  assert standardized.dtype == np.float32
  assert abs(standardized.mean()) < 1e-4 and abs(standardized.std() - 1) < 1e-4
  rgb = np.random.default_rng(2).random((4, 3, 3, 3), np.float32)
  mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
  np.testing.assert_allclose(data.normalize(rgb, mean, std),
                             (rgb - np.array(mean)) / np.array(std), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_examples", [37, 40])
def test_pad_to_batches_roundtrip(digits, num_examples):
  images, labels = digits.test.images[:num_examples], digits.test.labels[:num_examples]
  batched_images, batched_labels, valid = data.pad_to_batches(images, labels, 8)
  assert batched_images.shape == (5, 8, 8, 8, 1) and batched_labels.shape == (5, 8)
  assert valid.dtype == jnp.bool_ and int(valid.sum()) == num_examples
  mask = np.asarray(valid).ravel()
  np.testing.assert_array_equal(np.asarray(batched_images).reshape(-1, 8, 8, 1)[mask], images)
  np.testing.assert_array_equal(np.asarray(batched_labels).ravel()[mask], labels)
  assert not np.asarray(batched_images).reshape(-1, 8, 8, 1)[~mask].any()


def test_map_batches_sees_every_example_once_with_its_own_key_per_batch(digits):
  images, labels = digits.test.images[:37], digits.test.labels[:37]

  def per_batch(batch_images, batch_labels, valid, key):
    pixels = jnp.sum(jnp.where(valid[:, None, None, None], batch_images.astype(jnp.int32), 0))
    return pixels, jnp.sum(jnp.where(valid, batch_labels, 0)), jnp.sum(valid), key

  pixels, label_sum, counts, keys = data.map_batches(per_batch, images, labels, 8,
                                                     jax.random.key(3))
  assert int(pixels.sum()) == int(images.astype(np.int64).sum())
  assert int(label_sum.sum()) == int(labels.sum()) and counts.tolist() == [8, 8, 8, 8, 5]
  np.testing.assert_array_equal(jax.random.key_data(keys),
                                jax.random.key_data(jax.random.split(jax.random.key(3), 5)))
