"""Dataset distillation (Acc-DD and baselines) on the sklearn digits: library pieces and runner."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import build
from experiments import distill as runner
from experiments.configs import distill as distill_configs
from jaxtickets import data as data_lib
from jaxtickets import compiled, models, population
from jaxtickets import train as train_lib
from jaxtickets.distill import (augment_models, dsa, evaluate, image_sgd, matching, methods,
                                synthetic)

from assertions import assert_fast_in_a_loop, assert_one_line_user_error, program_of

KEY = jax.random.key(0)
FULL = dsa.Strategy.parse("color_crop_cutout_flip_scale_rotate")


def unit_images(digits, count, start=0):
  return data_lib.to_unit(jnp.asarray(digits.train.images[start:start + count]))


# ----------------------------------------------------------------------------------------------
# DSA


def test_siamese_draw_is_identical_for_the_pair_and_differentiable(digits):
  real, syn = unit_images(digits, 6), unit_images(digits, 4, start=100)
  apply = jax.jit(lambda params, x: dsa.apply(params, x, mean=digits.mean, std=digits.std))
  for seed in range(6):
    params = dsa.sample_params(jax.random.key(seed), FULL, digits.image_shape)
    together = apply(params, jnp.concatenate([real, syn]))
    np.testing.assert_allclose(together[:6], apply(params, real), atol=1e-6)
    np.testing.assert_allclose(together[6:], apply(params, syn), atol=1e-6)
    # The same image in both batches is augmented identically.
    np.testing.assert_allclose(apply(params, real[:1]), apply(params, syn.at[0].set(real[0]))[:1],
                               atol=1e-6)
  gradient = jax.grad(lambda x: jnp.sum(apply(params, x) ** 2))(syn)
  assert np.all(np.isfinite(gradient)) and np.abs(gradient).sum() > 0
  # Per-sample mode: two copies of one image get different draws.
  twins = jnp.stack([real[0]] * 8)
  out = dsa.augment(KEY, twins, FULL, per_sample=True, mean=digits.mean, std=digits.std)
  assert float(jnp.abs(out - out[:1]).max()) > 0.1


def test_crop_and_flip_are_exact_pixel_moves(digits):
  x = unit_images(digits, 8)
  for op in ("crop", "flip"):
    params = dsa.sample_params(KEY, dsa.Strategy((op,)), x.shape[1:], count=8)
    out = np.asarray(dsa.apply(params, x))
    for index in range(8):
      theta = np.asarray(params.theta[index])
      image = np.asarray(x[index])
      if op == "flip":
        expected = image[:, ::-1] if theta[0, 0] < 0 else image
      else:  # out[i, j] = x[i + rows, j + columns], zero outside.
        rows, columns = (int(round(theta[1, 2] * 4)), int(round(theta[0, 2] * 4)))
        padded = np.pad(image, ((8, 8), (8, 8), (0, 0)))
        expected = padded[8 + rows:16 + rows, 8 + columns:16 + columns]
      np.testing.assert_allclose(out[index], expected, atol=1e-5)


def _grid_sample_reference(image: np.ndarray, theta: np.ndarray) -> np.ndarray:
  """PyTorch's grid_sample(affine_grid(theta), align_corners=False, zeros), pixel by pixel."""
  height, width, _ = image.shape
  out = np.zeros_like(image)
  for i in range(height):
    for j in range(width):
      x, y = (2 * j + 1) / width - 1, (2 * i + 1) / height - 1
      source_x, source_y = theta @ np.array([x, y, 1.0])
      column, row = ((source_x + 1) * width - 1) / 2, ((source_y + 1) * height - 1) / 2
      for r in (int(np.floor(row)), int(np.floor(row)) + 1):
        for c in (int(np.floor(column)), int(np.floor(column)) + 1):
          if 0 <= r < height and 0 <= c < width:
            out[i, j] += (1 - abs(row - r)) * (1 - abs(column - c)) * image[r, c]
  return out


