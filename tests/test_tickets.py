"""Tests for jaxtickets.tickets: counts, top-k, straight-through, pruning, signs, accounting."""

import math

import hypothesis
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import strategies as st

from jaxtickets import paths, tickets
from jaxtickets.errors import UserError

_SHAPES = {
    "stem": {"kernel": (3, 3, 3, 8)},
    "stem_norm": {"scale": (8,), "bias": (8,)},
    "block0": {
        "conv": {"kernel": (3, 3, 8, 16), "bias": (16,)},
        "norm": {"scale": (16,), "bias": (16,)},
        "shortcut": {"kernel": (1, 1, 8, 16)},
        "shortcut_norm": {"scale": (16,), "bias": (16,)},
    },
    "head": {"kernel": (16, 10), "bias": (10,)},
}


def _is_shape(node) -> bool:
  return isinstance(node, tuple)


def _tree(seed: int, sampler=None) -> dict:
  """A params-like tree with _SHAPES, filled by ``sampler(rng, shape)`` (standard normal)."""
  rng = np.random.default_rng(seed)
  sampler = sampler or (lambda rng, shape: rng.standard_normal(shape))
  return jax.tree.map(lambda shape: jnp.asarray(sampler(rng, shape), jnp.float32), _SHAPES,
                      is_leaf=_is_shape)


def _key(seed: int) -> jax.Array:
  # rbg keys: with the default partitionable threefry, every draw of a new shape costs seconds of
  # XLA compile time on CPU; the properties checked here do not depend on the generator.
  return jax.random.key(seed, impl="rbg")


def _named(tree) -> dict:
  return {paths.joined(path): leaf for path, leaf in jax.tree.leaves_with_path(tree)}


def _assert_one_line_error(error: pytest.ExceptionInfo, *fragments: str) -> None:
  message = str(error.value)
  assert "\n" not in message
  for fragment in fragments:
    assert fragment in message


# ----------------------------------------------------------------------------- leaf selection


def test_prunable_default_selects_every_kernel_and_flags_narrow_it():
  params = _tree(0)
  default = _named(tickets.prunable(params))
  assert {path for path, flag in default.items() if flag} == {
      "stem/kernel", "block0/conv/kernel", "block0/shortcut/kernel", "head/kernel"}

  aws = _named(tickets.prunable(params, classifier=False))
  assert not aws["head/kernel"] and aws["stem/kernel"]
  assert not _named(tickets.prunable(params, first_conv=False))["stem/kernel"]
  assert not _named(tickets.prunable(params, shortcut=False))["block0/shortcut/kernel"]

  with_biases = _named(tickets.prunable(params, biases=True, classifier=False))
  assert with_biases["block0/conv/bias"] and not with_biases["head/bias"]
  assert not with_biases["block0/norm/bias"]

  with_norms = _named(tickets.prunable(params, norms=True))
  assert all(with_norms[path] for path in with_norms if "norm" in path)
  assert not with_norms["head/bias"]


# ----------------------------------------------------------------------------- kept counts


def _reference_kept(numel: int, keep_ratio: float) -> int:
  # The PyTorch references' GetSubnet: j = int((1 - k) * numel) entries are zeroed.
  return numel - int((1 - keep_ratio) * numel)


def _layer(numel: int) -> dict:
  return {"conv": {"kernel": jax.ShapeDtypeStruct((numel,), jnp.float32)}}


def _host_counts(numel: int, ratios) -> np.ndarray:
  layer = _layer(numel)
  return tickets.kept_counts(layer, ratios, tickets.prunable(layer))["conv"]["kernel"]


def test_kept_count_follows_float64_rounding_of_the_references():
  # (1 - 0.9) is 0.09999999999999998 in float64, so 0.9 of 10 keeps all 10 there.
  assert tickets.kept_count(10, 0.9) == 10
  assert tickets.kept_count(10, 0.5) == 5
  assert tickets.kept_count(7, 1.0) == 7
  np.testing.assert_array_equal(_host_counts(10, [0.9, 0.5, 1.0, 0.05]), [10, 5, 10, 1])


