"""A Winning Sign and linear mode connectivity on the sklearn digits, library and runner.

The ``small`` preset runs once for the module through the command line (and once more to
check that it resumes); the other tests use a BatchNorm ConvNet-3 of width 4 on 8x8 digits.
"""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from assertions import assert_fast_in_a_loop, assert_one_line_user_error, host_waits_of

from experiments import aws as runner
from experiments.configs import aws as aws_configs
from experiments.reports import aws as aws_report
from jaxtickets import aws, lmc, loop, models, population, tickets
from jaxtickets import data as data_lib
from jaxtickets import train as train_lib
from jaxtickets.errors import UserError

KEY = jax.random.PRNGKey(0)
SMALL = ["--config", "experiments/configs/aws.py:small"]


@pytest.fixture(scope="module")
def network(digits):
  """A BatchNorm ConvNet-3 of width 4: (apply_fn, params, batch_stats, prunable)."""
  model = models.get_model("convnet3", num_classes=10, width=4, norm="batch")
  params, batch_stats = train_lib.init_variables(KEY, model, digits.image_shape)
  return (train_lib.model_apply_fn(model, digits.mean, digits.std), params, batch_stats,
          aws.prunable_leaves(params))


@pytest.fixture(scope="module")
def data(digits):
  return train_lib.device_data(digits.train), train_lib.device_data(digits.test)


@pytest.fixture(scope="module")
def trained(network, data):
  """The network after two epochs of plain training: (params, batch_stats)."""
  apply_fn, params, batch_stats, _ = network
  optimizer = train_lib.sgd(0.05)
  state = train_lib.create_train_state(KEY, params, batch_stats, optimizer)
  step = train_lib.make_train_step(apply_fn, optimizer, batch_size=64, augment=None)
  state, _ = loop.fit(step, state, data[0], num_steps=44, eval_every=44, progress=False)
  return state.params, state.batch_stats


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
  """``python -m experiments.aws --config small``: (results, workdir)."""
  workdir = tmp_path_factory.mktemp("aws") / "small"
  runner.main([*SMALL, "--workdir", str(workdir)])
  return json.loads((workdir / "results.json").read_text()), workdir


def paths_of(tree):
  return ["/".join(str(key.key) for key in path) for path, _ in jax.tree.leaves_with_path(tree)]


def random_params(shapes, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda leaf: jnp.asarray(rng.standard_normal(leaf.shape), jnp.float32),
                      shapes)


def pruned(params, prunable, fraction):
  """``aws.prune`` of a dense network by one round removing ``fraction``: (params, mask)."""
  _, kept = aws.survivor_counts(aws.num_prunable(params, prunable), 1, fraction)
  return aws.prune(params, aws.dense_mask(params), prunable, kept)


# ----------------------------------------------------------------------------------------------
# Pruning


def test_global_pruning_removes_20_percent_of_survivors_and_keeps_the_rest_dense():
  model = models.get_model("resnet20", num_classes=10, width=4, stage_sizes=(1, 1))
  shapes = jax.eval_shape(lambda: model.init(KEY, jnp.zeros((1, 8, 8, 1)), train=False))
  params = random_params(shapes["params"])
  prunable = aws.prunable_leaves(params)
  flags = dict(zip(paths_of(params), jax.tree.leaves(prunable)))
  assert flags["stem/kernel"] and flags["layer2_0/shortcut/kernel"] and not flags["head/kernel"]
  assert not any(flag for path, flag in flags.items() if "norm" in path or "bias" in path)

  # The kept count is traced: one compiled cut serves every round.
  prune = jax.jit(lambda params, mask, kept: aws.prune(params, mask, prunable, kept))
  mask = aws.dense_mask(params)
  survivors = aws.survivor_counts(aws.num_prunable(params, prunable), 3, 0.2)
  assert survivors[0] == tickets.sparsity_report(mask, prunable)["total"]
  for kept_count in survivors[1:]:
    pruned, mask = prune(params, mask, np.int32(kept_count))
    report = tickets.sparsity_report(mask, prunable)
    assert report["kept"] == kept_count
    # One global threshold: every kept weight is at least as large as every pruned one.
    kept, removed = [], []
    for flag, weight, keep in zip(*map(jax.tree.leaves, (prunable, params, mask))):
      if flag:
        kept.append(np.abs(weight)[np.asarray(keep)])
        removed.append(np.abs(weight)[~np.asarray(keep)])
    assert np.concatenate(removed).max() <= np.concatenate(kept).min()
    for path, flag, keep, value, original in zip(paths_of(params), *map(jax.tree.leaves, (
        prunable, mask, pruned, params))):
      if not flag:  # classifier, biases and norms stay dense and untouched
        assert np.all(keep), path
        np.testing.assert_array_equal(value, original)
      else:
        assert np.all(np.asarray(value)[~np.asarray(keep)] == 0), path
  # Layers are pruned unevenly: the threshold is global, not per layer.
  densities = [layer["density"] for layer in report["layers"].values()]
  assert max(densities) - min(densities) > 0.05