def test_affine_warp_is_grid_sample_of_affine_grid(digits):
  x = unit_images(digits, 4)
  # A quarter turn of a square image moves pixel centres onto pixel centres: np.rot90 exactly
  # (output (x, y) reads input (-y, x)).
  quarter = jnp.broadcast_to(jnp.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0]]), (4, 2, 3))
  np.testing.assert_allclose(dsa.affine_warp(x, quarter), np.rot90(np.asarray(x), axes=(1, 2)),
                             atol=1e-6)
  # Sampled scale and rotation, between pixel centres: against the pixel-by-pixel reference.
  params = dsa.sample_params(KEY, dsa.Strategy(("scale", "rotate")), x.shape[1:], count=4)
  warped = np.asarray(dsa.affine_warp(x, params.theta))
  for image, theta, out in zip(np.asarray(x), np.asarray(params.theta, np.float64), warped):
    np.testing.assert_allclose(out, _grid_sample_reference(image, theta), atol=1e-5)


def test_cutmix_pastes_one_box_from_a_permuted_batch():
  count, size = 8, 16
  x = jnp.broadcast_to(jnp.arange(count, dtype=jnp.float32)[:, None, None, None],
                       (count, size, size, 1))  # every pixel names its image
  labels = jnp.arange(count)
  mix = jax.jit(jax.vmap(lambda key: dsa.cutmix(key, x, labels, probability=1.0)))
  mixed, other, weight = mix(jax.random.split(KEY, 64))
  for m, o, w in zip(np.asarray(mixed), np.asarray(other), np.asarray(weight)):
    assert sorted(o) == list(range(count))  # a permutation
    pasted = m != np.asarray(x)  # pixels taken from another image
    moved = o != np.arange(count)
    box = pasted[moved][0] if moved.any() else np.zeros((size, size, 1), bool)
    assert np.all(pasted[moved] == box)  # one box for the whole batch
    np.testing.assert_array_equal(m, np.where(box, o[:, None, None, None], np.asarray(x)))
    if moved.any():
      np.testing.assert_allclose(w, 1 - box.mean(), atol=1e-6)
  unmixed, _, one = dsa.cutmix(KEY, x, labels, probability=0.0)
  np.testing.assert_array_equal(unmixed, x)
  assert float(one) == 1.0


def test_cutmix_beta_one_shortcut_draws_like_the_beta_sampler():
  # beta == 1 draws lam uniformly (no rejection loop); a hair above 1 uses jax's Beta sampler.
  x, labels = jnp.zeros((4, 32, 32, 1)), jnp.arange(4)
  keys = jax.random.split(KEY, 4000)
  weights = {beta: np.asarray(jax.jit(jax.vmap(lambda key, b=beta: dsa.cutmix(
      key, x, labels, probability=1.0, beta=b)[2]))(keys)) for beta in (1.0, 1.0 + 1e-6)}
  fast, reference = weights[1.0], weights[1.0 + 1e-6]
  assert abs(fast.mean() - reference.mean()) < 0.02 and abs(fast.std() - reference.std()) < 0.02
  np.testing.assert_allclose(np.quantile(fast, [0.1, 0.5, 0.9]),
                             np.quantile(reference, [0.1, 0.5, 0.9]), atol=0.03)


# ----------------------------------------------------------------------------------------------
# Distances


def random_gradients(seed):
  rng = np.random.default_rng(seed)
  shapes = {"stem": {"kernel": (3, 3, 2, 4), "bias": (4,)}, "norm": {"scale": (4,)},
            "head": {"kernel": (8, 5), "bias": (5,)}}
  return jax.tree.map(lambda shape: rng.standard_normal(shape).astype(np.float32), shapes,
                      is_leaf=lambda leaf: isinstance(leaf, tuple))