def test_kept_counts_trees_scalars_and_populations():
  params = _tree(0)
  flags = tickets.prunable(params, classifier=False)
  one = tickets.kept_counts(params, 0.3, flags)
  many = tickets.kept_counts(params, np.linspace(0.1, 0.8, 8), flags)
  assert jax.tree.structure(one) == jax.tree.structure(params)
  for path, flag in _named(flags).items():
    size = _named(params)[path].size
    assert _named(one)[path].shape == () and _named(one)[path].dtype == np.int32
    assert _named(many)[path].shape == (8,) and _named(many)[path].dtype == np.int32
    if flag:
      assert _named(one)[path] == _reference_kept(size, 0.3), path
      np.testing.assert_array_equal(
          _named(many)[path], [_reference_kept(size, r) for r in np.linspace(0.1, 0.8, 8)])
    else:
      assert _named(one)[path] == size and (_named(many)[path] == size).all(), path


_SWEEP_SIZES = (1, 3, 10, 100, 1000, 5120, 20480, 36864, 10**6, 2 * 10**6 + 40, 2**31 - 1)


def test_host_kept_counts_match_python_over_dense_sweep():
  rng = np.random.default_rng(0)
  millionths = np.concatenate([np.arange(1, 1001) * 1000, np.arange(1, 1001) * 50,
                               rng.integers(1, 10**6 + 1, 2000)])
  ratios = [m / 10**6 for m in millionths.tolist()] + rng.random(2000).tolist()
  sizes = _SWEEP_SIZES + tuple(rng.integers(1, 10**7, 8).tolist())
  for numel in sizes:
    expected = [_reference_kept(numel, ratio) for ratio in ratios]
    np.testing.assert_array_equal(_host_counts(numel, ratios), expected, err_msg=f"numel={numel}")


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(numel=st.integers(1, 2**31 - 1),
                  ratio=st.one_of(st.integers(1, 10**6).map(lambda m: m / 10**6),
                                  st.floats(0, 1)))
def test_host_kept_counts_match_python_for_random_sizes(numel, ratio):
  assert _host_counts(numel, ratio) == _reference_kept(numel, ratio)
  assert _host_counts(numel, [ratio, 1.0])[0] == _reference_kept(numel, ratio)


# ----------------------------------------------------------------------------- top-k masks


def _check_layer_top_k(scores, mask, keep_ratio):
  for path, score in _named(scores).items():
    keep = np.asarray(_named(mask)[path])
    magnitude = np.abs(np.asarray(score))
    assert keep.sum() == _reference_kept(score.size, keep_ratio), path
    if 0 < keep.sum() < keep.size:
      assert magnitude[keep].min() >= magnitude[~keep].max(), path


def test_topk_mask_keeps_exact_count_of_largest_and_leaves_others_dense():
  scores = _tree(1)
  flags = tickets.prunable(scores)
  for keep_ratio in (0.05, 0.3, 0.5, 0.9, 1.0):
    mask = tickets.topk_mask(scores, tickets.kept_counts(scores, keep_ratio, flags), flags)
    chosen = {p: s for p, s in _named(scores).items() if _named(flags)[p]}
    _check_layer_top_k(chosen, {p: _named(mask)[p] for p in chosen}, keep_ratio)
    for path, flag in _named(flags).items():
      if not flag:
        assert np.asarray(_named(mask)[path]).all(), path


def test_topk_mask_breaks_ties_by_lower_flat_index():
  scores = {"conv": {"kernel": jnp.asarray([[1.0, -2.0, 2.0, 0.0], [2.0, 1.0, -1.0, 2.0]])}}
  flags = tickets.prunable(scores)
  mask = tickets.topk_mask(scores, tickets.kept_counts(scores, 0.5, flags), flags)
  # |s| = [1 2 2 0; 2 1 1 2]: four 2s compete for 4 places, then a 1 could not fit.
  np.testing.assert_array_equal(mask["conv"]["kernel"],
                                [[False, True, True, False], [True, False, False, True]])
  mask = tickets.topk_mask(scores, tickets.kept_counts(scores, 0.375, flags), flags)
  np.testing.assert_array_equal(mask["conv"]["kernel"],
                                [[False, True, True, False], [True, False, False, False]])
  mask = tickets.topk_mask(scores, tickets.kept_counts(scores, 0.75, flags), flags)
  np.testing.assert_array_equal(mask["conv"]["kernel"],
                                [[True, True, True, False], [True, True, False, True]])