def test_next_round_prunes_resets_the_optimizer_and_rewinds_on_request(network):
  _, params, batch_stats, prunable = network
  optimizer = train_lib.sgd(0.1)
  start = aws.init_sparse_state(KEY, params, batch_stats, aws.dense_mask(params), True,
                                optimizer)
  # The end of a round: other weights and statistics, 7 steps in, a moving momentum buffer.
  end = aws.init_sparse_state(KEY, random_params(params, seed=3), random_params(batch_stats),
                              aws.dense_mask(params), True, optimizer)
  end = end._replace(train=end.train._replace(
      step=jnp.int32(7), opt_state=jax.tree.map(jnp.ones_like, end.train.opt_state)))
  kept = aws.survivor_counts(aws.num_prunable(params, prunable), 1, 0.2)[1]
  expected_params, expected_mask = aws.prune(end.train.params, end.mask, prunable, kept)
  new_key = jax.random.PRNGKey(9)
  for rewind, (from_params, from_stats) in ((None, (expected_params, end.train.batch_stats)),
                                            (start, (params, batch_stats))):
    new = aws.next_round(end, optimizer, prunable, kept=kept, key=new_key, rewind=rewind)
    # The mask comes from the trained weights either way; IMP then restarts from ``rewind``.
    chex.assert_trees_all_equal(new.mask, expected_mask)
    chex.assert_trees_all_equal(new.train.params, tickets.apply_mask(from_params, expected_mask))
    chex.assert_trees_all_equal(new.train.batch_stats, from_stats)
    assert int(new.train.step) == 0 and bool(new.aws)
    np.testing.assert_array_equal(new.train.key, new_key)
    assert all(float(jnp.abs(leaf).max()) == 0 for leaf in jax.tree.leaves(new.train.opt_state))


def test_survivor_counts_are_the_references_float64_floor():
  assert aws.survivor_counts(1000, 3, 0.2) == [1000, 800, 640, 512]
  assert aws.survivor_counts(5, 2, 0.2) == [5, 4, 3]  # ceil(0.2 S) go, not int(0.2 S)
  # 1 - 0.9 is 0.09999999999999998 in float64: of 10 survivors none stays, as in the reference.
  assert aws.survivor_counts(10, 1, 0.9) == [10, 0]


def test_density_schedule_and_its_bad_input():
  assert aws_configs.rounds_for_densities((0.64, 0.8**15, 0.8), 15, 0.2) == (2, 15, 1)
  for densities in ((0.0,), (1.5,), (-0.2,)):
    assert_one_line_user_error(lambda: aws_configs.rounds_for_densities(densities, 15, 0.2),
                               "density must be")
  assert_one_line_user_error(lambda: aws_configs.rounds_for_densities((0.01,), 3, 0.2),
                             "nearest round 21")
  assert_one_line_user_error(lambda: aws_configs.rounds_for_densities((1.0,), 3, 0.2),
                             "nearest round 0")


# ----------------------------------------------------------------------------------------------
# AWS training


def test_norm_interpolation_is_the_line_to_initialized_norms(network):
  _, params, _, _ = network
  params = random_params(params, seed=1)
  norms = dict(zip(paths_of(params), jax.tree.leaves(aws.norm_leaves(params))))
  assert norms["stem_norm/scale"] and norms["block1/norm/bias"] and not norms["head/bias"]
  for alpha in (0.0, 0.3, 1.0):
    moved = aws.interpolate_norms(params, alpha)
    for path, is_norm, new, old in zip(paths_of(params), jax.tree.leaves(aws.norm_leaves(params)),
                                       jax.tree.leaves(moved), jax.tree.leaves(params)):
      if not is_norm:
        np.testing.assert_array_equal(new, old)
      elif path.endswith("scale"):
        np.testing.assert_allclose(new, alpha + (1 - alpha) * old, rtol=1e-6)
      else:
        np.testing.assert_allclose(new, (1 - alpha) * old, rtol=1e-6)
  chex.assert_trees_all_equal(aws.interpolate_norms(params, 0.0), params)