def test_dc_and_idc_distances_match_numpy():
  real, syn = random_gradients(0), random_gradients(1)
  expected = 0.0
  for flax_kernel, flax_syn in ((real["stem"]["kernel"], syn["stem"]["kernel"]),
                                (real["head"]["kernel"], syn["head"]["kernel"])):
    # PyTorch layout (out, in, kh, kw) / (out, in), rows = output units.
    to_torch = (lambda k: np.transpose(k, (3, 2, 0, 1))) if flax_kernel.ndim == 4 else np.transpose
    a = to_torch(flax_kernel).reshape(flax_kernel.shape[-1], -1).astype(np.float64)
    b = to_torch(flax_syn).reshape(flax_syn.shape[-1], -1).astype(np.float64)
    cosine = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-6)
    expected += np.sum(1 - cosine)
  np.testing.assert_allclose(matching.dc_distance(real, syn), expected, rtol=1e-5)
  conv_difference = real["stem"]["kernel"] - syn["stem"]["kernel"]
  np.testing.assert_allclose(matching.idc_distance(real, syn), np.sum(conv_difference ** 2),
                             rtol=1e-5)
  np.testing.assert_allclose(matching.idc_distance(real, syn, metric="l1"),
                             np.abs(conv_difference).sum(), rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Multi-formation


def torch_bilinear_upsample(image, size):
  """PyTorch's bilinear Upsample (align_corners=False) of f[h, w, C] to [size, size, C]."""

  def axis_weights(in_size):
    source = np.maximum((np.arange(size) + 0.5) * in_size / size - 0.5, 0)
    low = np.floor(source).astype(int)
    return low, np.minimum(low + 1, in_size - 1), source - low

  r0, r1, rl = axis_weights(image.shape[0])
  c0, c1, cl = axis_weights(image.shape[1])
  rows = image[r0] * (1 - rl)[:, None, None] + image[r1] * rl[:, None, None]
  return rows[:, c0] * (1 - cl)[None, :, None] + rows[:, c1] * cl[None, :, None]


@pytest.mark.parametrize("factor", [2, 3])
def test_multi_formation_decode(factor):
  rng = np.random.default_rng(0)
  images = rng.uniform(size=(2, 8, 8, 1)).astype(np.float32)
  decoded = np.asarray(jax.jit(synthetic.decode, static_argnums=1)(images, factor))
  assert decoded.shape == (2 * factor ** 2, 8, 8, 1)
  crop = -(-8 // factor)
  padded = np.pad(images, ((0, 0), (0, crop * factor - 8), (0, crop * factor - 8), (0, 0)),
                  constant_values=0.5)
  for i in range(factor):
    for j in range(factor):
      for n in range(2):
        expected = torch_bilinear_upsample(
            padded[n, i * crop:(i + 1) * crop, j * crop:(j + 1) * crop], 8)
        np.testing.assert_allclose(decoded[(i * factor + j) * 2 + n], expected, atol=1e-5)


def test_decode_refuses_non_square_images_with_a_factor():
  assert_one_line_user_error(lambda: synthetic.decode(jnp.zeros((2, 12, 8, 1)), 2), "12x8")
  assert synthetic.decode(jnp.zeros((2, 12, 8, 1)), 1).shape == (2, 12, 8, 1)


def test_mix_init_places_downsampled_real_images_of_the_class(digits):
  images = synthetic.init_images(3, digits.train.images, digits.train.labels, 10, 2, factor=2,
                                 init="mix")
  assert images.shape == (10, 2, 8, 8, 1) and images.min() >= 0 and images.max() <= 1
  for label in (0, 7):
    class_images = digits.train.images[digits.train.labels == label].astype(np.float32) / 255
    quarters = class_images[:, ::2, ::2]  # nearest downsampling 8 -> 4
    for quadrant in (images[label, 0, :4, :4], images[label, 1, 4:, 4:]):
      assert np.min(np.abs(quarters - quadrant).reshape(len(quarters), -1).max(-1)) < 1e-6


# ----------------------------------------------------------------------------------------------
# Model augmentation


# ----------------------------------------------------------------------------------------------
# Image updates


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9])
def test_per_class_updates_equal_idcs_sequential_steps(momentum):
  """Three inner iterations of K = 4 per-class steps of one momentum SGD over all images (the
  reference's loop, with torch.optim.SGD's rule in NumPy) against the closed form. Each class's
  loss 0.5 |A_c x_c - t_c|^2 has a gradient that depends on where it is taken."""
  rng = np.random.default_rng(0)
  num_classes, lr = 4, 0.1
  matrices = rng.normal(size=(num_classes, 3, 3))
  targets = rng.normal(size=(num_classes, 3))
  start = rng.normal(size=(num_classes, 3))

  def class_grad(c, x_c):
    return matrices[c].T @ (matrices[c] @ x_c - targets[c])

  x, buffer = start.copy(), None
  for _ in range(3):
    for c in range(num_classes):
      grad = np.zeros_like(x)
      grad[c] = class_grad(c, x[c])
      buffer = grad if buffer is None else momentum * buffer + grad
      x = x - lr * buffer

  optimizer = image_sgd.image_sgd(lr, momentum, per_class=True)
  images = jnp.asarray(start, jnp.float32)
  state = optimizer.init(images)
  for _ in range(3):
    at = np.asarray(optimizer.lookahead(images, state), np.float64)
    grads = np.stack([class_grad(c, at[c]) for c in range(num_classes)])
    images, state = optimizer.update(jnp.asarray(grads, jnp.float32), state, images)
  np.testing.assert_allclose(images, x, rtol=1e-5, atol=1e-6)