def test_topk_mask_vmapped_over_population_counts_matches_one_at_a_time():
  scores = _tree(2)
  flags = tickets.prunable(scores)
  ratios = [0.05, 0.1, 0.3, 0.7, 0.9, 1.0]
  kept = tickets.kept_counts(scores, ratios, flags)
  population = jax.jit(jax.vmap(lambda k: tickets.topk_mask(scores, k, flags)))(kept)
  for member, ratio in enumerate(ratios):
    expected = tickets.topk_mask(scores, tickets.kept_counts(scores, ratio, flags), flags)
    for path, keep in _named(expected).items():
      np.testing.assert_array_equal(_named(population)[path][member], keep,
                                    err_msg=f"{path} at {ratio}")


def test_global_topk_mask_spends_one_budget_across_layers():
  scores = _tree(3)
  flags = tickets.prunable(scores, classifier=False)
  chosen = [path for path, flag in _named(flags).items() if flag]
  total = sum(_named(scores)[path].size for path in chosen)
  global_mask = jax.jit(lambda kept: tickets.global_topk_mask(scores, kept, flags))
  for keep_ratio in (0.1, 0.25, 0.7):
    kept_total = tickets.kept_count(total, keep_ratio)
    for mask in (tickets.global_topk_mask(scores, kept_total, flags),
                 global_mask(jnp.int32(kept_total))):
      kept = np.concatenate([np.asarray(_named(mask)[path]).reshape(-1) for path in chosen])
      magnitude = np.concatenate([np.abs(np.asarray(_named(scores)[path])).reshape(-1)
                                  for path in chosen])
      assert kept.sum() == _reference_kept(total, keep_ratio)
      assert magnitude[kept].min() >= magnitude[~kept].max()
      assert np.asarray(mask["head"]["kernel"]).all()
    densities = [np.mean(np.asarray(_named(mask)[path])) for path in chosen]
    assert len(set(densities)) > 1  # layers are not pruned uniformly


def test_global_topk_mask_breaks_ties_by_leaf_order_then_index():
  scores = {"a": {"kernel": jnp.asarray([1.0, 2.0, 1.0])}, "b": {"kernel": jnp.asarray([1.0, 3.0])}}
  mask = tickets.global_topk_mask(scores, 3, tickets.prunable(scores))
  np.testing.assert_array_equal(mask["a"]["kernel"], [True, True, False])
  np.testing.assert_array_equal(mask["b"]["kernel"], [False, True])


# ----------------------------------------------------------------------------- straight-through


def test_ste_mask_forward_is_hard_mask_and_gradient_is_sign_times_mask_gradient():
  scores = _tree(5)
  scores["block0"]["conv"]["kernel"] = scores["block0"]["conv"]["kernel"].at[0, 0, 0, 0].set(0.0)
  weights = _tree(6)
  flags = tickets.prunable(scores, shortcut=False)
  kept = tickets.kept_counts(scores, 0.3, flags)

  soft = tickets.ste_mask(scores, kept, flags)
  hard = tickets.topk_mask(scores, kept, flags)
  for path, keep in _named(hard).items():
    np.testing.assert_array_equal(_named(soft)[path], np.asarray(keep, np.float32), err_msg=path)

  def loss_of_mask(mask):  # nonlinear in the mask, so d/dmask depends on the mask itself
    return sum(jnp.sum(jnp.sin(3.0 * m * w)) for m, w in
               zip(jax.tree.leaves(mask), jax.tree.leaves(weights)))

  grads = jax.jit(jax.grad(lambda s, k: loss_of_mask(tickets.ste_mask(s, k, flags))))(scores, kept)
  mask_grads = jax.grad(loss_of_mask)(jax.tree.map(lambda k: k.astype(jnp.float32), hard))
  for path, flag in _named(flags).items():
    expected = (np.sign(_named(scores)[path]) * _named(mask_grads)[path] if flag
                else np.zeros(_named(scores)[path].shape))
    np.testing.assert_allclose(_named(grads)[path], expected, rtol=1e-6, err_msg=path)