def test_aws_draws_one_alpha_per_step_for_every_norm_layer(network, data):
  apply_fn, params, batch_stats, _ = network
  params = random_params(params, seed=2)
  x = data_lib.to_unit(data[0].images[:32])
  mask = aws.dense_mask(params)
  key = jax.random.PRNGKey(7)
  logits, stats = jax.jit(lambda key: aws.aws_apply_fn(apply_fn, mask, True)(
      params, batch_stats, x, True, key))(key)
  alpha = jax.random.uniform(key)
  expected, expected_stats = apply_fn(aws.interpolate_norms(params, alpha), batch_stats, x, True)
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(stats, expected_stats, rtol=1e-5, atol=1e-6)
  # Evaluation never interpolates.
  evaluated, _ = aws.aws_apply_fn(apply_fn, mask, True)(params, batch_stats, x, False)
  np.testing.assert_array_equal(evaluated, apply_fn(params, batch_stats, x, False)[0])
  # Without AWS, train mode needs no key (BatchNorm recalibration calls it without one).
  plain, _ = aws.aws_apply_fn(apply_fn, mask, False)(params, batch_stats, x, True)
  np.testing.assert_array_equal(plain, apply_fn(params, batch_stats, x, True)[0])


def test_aws_with_alpha_zero_is_plain_training(network, data):
  apply_fn, params, batch_stats, _ = network
  optimizer = train_lib.sgd(0.1)
  plain = train_lib.make_train_step(apply_fn, optimizer, batch_size=32, augment=None)
  sparse = aws.make_sparse_step(apply_fn, optimizer, batch_size=32, augment=None)

  @jax.jit
  def three_steps(aws_flag):
    plain_state = train_lib.create_train_state(KEY, params, batch_stats, optimizer)
    state = aws.init_sparse_state(KEY, params, batch_stats, aws.dense_mask(params), aws_flag,
                                  optimizer)
    for _ in range(3):
      plain_state, _ = plain(plain_state, data[0])
      state, _ = sparse(state, data[0])
    return plain_state, state.train

  plain_state, lrr_state = three_steps(False)
  # Equal up to the summation order XLA picks for two differently fused programs (1 ulp).
  chex.assert_trees_all_close(lrr_state, plain_state, rtol=1e-6, atol=1e-8)
  _, aws_state = three_steps(True)
  assert not np.array_equal(aws_state.params["stem_norm"]["scale"],
                            plain_state.params["stem_norm"]["scale"])


def test_aws_population_step_runs_fast_in_a_loop(network, data):
  apply_fn, params, batch_stats, prunable = network
  optimizer = train_lib.sgd(0.1)
  _, mask = pruned(params, prunable, 0.5)
  states = population.stack([aws.init_sparse_state(KEY, params, batch_stats, mask, flag,
                                                   optimizer) for flag in (False, True)])
  # LRR and AWS members with the runner's crop + flip augmentation.
  step = population.run(aws.make_sparse_step(apply_fn, optimizer, batch_size=32))
  assert_fast_in_a_loop(step, states, data[0])


def test_pruned_weights_stay_exactly_zero_while_the_rest_trains(network, data):
  apply_fn, params, batch_stats, prunable = network
  optimizer = train_lib.sgd(0.1)
  step = population.run(aws.make_sparse_step(apply_fn, optimizer, batch_size=32, augment=None))

  @jax.jit
  def run(states):
    for _ in range(4):
      states, _ = step(states, data[0])
    return states

  _, mask = pruned(params, prunable, 0.5)
  initial = population.stack([aws.init_sparse_state(KEY, params, batch_stats, mask, flag,
                                                    optimizer) for flag in (False, True)])
  final = run(initial)
  for index in range(2):
    for path, flag, new, old, keep in zip(paths_of(params), *map(jax.tree.leaves, (
        prunable, population.select(final.train.params, index), initial.train.params, mask))):
      new, old, keep = np.asarray(new), np.asarray(old)[index], np.asarray(keep)
      assert np.all(new[~keep] == 0), path
      assert np.mean(new[keep] != old[keep]) > 0.9, path  # kept weights, head and norms train


# ----------------------------------------------------------------------------------------------
# Transfer