def test_summed_updates_are_momentum_sgd():
  rng = np.random.default_rng(1)
  images = jnp.asarray(rng.normal(size=(3, 2, 4)), jnp.float32)
  optimizer = image_sgd.image_sgd(0.05, 0.5, per_class=False)
  reference = optax.sgd(0.05, momentum=0.5)
  state, reference_state, expected = optimizer.init(images), reference.init(images), images
  for _ in range(3):
    np.testing.assert_array_equal(optimizer.lookahead(images, state), images)
    grads = jnp.sin(images)  # Taken where the images are.
    images, state = optimizer.update(grads, state, images)
    updates, reference_state = reference.update(jnp.sin(expected), reference_state, expected)
    expected = optax.apply_updates(expected, updates)
    np.testing.assert_allclose(images, expected, rtol=1e-6)


def test_perturbation_keeps_filter_norms_and_leaves_biases():
  model = models.get_model("convnet3", num_classes=10, width=6)
  params, _ = train_lib.init_variables(KEY, model, (8, 8, 1))
  direction = jax.jit(augment_models.filter_normalized_direction)(jax.random.key(1), params)
  for (path, leaf), step in zip(jax.tree.leaves_with_path(params), jax.tree.leaves(direction)):
    if leaf.ndim < 2:
      assert not np.any(step), path
      continue
    axes = tuple(range(leaf.ndim - 1))
    np.testing.assert_allclose(np.sqrt(np.sum(np.square(step), axis=axes)),
                               np.sqrt(np.sum(np.square(leaf), axis=axes)), rtol=1e-4)
  perturbed = jax.jit(augment_models.perturb)(jax.random.key(2), params)
  for (path, leaf), new in zip(jax.tree.leaves_with_path(params), jax.tree.leaves(perturbed)):
    change = np.asarray(new - leaf)
    if leaf.ndim < 2:
      np.testing.assert_array_equal(change, 0)
      continue
    axes = tuple(range(leaf.ndim - 1))
    ratio = np.sqrt(np.sum(change ** 2, axis=axes) / np.sum(np.asarray(leaf) ** 2, axis=axes))
    assert np.all(ratio <= 0.18 + 1e-5) and np.all(ratio > 0), path  # |a| + |b| <= 2 * 0.09


# ----------------------------------------------------------------------------------------------
# Matching over (model x class)