def test_masked_params_gradient_is_sign_times_weight_times_effective_weight_gradient():
  scores, weights, targets = _tree(7), _tree(8), _tree(9)
  flags = tickets.prunable(scores)

  def loss(effective):
    return sum(jnp.sum((e - t) ** 2) for e, t in
               zip(jax.tree.leaves(effective), jax.tree.leaves(targets)))

  kept = tickets.kept_counts(scores, 0.5, flags)
  grads = jax.grad(lambda s: loss(tickets.masked_params(weights, s, kept, flags)))(scores)
  effective = tickets.apply_mask(weights, tickets.topk_mask(scores, kept, flags))
  effective_grads = jax.grad(loss)(effective)
  for path, flag in _named(flags).items():
    grad = _named(grads)[path]
    expected = (np.sign(_named(scores)[path]) * _named(weights)[path]
                * _named(effective_grads)[path] if flag else np.zeros(grad.shape))
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7, err_msg=path)


# ----------------------------------------------------------------------------- magnitude pruning


def _survivor_magnitudes(params, mask, paths):
  keep = np.concatenate([np.asarray(_named(mask)[p]).reshape(-1) for p in paths])
  magnitude = np.concatenate([np.abs(np.asarray(_named(params)[p])).reshape(-1) for p in paths])
  return keep, magnitude


def _survivors_kept(mask, flags, fraction):
  """AWS utils/prune.py on the host: of S survivors, int(S * (1 - fraction)) stay."""
  survivors = sum(int(np.sum(keep)) for keep, flag in
                  zip(jax.tree.leaves(mask), jax.tree.leaves(flags)) if flag)
  return int(survivors * (1 - fraction))


def test_prune_by_magnitude_global_keeps_host_count_of_largest_survivors():
  params = _tree(10)
  flags = tickets.prunable(params, classifier=False)
  chosen = [path for path, flag in _named(flags).items() if flag]
  prune = jax.jit(lambda mask, kept: tickets.prune_by_magnitude(params, mask, kept, flags))
  mask = jax.tree.map(lambda w: jnp.ones(w.shape, bool), params)
  for _ in range(6):
    old_keep, magnitude = _survivor_magnitudes(params, mask, chosen)
    kept = _survivors_kept(mask, flags, 0.3)
    new_mask = tickets.prune_by_magnitude(params, mask, kept, flags)
    for path, keep in _named(prune(mask, jnp.int32(kept))).items():
      np.testing.assert_array_equal(keep, _named(new_mask)[path], err_msg=path)
    new_keep, _ = _survivor_magnitudes(params, new_mask, chosen)
    assert new_keep.sum() == int(int(old_keep.sum()) * (1 - 0.3))
    assert not (new_keep & ~old_keep).any()  # nothing revived
    removed = old_keep & ~new_keep
    assert magnitude[removed].max() <= magnitude[new_keep].min()
    for path, flag in _named(flags).items():
      if not flag:
        assert np.asarray(_named(new_mask)[path]).all()
    mask = new_mask


def test_prune_by_magnitude_per_layer_and_ties():
  params = _tree(11, lambda rng, shape: rng.integers(-3, 4, shape))  # many equal magnitudes
  flags = tickets.prunable(params)
  scores = _tree(12)
  mask = tickets.topk_mask(scores, tickets.kept_counts(scores, 0.8, flags), flags)
  kept = jax.tree.map(lambda keep: int(int(np.sum(keep)) * 0.5), mask)
  new_mask = tickets.prune_by_magnitude(params, mask, kept, flags, scope="layer")
  for path, flag in _named(flags).items():
    if not flag:
      continue
    old = np.asarray(_named(mask)[path]).reshape(-1)
    new = np.asarray(_named(new_mask)[path]).reshape(-1)
    magnitude = np.abs(np.asarray(_named(params)[path])).reshape(-1)
    assert new.sum() == int(old.sum() * 0.5) and not (new & ~old).any(), path
    threshold = magnitude[new].min()
    assert (magnitude[new] >= threshold).all() and (magnitude[old & ~new] <= threshold).all()
    kept_ties = new[old & (magnitude == threshold)]  # in flat order
    assert 0 < kept_ties.sum() < kept_ties.size, path  # the tie was split
    np.testing.assert_array_equal(kept_ties, np.sort(kept_ties)[::-1], err_msg=path)