def test_sign_transfer_keeps_the_mask_and_the_signs_on_fresh_magnitudes(network):
  _, params, batch_stats, prunable = network
  trained = random_params(params, seed=3)
  trained_stats = jax.tree.map(lambda leaf: leaf + 0.5, batch_stats)
  fresh = random_params(params, seed=4)
  _, mask = pruned(trained, prunable, 0.6)
  new, stats, new_mask = jax.jit(lambda *args: aws.transfer("sign", *args, prunable))(
      trained, trained_stats, mask, fresh, batch_stats)
  chex.assert_trees_all_equal(new_mask, mask)
  chex.assert_trees_all_equal(stats, batch_stats)
  norms = jax.tree.leaves(aws.norm_leaves(params))
  for path, is_norm, value, keep, old, init in zip(paths_of(params), norms, *map(
      jax.tree.leaves, (new, mask, trained, fresh))):
    value, keep, old, init = map(np.asarray, (value, keep, old, init))
    if is_norm:  # norm params are reset
      np.testing.assert_array_equal(value, init)
    else:  # kernels (classifier included) and biases: fresh magnitude, trained sign
      np.testing.assert_array_equal(value[keep], np.abs(init[keep]) * np.sign(old[keep]))
      assert np.all(value[~keep] == 0), path

  masked, mask_stats, same = aws.transfer("mask", trained, trained_stats, mask, fresh,
                                          batch_stats, prunable)
  chex.assert_trees_all_equal(masked, tickets.apply_mask(fresh, mask))
  chex.assert_trees_all_equal(same, mask)
  chex.assert_trees_all_equal(mask_stats, batch_stats)
  retrained, retrain_stats, _ = aws.transfer("retrain", trained, trained_stats, mask, fresh,
                                             batch_stats, prunable)
  chex.assert_trees_all_equal(retrained, tickets.apply_mask(trained, mask))
  chex.assert_trees_all_equal(retrain_stats, trained_stats)
  with pytest.raises(ValueError, match="unknown transfer 'signs'"):
    aws.transfer("signs", trained, trained_stats, mask, fresh, batch_stats, prunable)


# ----------------------------------------------------------------------------------------------
# Linear mode connectivity