def test_matching_over_models_and_classes_equals_single_losses_for_every_map(digits):
  model = models.get_model("convnet3", num_classes=10, width=4)
  apply_fn = train_lib.model_apply_fn(model, digits.mean, digits.std)
  num_models, num_classes, real_batch, syn_batch = 3, 3, 6, 2
  nets = augment_models.init_nets(KEY, model, digits.image_shape, num_models, train_lib.sgd(0.1))
  labels = digits.train.labels
  real = jnp.stack([unit_images(digits, len(labels))[labels == c][:real_batch]
                    for c in range(num_classes)])
  syn = jnp.stack([unit_images(digits, len(labels))[labels == c][-syn_batch:]
                   for c in range(num_classes)])
  real_x = jnp.stack([real * (1 - 0.1 * m) for m in range(num_models)])  # per-model batches
  syn_x = jnp.broadcast_to(syn, (num_models, *syn.shape))
  real_y = jnp.broadcast_to(jnp.arange(num_classes)[:, None], (num_classes, real_batch))
  syn_y = jnp.broadcast_to(jnp.arange(num_classes)[:, None], (num_classes, syn_batch))
  objectives = {"dc": matching.gradient_match(apply_fn, matching.dc_distance),
                "mse": matching.gradient_match(apply_fn, matching.idc_distance),
                "dm": matching.distribution_match(matching.embedding_fn(model, digits.mean,
                                                                        digits.std))}
  for name, objective in objectives.items():
    losses = jax.jit(lambda p, rx, sx, o=objective: matching.matching_losses(
        o, p, {}, rx, real_y, sx, syn_y))(nets.params, real_x, syn_x)
    single = jax.jit(objective)
    singles = [[float(single(jax.tree.map(lambda leaf, m=m: leaf[m], nets.params), {},
                             real_x[m, c], real_y[c], syn_x[m, c], syn_y[c]))
                for c in range(num_classes)] for m in range(num_models)]
    np.testing.assert_allclose(losses, singles, rtol=2e-4, err_msg=name)
    for maps in ({"model_map": "unroll", "class_map": "vmap"},
                 {"model_map": "map", "class_map": "map"}):
      loss = jax.jit(functools.partial(matching.matching_loss, objective, **maps))(
          nets.params, {}, real_x, real_y, syn_x, syn_y)
      np.testing.assert_allclose(loss, np.sum(singles) / num_models, rtol=2e-4,
                                 err_msg=f"{name} {maps}")
    assert np.min(singles) > 0
  # The gradient reaches the synthetic images of each class from its own loss only.
  grad = jax.jit(jax.grad(lambda sx: matching.matching_loss(objectives["mse"], nets.params, {},
                                                            real_x, real_y, sx, syn_y)))(syn_x)
  assert np.all(np.abs(np.asarray(grad)).sum(axis=(0, 2, 3, 4, 5)) > 0)


def test_real_batches_hold_distinct_images_of_their_class_and_never_another(digits):
  split = data_lib.Split(digits.train.images[:40], digits.train.labels[:40])
  data = methods.distill_data(split, 10)
  counts = np.bincount(split.labels, minlength=10)
  labels = np.asarray(split.labels)
  for batch_size in (int(counts.min()), int(counts.max()) + 2):
    batch = np.asarray(methods.sample_real(KEY, data, batch_size))  # u8[K, batch, H, W, C]
    for label in range(10):
      # Which stored images were drawn: match pixels back to the split.
      drawn = [int(np.flatnonzero((split.images == image).all(axis=(1, 2, 3)))[0])
               for image in batch[label]]
      assert np.all(labels[drawn] == label)
      assert len(set(drawn)) == min(batch_size, counts[label])


def small_program(method, **config_fields):
  """The ``small`` preset's distillation (step, state, data, config, method) for ``method``,
  with an untrained pool (Acc-DD) and ``config_fields`` set."""
  config = distill_configs.get_config("small")
  config.method = method
  for field, value in config_fields.items():
    config[field] = value
  resolved = distill_configs.check_config(config)
  dataset = runner.load_data(config)
  model = build.model(config, dataset.num_classes)
  pool = None
  if resolved.models == "pool":
    nets = augment_models.init_nets(KEY, model, dataset.image_shape, config.pool_size,
                                    train_lib.sgd(0.1))
    pool = {"params": nets.params, "batch_stats": nets.batch_stats}
  return (*runner.distill_program(config, resolved, model, dataset, pool), config, resolved)


@pytest.mark.parametrize("method", ["dc", "acc_dd"])
def test_distill_step_runs_fast_in_a_loop(method):
  step, state, data, *_ = small_program(method)
  assert_fast_in_a_loop(step, state, data)