def test_prune_by_magnitude_never_revives_pruned_weights():
  params = _tree(13)
  flags = tickets.prunable(params)
  mask = tickets.topk_mask(params, tickets.kept_counts(params, 0.5, flags), flags)
  survivors = sum(int(np.sum(keep)) for keep, flag in zip(jax.tree.leaves(mask),
                                                          jax.tree.leaves(flags)) if flag)
  # More than the survivors: every survivor stays, and no pruned weight comes back.
  for scope, kept in (("global", survivors + 5),
                      ("layer", jax.tree.map(lambda keep: keep.size, mask))):
    new_mask = tickets.prune_by_magnitude(params, mask, kept, flags, scope=scope)
    chex.assert_trees_all_equal(new_mask, mask)


@pytest.mark.parametrize("ratio", [1.5, -0.2, float("nan"), [0.5, 2.0]])
def test_kept_counts_refuse_ratios_outside_0_1(ratio):
  params = _tree(0)
  with pytest.raises(ValueError, match="not in \\[0, 1\\]"):
    tickets.kept_counts(params, ratio, tickets.prunable(params))


def test_prune_by_magnitude_rejects_unknown_scope():
  params = _tree(0)
  flags, mask = tickets.prunable(params), jax.tree.map(lambda w: jnp.ones(w.shape, bool), params)
  with pytest.raises(ValueError) as error:
    tickets.prune_by_magnitude(params, mask, 10, flags, scope="block")
  _assert_one_line_error(error, "'block'")


# ----------------------------------------------------------------------------- signs


def test_transfer_signs_keeps_mask_and_signs_and_takes_new_magnitudes():
  trained, fresh = _tree(13), _tree(14)
  flags = tickets.prunable(trained, classifier=False)
  dense = jax.tree.map(lambda w: jnp.ones(w.shape, bool), trained)
  mask = tickets.prune_by_magnitude(trained, dense, _survivors_kept(dense, flags, 0.6), flags)
  signs = tickets.signs_of(tickets.apply_mask(trained, mask))
  where = tickets.prunable(trained, biases=True)
  moved = tickets.transfer_signs(fresh, signs, mask, where=where)
  new_mask = tickets.mask_from_signs(tickets.signs_of(moved), flags)
  for path, chosen in _named(where).items():
    new, old = np.asarray(_named(moved)[path]), np.asarray(_named(fresh)[path])
    if not chosen:
      np.testing.assert_array_equal(new, old, err_msg=path)
      continue
    keep = np.asarray(_named(mask)[path])
    np.testing.assert_array_equal(np.sign(new), np.sign(_named(trained)[path]) * keep)
    np.testing.assert_array_equal(np.abs(new)[keep], np.abs(old)[keep])
    np.testing.assert_array_equal(new[~keep], 0.0)
    if _named(flags)[path]:
      np.testing.assert_array_equal(_named(new_mask)[path], keep)
  assert all(np.asarray(leaf).dtype == np.int8 for leaf in jax.tree.leaves(signs))


# ----------------------------------------------------------------------------- validation


def test_mismatched_trees_raise_one_line_errors_naming_the_leaf():
  params = _tree(0)
  flags = tickets.prunable(params)
  mask = jax.tree.map(lambda w: jnp.ones(w.shape, bool), params)

  short = jax.tree.map(lambda m: m, mask)
  del short["block0"]["shortcut"]
  with pytest.raises(UserError) as error:
    tickets.apply_mask(params, short)
  _assert_one_line_error(error, "block0/shortcut/kernel")

  extra = jax.tree.map(lambda m: m, mask)
  extra["block0"]["conv"]["gate"] = jnp.ones((3,), bool)
  with pytest.raises(UserError) as error:
    tickets.apply_mask(params, extra)
  _assert_one_line_error(error, "block0/conv/gate")

  bent = jax.tree.map(lambda m: m, mask)
  bent["head"]["kernel"] = jnp.ones((10, 16), bool)
  with pytest.raises(UserError) as error:
    tickets.prune_by_magnitude(params, bent, 10, flags)
  _assert_one_line_error(error, "head/kernel", "(10, 16)", "(16, 10)")

  traced_flags = jax.tree.map(jnp.asarray, flags)
  with pytest.raises(ValueError) as error:
    tickets.topk_mask(params, tickets.kept_counts(params, 0.5, flags), traced_flags)
  _assert_one_line_error(error, "Python bool")