def test_recalibration_from_reset_reproduces_a_plain_pass(network, data):
  apply_fn, params, batch_stats, _ = network
  params = random_params(params, seed=5)
  used = jax.tree.map(lambda leaf: leaf + 3.0, batch_stats)  # stale statistics are discarded
  key, batch_size = jax.random.PRNGKey(11), 100
  recalibrated = jax.jit(lambda params, stats: lmc.recalibrate(
      apply_fn, params, stats, data[0], key, batch_size=batch_size))(params, used)
  order_key = jax.random.split(key)[0]
  statistics = lmc.reset_batch_stats(batch_stats)
  for index in range(data[0].labels.shape[0] // batch_size):
    images, _ = data_lib.get_batch(order_key, index, data[0].images, data[0].labels, batch_size)
    _, statistics = apply_fn(params, statistics, data_lib.to_unit(images), True)
  chex.assert_trees_all_close(recalibrated, statistics, rtol=1e-5, atol=1e-6)
  assert not np.allclose(statistics["stem_norm"]["mean"], 0)


def test_barrier_of_a_model_with_itself_is_zero(network, trained, data):
  apply_fn, _, batch_stats, prunable = network
  params, mask = pruned(trained[0], prunable, 0.5)
  curve = lmc.make_error_curve(apply_fn, num_points=5, batch_size=100)
  result = lmc.connectivity(curve, params, mask, params, mask, batch_stats, *data, KEY)
  assert len(result["errors"]) == 5 and len(set(result["errors"])) == 1
  assert result["barrier"] == 0.0
  other = aws.initialized_norms(params)
  moved = lmc.connectivity(curve, params, mask, other, mask, batch_stats, *data, KEY)
  assert len(set(moved["errors"])) > 1
  # Its recalibration and evaluation loops have static trip counts (no GPU host waits).
  assert host_waits_of(curve, params, other, batch_stats, *data, KEY) == []
  # A single network evaluated alone gives the curve's endpoint.
  statistics = lmc.recalibrate(apply_fn, params, batch_stats, data[0], KEY, batch_size=100)
  alone = 1 - train_lib.evaluate(apply_fn, params, statistics, data[1])["accuracy"]
  assert moved["errors"][0] == pytest.approx(float(alone), abs=1.5 / data[1].labels.shape[0])


def test_barrier_definition():
  assert lmc.barrier([0.1, 0.3, 0.1]) == pytest.approx(0.2)
  assert lmc.barrier([0.1, 0.1, 0.3]) == pytest.approx(0.1)  # endpoints count, as in AWS
  with pytest.raises(ValueError, match=r"got shape \(1,\)"):
    lmc.barrier([0.2])
  # A stack of curves is not one long curve (its endpoints would come from different curves).
  with pytest.raises(ValueError, match=r"one error curve .* got shape \(2, 3\)"):
    lmc.barrier([[0.1, 0.5, 0.1], [0.3, 0.3, 0.3]])


def test_lmc_refuses_two_different_masks(network, data):
  _, params, batch_stats, prunable = network
  _, mask_a = pruned(random_params(params, seed=7), prunable, 0.5)
  _, mask_b = pruned(random_params(params, seed=8), prunable, 0.5)
  with pytest.raises(ValueError, match="needs one mask; leaf '.*conv/kernel'"):
    lmc.connectivity(None, params, mask_a, params, mask_b, batch_stats, *data, KEY)


# ----------------------------------------------------------------------------------------------
# Runner


def test_small_run_writes_results_report_and_figures(small_run):
  results, workdir = small_run
  assert (workdir / "report.md").read_text().count("![") == 3
  for name in ("aws_accuracy_vs_density", "aws_barriers", "aws_error_curves"):
    assert (workdir / f"{name}.png").stat().st_size > 0
  config = aws_configs.get_config("small")
  densities = [0.5**k for k in range(1, config.pruning.rounds + 1)]
  for method in ("lrr", "aws"):
    pruning = results["pruning"][method]
    assert pruning["ticket_density"] == pytest.approx(densities, abs=1e-3)
    # Round r prunes round r - 1's network and trains at the new mask: its ticket.
    assert pruning["density"] == pytest.approx([1.0] + densities, abs=1e-3)
    # Transfers train with their mask fixed: the sign transfer keeps the ticket's density.
    for variant in config.transfer.variants:
      curve = results["transfer"][f"{method}_{variant}"]
      assert curve["density"] == pytest.approx(
          [pruning["ticket_density"][curve["round"][0] - 1]])
    assert len(results["barriers"]["init_norm"][method]) == config.pruning.rounds
    # Both pair families, at the transferred density, on the ticket's mask.
    for family in ("sign_vs_retrain", "sign_seeds"):
      (pair,) = results["barriers"][family][method]
      assert pair["density"] == pytest.approx(results["transfer"][f"{method}_sign"]["density"][0])
      assert len(pair["errors"]) == config.lmc.num_points
    # Two seeds: one accuracy per seed at each point.
    assert [len(a) for a in results["transfer"][f"{method}_sign"]["accuracy"]] == [2]
  assert results["study"] == "aws" and results["transfer"]["dense"]["density"] == [1.0]
  assert set(aws_report.findings(results)) == {"init_norm_barrier", "sign_transfer_accuracy"}


def test_transfers_keep_the_mask_of_their_own_methods_ticket(small_run):
  # LRR's and AWS's tickets of a round have equal densities: only their masks tell which one a
  # transfer started from. The finished stages restore from the workdir without training.
  _, workdir = small_run
  config = aws_configs.get_config("small")
  context = runner.make_context(config, workdir, False)
  trained, _ = runner.pruning_stage(context)
  members, finals, _ = runner.transfer_stage(context, trained, aws_configs.check_config(config))
  checked = 0
  for index, member in enumerate(members):
    if member.source == "dense":
      continue
    masks = trained[member.round].mask
    own, other = (population.select(masks, config.methods.index(method))
                  for method in (member.source, *set(config.methods) - {member.source}))
    mask = population.select(finals.mask, index)
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, mask, own)))
    assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, mask, other)))
    checked += 1
  assert checked == len([member for member in members if member.source != "dense"]) > 0


def test_small_run_resumes_without_training_again(small_run):
  results, workdir = small_run
  logs = sorted(workdir.glob("**/metrics.jsonl"))
  before = [path.read_text() for path in logs]
  runner.main([*SMALL, "--workdir", str(workdir)])
  assert [path.read_text() for path in logs] == before
  assert json.loads((workdir / "results.json").read_text()) == results


def test_sharded_populations_are_checked_before_anything_trains(monkeypatch):
  # On 2 devices the 2 pruning members split, so the later stages' sizes decide: the small
  # preset's 14 transfer members in groups, and its 11-point error curve.
  monkeypatch.setattr(jax, "device_count", lambda: 2)
  config = aws_configs.get_config("small")
  config.strategy = "shard"
  assert_one_line_user_error(lambda: aws_configs.check_config(config),
                             "the error curve (lmc.num_points): 11 members")
  config.lmc.num_points = 4
  config.transfer.population_size = 3
  assert_one_line_user_error(lambda: aws_configs.check_config(config),
                             "a transfer group: 3 members")
  config.transfer.population_size = 4  # Groups of 4, 4, 4 and 2.
  aws_configs.check_config(config)


def test_unknown_preset_is_a_user_error():
  with pytest.raises(UserError, match="unknown config preset 'cifar'"):
    aws_configs.get_config("cifar")