def test_distill_step_lowers_the_matching_loss_and_replaces_the_net_each_outer_iteration():
  # IDC at its own image lr, on one fixed net per outer iteration (no net training, no
  # augmentation, nearly whole classes as real batches): the updates must lower the loss.
  config = distill_configs.get_config("small")
  config.method = "idc"
  for field, value in (("match_strategy", "none"), ("net_steps", 0), ("inner_iterations", 4),
                       ("real_batch", 1000)):
    config.method_overrides[field] = value
  method = distill_configs.check_config(config)
  dataset = runner.load_data(config)
  model = build.model(config, dataset.num_classes)
  step, state, data = runner.distill_program(config, method, model, dataset, None)
  step = jax.jit(step)
  initial_images = np.asarray(state.images)
  losses, nets = [], []
  for _ in range(method.inner_iterations + 1):
    state, metrics = step(state, data)
    losses.append(float(metrics["loss"]))
    nets.append(jax.tree.leaves(state.nets.params)[0])
  assert not np.allclose(np.asarray(state.images), initial_images)
  inner = losses[:method.inner_iterations]
  assert inner[-1] < 0.95 * inner[0] and min(inner[1:]) < inner[0]
  # The net stays for the outer iteration and is replaced by a fresh one at the next.
  for later in nets[1:method.inner_iterations]:
    np.testing.assert_array_equal(later, nets[0])
  assert not np.allclose(nets[method.inner_iterations], nets[0])