# ----------------------------------------------------------------------------- initializers


def test_init_scores_and_reinit_weights_draw_only_prunable_kernels():
  params = _tree(15)
  flags = tickets.prunable(params, shortcut=False)
  scores, fresh = jax.jit(lambda key_scores, key_weights: (
      tickets.init_scores(key_scores, params, flags),
      tickets.reinit_weights(key_weights, params, flags, fan_scale=0.5)))(
          _key(0), _key(1))
  for path, flag in _named(flags).items():
    score, weight = np.asarray(_named(scores)[path]), np.asarray(_named(fresh)[path])
    if not flag:
      assert not score.any()
      np.testing.assert_array_equal(weight, _named(params)[path])
      continue
    fan_in = math.prod(score.shape[:-1])
    assert np.abs(score).max() <= 1 / math.sqrt(fan_in) and np.abs(score).min() > 0
    np.testing.assert_allclose(np.abs(weight), math.sqrt(2 / (0.5 * fan_in)), rtol=1e-6)
    assert 0.3 < np.mean(weight > 0) < 0.7


# ----------------------------------------------------------------------------- accounting + model


def test_sparsity_report_counts_kept_entries():
  scores = _tree(16)
  flags = tickets.prunable(scores)
  mask = tickets.topk_mask(scores, tickets.kept_counts(scores, 0.25, flags), flags)
  report = tickets.sparsity_report(mask, flags)
  assert set(report["layers"]) == {p for p, flag in _named(flags).items() if flag}
  for path, layer in report["layers"].items():
    size = _named(scores)[path].size
    assert layer["total"] == size and layer["kept"] == _reference_kept(size, 0.25)
    assert layer["density"] == layer["kept"] / size
  assert report["total"] == sum(layer["total"] for layer in report["layers"].values())
  assert report["density"] == report["kept"] / report["total"]


def test_real_convnet3_params_on_digits_flops_counts_and_score_gradients():
  from jaxtickets.data import load_dataset, normalize, to_unit
  from jaxtickets.models import get_model

  model = get_model("convnet3", num_classes=10, width=16)
  digits = load_dataset("digits")
  images = normalize(to_unit(jnp.asarray(digits.train.images[:64])), digits.mean, digits.std)
  labels = jnp.asarray(digits.train.labels[:64])
  params = jax.jit(model.init)(_key(0), images[:1])["params"]
  flags = tickets.prunable(params)
  weights, scores = jax.jit(lambda key_weights, key_scores: (
      tickets.reinit_weights(key_weights, params, flags),
      tickets.init_scores(key_scores, params, flags)))(_key(1), _key(2))

  # ConvNet-3 on 8x8x1: 3x3 convs of 16 at 8x8, 4x4, 2x2 (avg-pool 2 after each), head 16 -> 10.
  kernel_sizes = {"stem/kernel": 9 * 16, "block1/conv/kernel": 9 * 16 * 16,
                  "block2/conv/kernel": 9 * 16 * 16, "head/kernel": 16 * 10}
  positions = {"stem/kernel": 64, "block1/conv/kernel": 16, "block2/conv/kernel": 4,
               "head/kernel": 1}
  kept = tickets.kept_counts(params, 0.3, flags)
  mask = tickets.topk_mask(scores, kept, flags)
  report = tickets.sparsity_report(mask, flags)
  assert set(report["layers"]) == set(kernel_sizes)
  assert all(report["layers"][path]["kept"] == _reference_kept(size, 0.3)
             for path, size in kernel_sizes.items())
  dense, effective = tickets.effective_flops(model, {"params": weights}, mask, images.shape)
  assert dense == sum(positions[path] * size for path, size in kernel_sizes.items())
  assert effective == pytest.approx(sum(
      positions[path] * size * report["layers"][path]["density"]
      for path, size in kernel_sizes.items()))

  def loss(scores):
    logits = model.apply({"params": tickets.masked_params(weights, scores, kept, flags)}, images,
                         train=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  grads = jax.jit(jax.grad(loss))(scores)
  for path, flag in _named(flags).items():
    assert bool(np.any(_named(grads)[path])) == flag, path