def test_trajectory_chunk_computes_the_interleaved_steps():
  # Two outer iterations of Acc-DD with two nets each: interleaved, one inner iteration per
  # step, vs both outer iterations' nets trained first as one population of four.
  step, state, data, config, method = small_program("acc_dd", num_models=2, checkpoint_every=2)
  chunk_step = small_program("acc_dd", num_models=2, checkpoint_every=2, trajectory_chunk=2)[0]
  steps = 2 * method.inner_iterations
  interleaved, metrics = jax.jit(train_lib.repeat(step, steps))(state, data)
  program = program_of(chunk_step, state, data)
  assert compiled.host_waits(program) == []
  chunked, chunk_metrics = program(state, data)
  assert int(chunked.step) == int(interleaved.step) == steps
  moved = np.abs(np.asarray(interleaved.images) - np.asarray(state.images)).max()
  assert moved > 1e-3
  np.testing.assert_allclose(chunked.images, interleaved.images, atol=1e-4 * moved)
  np.testing.assert_allclose(chunked.image_opt_state.trace,
                             interleaved.image_opt_state.trace, rtol=1e-4, atol=1e-6)
  # The nets the state ends with: the second outer iteration's, trained for all its steps.
  for got, want in zip(jax.tree.leaves(chunked.nets), jax.tree.leaves(interleaved.nets)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  for name in ("loss", "net_accuracy"):
    np.testing.assert_allclose(chunk_metrics[name], np.mean(metrics[name]), rtol=1e-4)


def test_trajectory_chunk_runs_resumes_and_checkpoints_like_the_interleaved_run(tmp_path):
  def run(chunk, outer_iterations, name):
    *_, config, method = small_program("idc", trajectory_chunk=chunk, checkpoint_every=2,
                                       outer_iterations=outer_iterations)
    dataset = runner.load_data(config)
    model = build.model(config, dataset.num_classes)
    return runner.distill(config, method, model, dataset, None, tmp_path / name,
                          progress=False)

  images, summary = run(None, 4, "interleaved")
  run(2, 2, "chunked")  # Stops at its first checkpoint; the next run resumes from it.
  chunked, chunk_summary = run(2, 4, "chunked")
  np.testing.assert_allclose(chunked, images, atol=1e-5)
  # One record (and checkpoint) per 2 outer iterations in both, each the mean of its steps.
  assert chunk_summary["loss_steps"] == summary["loss_steps"] == [4, 8]
  np.testing.assert_allclose(chunk_summary["loss"], summary["loss"], rtol=1e-4)
  assert chunk_summary["trajectory_chunk"] == 2


@pytest.mark.parametrize("epochs", [12, 2])
def test_evaluation_rate_decays_as_multistep_lr_at_its_milestone_epochs(epochs):
  # PyTorch's MultiStepLR, stepped once per epoch: epoch e trains at lr * gamma^(milestones
  # <= e), milestones int(f * epochs); at 2 epochs both land on epoch 1 and decay twice.
  protocol = evaluate.Protocol(epochs=epochs, momentum=0.0, weight_decay=0.0)
  steps_per_epoch = 3
  optimizer = evaluate.optimizer(protocol, steps_per_epoch)
  params = jnp.zeros(())
  state = optimizer.init(params)
  milestones = [int(f * epochs) for f in protocol.milestones]
  for step in range(epochs * steps_per_epoch):
    update, state = optimizer.update(jnp.ones(()), state, params)
    decays = sum(m <= step // steps_per_epoch for m in milestones)
    assert -float(update) == pytest.approx(protocol.learning_rate * protocol.gamma**decays)


def test_evaluation_step_runs_fast_in_a_loop():
  config = distill_configs.get_config("small")
  dataset = runner.load_data(config)
  model = build.model(config, dataset.num_classes)
  # DSA + CutMix per sample, as the runner's evaluation nets train.
  step = evaluate.make_step(train_lib.model_apply_fn(model, dataset.mean, dataset.std),
                            runner.protocol_of(config), train_lib.sgd(0.1),
                            len(dataset.train.labels), dataset.mean, dataset.std)
  nets = augment_models.init_nets(KEY, model, dataset.image_shape, 2, train_lib.sgd(0.1))
  assert_fast_in_a_loop(population.run(step), nets, train_lib.device_data(dataset.train))


# ----------------------------------------------------------------------------------------------
# Runner


SMALL = "experiments/configs/distill.py:small"


def run_cli(tmp_path, *overrides, name="run"):
  runner.main(["--config", SMALL, *(f"--config.{override}" for override in overrides),
               "--workdir", str(tmp_path / name)])
  return tmp_path / name


def test_cli_small_run_saves_the_set_and_resumes(tmp_path):
  workdir = run_cli(tmp_path)
  results = json.loads((workdir / "results.json").read_text())
  config = distill_configs.get_config("small")
  assert results["method"]["name"] == "acc_dd" and results["pool"]["size"] == config.pool_size
  assert results["distill"]["outer_iterations"] == config.outer_iterations
  evaluation = results["evaluation"]
  assert len(evaluation["distilled"]["accuracies"]) == config.eval.num_nets
  assert len(evaluation["random_real"]["accuracies"]) == config.eval.num_nets
  with np.load(workdir / "synthetic.npz") as saved:
    images = saved["images"]
    assert images.shape == (10, config.ipc, 8, 8, 1) and int(saved["factor"]) == 2
  assert images.min() >= 0 and images.max() <= 1
  report = (workdir / "report.md").read_text()
  assert "random real images" in report and (workdir / "synthetic.png").stat().st_size > 0
  assert results["distill"]["seconds"] > 0 and evaluation["distilled"]["seconds"] > 0
  # A second run finds every stage finished and reproduces the same set and numbers, wall
  # times included (they are the training's, read from the logs, not the rerun's).
  run_cli(tmp_path)
  with np.load(workdir / "synthetic.npz") as saved:
    np.testing.assert_array_equal(saved["images"], images)
  assert json.loads((workdir / "results.json").read_text()) == results



def test_cli_fast_presets_reorderings_compute_the_default_set_and_run_in_bfloat16(tmp_path):
  # What cifar10_ipc10_fast changes from cifar10_ipc10, on the small preset: "default" takes
  # cifar10_ipc10's values of those fields, "reordered" the fast preset's except its dtype,
  # "fast" all of them; the chunk and checkpoint period are the small run's 2 outer iterations.
  fast = distill_configs.get_config("cifar10_ipc10_fast").to_dict()
  base = distill_configs.get_config("cifar10_ipc10").to_dict()
  base_options = base.pop("model_options")
  changes = {f"model_options.{key}": value for key, value in fast.pop("model_options").items()
             if base_options.get(key) != value}
  changes.update((key, value) for key, value in fast.items() if base[key] != value)
  assert changes.pop("dtype") == "bfloat16" and changes["trajectory_chunk"] > 1
  changes.update(trajectory_chunk=2, checkpoint_every=2)
  default = {key: base[key] for key in changes if key in base}
  default.update(checkpoint_every=2)
  assert default["class_map"] != changes["class_map"]  # small's own class_map is the fast one.
  runs = {"default": default, "reordered": changes, "fast": {**changes, "dtype": "bfloat16"}}
  sets = {}
  for name, overrides in runs.items():
    workdir = run_cli(tmp_path, "eval.num_nets=1", "eval.epochs=1", "eval.random_baseline=False",
                      *(f"{key}={value}" for key, value in overrides.items()), name=name)
    results = json.loads((workdir / "results.json").read_text())
    assert results["distill"]["trajectory_chunk"] == overrides["trajectory_chunk"]
    with np.load(workdir / "synthetic.npz") as saved:
      sets[name] = saved["images"]
  start = np.asarray(small_program("acc_dd")[1].images).reshape(sets["default"].shape)
  moved, reordered = sets["default"] - start, sets["reordered"] - start
  assert np.abs(moved).mean() > 1e-3
  # The same set up to float32 rounding (im2col sums in another order), which the pool's
  # pretraining amplifies.
  assert np.abs(reordered - moved).mean() < 0.05 * np.abs(moved).mean()
  assert np.sum(moved * reordered) > 0.99 * np.linalg.norm(moved) * np.linalg.norm(reordered)
  # bfloat16 pretrains the pool too, so its nets and its set differ from float32's; a dtype the
  # run ignored would give the reordered set.
  assert np.abs(sets["fast"] - sets["reordered"]).mean() > 0.5 * np.abs(moved).mean()


@pytest.mark.parametrize("fields, fragments", [
    ({"method": "idc", "method_overrides.perturb": True}, ("perturb=True", "models='random'")),
    ({"method_overrides.image_updates": "each"}, ("unknown image_updates 'each'",)),
    ({"method_overrides.match_strategy": "color_blur"}, ("unknown DSA op 'blur'",)),
    ({"method_overrides.distance": "cos"}, ("unknown gradient distance 'cos'",)),
    ({"method": "dm", "trajectory_chunk": 1}, ("trajectory_chunk", "method 'dm'")),
    ({"method": "dsa", "trajectory_chunk": 1}, ("trajectory_chunk", "method 'dsa'")),
    ({"perturb_magnitude": (0.1, 0.01)}, ("expected 0 <= low <= high",)),
    ({"eval.epochs": 0}, ("evaluation epochs=0",))])
def test_check_config_refuses_methods_the_library_cannot_run(fields, fragments):
  config = distill_configs.get_config("small")
  for key, value in fields.items():
    *parents, leaf = key.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  assert_one_line_user_error(lambda: distill_configs.check_config(config), *fragments)


def test_methods_registry():
  assert_one_line_user_error(lambda: methods.get_method("kip", 10), "unknown distillation method")
  assert methods.get_method("dc", 10).inner_iterations == 10
  assert methods.get_method("acc_dd", 50).image_learning_rate(50, (0.25,)) == pytest.approx(0.05)


@pytest.mark.parametrize("method, num_classes, ipc, batch, steps", [
    # DC/DSA's reference trains the net for the IPC's epochs over the synthetic set in a
    # shuffled loader of batch 256 (main.py: ``for il in range(inner_loop): epoch(...)``).
    ("dc", 10, 1, 10, 1), ("dc", 10, 10, 100, 50), ("dsa", 10, 50, 256, 20),
    ("dc", 100, 10, 256, 200), ("dsa", 100, 50, 256, 200),
    # IDC/Acc-DD: 2000 real images per inner iteration, 32 batches of 64.
    ("idc", 10, 10, 64, 32), ("acc_dd", 100, 50, 64, 32)])
def test_net_schedule_follows_the_reference_loops(method, num_classes, ipc, batch, steps):
  assert methods.net_schedule(methods.get_method(method, ipc), num_classes, ipc) == (batch, steps)
