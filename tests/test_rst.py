"""Robust Scratch Tickets and R2S on the sklearn digits (8x8), through the library and the runner.

The ``small`` preset runs once for the module (two tickets searched adversarially and naturally,
evaluated and switched); most tests read its results and states.
"""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import build
from experiments import report as report_runner
from experiments import rst as runner
from experiments.configs import rst as rst_configs
from jaxtickets import attacks, checkpoint, models, population, rst, tickets
from jaxtickets import data as data_lib
from jaxtickets import train as train_lib

from assertions import assert_fast_in_a_loop

KEY = jax.random.key(0)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
  """The ``small`` preset's results (with ``"stages"``), its config and its workdir."""
  config = rst_configs.get_config("small")
  workdir = tmp_path_factory.mktemp("rst") / "small"
  return runner.train_and_evaluate(config, workdir, progress=False), config, workdir


@pytest.fixture(scope="module")
def tiny_network(digits):
  """A ConvNet-3 of width 4 with RST's options on 8x8 digits.

  Returns:
    (apply_fn, params, batch_stats, prunable).
  """
  model = models.get_model("convnet3", num_classes=10, width=4, **rst.MODEL_OPTIONS)
  params, batch_stats = train_lib.init_variables(KEY, model, digits.image_shape)
  return (train_lib.model_apply_fn(model, digits.mean, digits.std), params, batch_stats,
          tickets.prunable(params))


def zero_params(name, **options):
  """Zero params of an RST model ``name`` for 8x8x1 images (shapes via ``jax.eval_shape``)."""
  model = models.get_model(name, num_classes=10, **options, **rst.MODEL_OPTIONS)
  shapes = jax.eval_shape(lambda: model.init(KEY, jnp.zeros((1, 8, 8, 1)), train=False))
  return jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), shapes["params"])


def reference_kept(numel, keep_ratio):
  """RST's GetSubnet: zero the int((1 - k) * numel) smallest scores."""
  return numel - int((1 - keep_ratio) * numel)


# ----------------------------------------------------------------------------------------------
# Tickets


def test_ticket_keeps_the_reference_count_in_every_layer():
  params = zero_params("resnet20", width=5, stage_sizes=(1, 1))
  prunable = tickets.prunable(params)
  # Every parameter of an RST network is a masked kernel: stem, shortcuts and classifier too.
  names = ["/".join(str(k.key) for k in path) for path, _ in jax.tree.leaves_with_path(params)]
  assert all(jax.tree.leaves(prunable)) and "head/kernel" in names and "stem/kernel" in names
  assert any("shortcut/kernel" in name for name in names)
  rng = np.random.default_rng(0)
  scores = jax.tree.map(lambda leaf: rng.standard_normal(leaf.shape).astype(np.float32), params)
  for keep_ratio in (0.05, 0.3, 0.9, 1.0):  # (1 - 0.9) * 10 = 0.999...: 10 of 10 are kept
    kept = tickets.kept_counts(params, keep_ratio, prunable)
    mask = jax.jit(lambda scores, kept: rst.ticket_mask(rst.Ticket(params, scores, kept),
                                                        prunable))(scores, kept)
    for path, keep in jax.tree.leaves_with_path(mask):
      assert int(keep.sum()) == reference_kept(keep.size, keep_ratio), (path, keep_ratio)


def test_weights_are_signed_kaiming_constants_shared_by_the_weight_key():
  params = zero_params("convnet3", width=4)
  prunable = tickets.prunable(params)
  draw = jax.jit(lambda score_key, kept: rst.init_ticket(KEY, score_key, params, kept,
                                                         prunable))
  first = draw(jax.random.key(1), tickets.kept_counts(params, 0.1, prunable))
  second = draw(jax.random.key(2), tickets.kept_counts(params, 0.5, prunable))
  for weight, other, score, other_score in zip(*map(jax.tree.leaves, (
      first.weights, second.weights, first.scores, second.scores))):
    np.testing.assert_array_equal(weight, other)
    np.testing.assert_allclose(np.abs(weight), np.sqrt(2 / np.prod(weight.shape[:-1])),
                               rtol=1e-6)
    assert np.mean(np.sign(weight) > 0) == pytest.approx(0.5, abs=0.2)
    assert not np.array_equal(score, other_score)
    bound = 1 / np.sqrt(np.prod(score.shape[:-1]))  # kaiming_uniform(a=sqrt(5))
    assert np.abs(score).max() <= bound


# ----------------------------------------------------------------------------------------------
# Attacks


def test_pgd_on_a_linear_model_reaches_the_closed_form_worst_case(digits):
  is_binary = digits.test.labels < 2
  x = data_lib.to_unit(jnp.asarray(digits.test.images[is_binary]))
  y = jnp.asarray(digits.test.labels[is_binary])
  params = {"w": 0.1 * jax.random.normal(KEY, (64, 2)), "b": jnp.array([0.2, -0.2])}

  def linear(params, batch_stats, x, train, key=None):
    return x.reshape(x.shape[0], -1) @ params["w"] + params["b"], batch_stats

  # Cross-entropy falls with the margin (w_y - w_other) . x + b_y - b_other, so the worst point
  # of the Linf ball within [0, 1] moves every pixel by eps against w_y - w_other.
  direction = (params["w"][:, y] - params["w"][:, 1 - y]).T.reshape(x.shape)
  moves = direction != 0
  eps = 8 / 255
  worst = jnp.clip(x - eps * jnp.sign(direction), 0.0, 1.0)

  def loss(x):
    return optax.softmax_cross_entropy_with_integer_labels(linear(params, {}, x, False)[0], y)

  train_attack = rst.TrainingAttack()
  for options in ({"num_steps": train_attack.num_steps, "random_start": False},  # RST's PGD-7
                  {"num_steps": 20, "random_start": True}):
    result = attacks.pgd(linear, params, {}, x, y, KEY, eps=train_attack.eps,
                         step_size=train_attack.step_size, **options)
    np.testing.assert_array_equal(np.asarray(result.x_adv)[np.asarray(moves)],
                                  np.asarray(worst)[np.asarray(moves)])
    np.testing.assert_allclose(loss(result.x_adv), loss(worst), rtol=1e-6)
    assert float(jnp.min(loss(worst) - loss(x))) > 0


def test_training_attack_batch_norm_modes(digits):
  # A network that answers the opposite way in eval mode and counts its train-mode passes in
  # its running statistics: the attack's mode shows in the adversarial loss, its updates in the
  # count.
  def network(params, batch_stats, x, train, key=None):
    logits = x.reshape(x.shape[0], -1) @ (params if train else -params)
    return logits, {"passes": batch_stats["passes"] + 1} if train else batch_stats

  weights = jax.random.normal(KEY, (int(np.prod(digits.image_shape)), 10))
  optimizer = train_lib.sgd(0.0)
  data = train_lib.device_data(digits.train)
  passes, losses = {}, {}
  for batch_norm in rst.ATTACK_BATCH_NORM:
    attack = rst.TrainingAttack(eps=0.2, step_size=0.1, num_steps=3, random_start=False,
                                batch_norm=batch_norm)
    step = rst.make_adversarial_train_step(network, optimizer, batch_size=64, augment=None,
                                           attack=attack)
    state = train_lib.create_train_state(KEY, weights, {"passes": jnp.zeros((), jnp.int32)},
                                         optimizer)
    state, metrics = jax.jit(step)(state, data)
    passes[batch_norm], losses[batch_norm] = int(state.batch_stats["passes"]), metrics["loss"]
  # Training itself is one pass; only "update" keeps the attack's 3 gradient passes.
  assert passes == {"update": 4, "batch": 1, "eval": 1}
  # "update" and "batch" attack the train-mode network, "eval" the (opposite) eval-mode one.
  assert float(losses["update"]) == float(losses["batch"]) > float(losses["eval"]) + 1


def test_apgd_is_at_least_as_strong_as_pgd20_on_the_searched_tickets(small_run):
  results, _, _ = small_run
  test_size = results["split_sizes"]["test"]
  pairs = [(table["apgd_ce"], table["pgd"]) for tables in results["tickets"].values()
           for table in tables.values()]
  apgd, pgd = np.array(pairs).transpose(1, 0, 2).reshape(2, -1)
  # Counts of robust examples: at most one of random-start luck.
  assert np.all(np.round(apgd * test_size) <= np.round(pgd * test_size) + 1)
  assert apgd.mean() < pgd.mean()


# ----------------------------------------------------------------------------------------------
# Search


def test_adversarial_search_trains_scores_only(small_run):
  results, config, _ = small_run
  _, params, _ = runner.network(config, build.dataset(config),
                                runner.seed_key(config, "model_init"), **rst.MODEL_OPTIONS)
  prunable = tickets.prunable(params)
  initial = runner.initial_tickets(config, params, prunable)
  for name in ("rst", "natural"):
    stage = results["stages"][name]
    for trained in (stage.last.train.params, stage.best["params"]):
      chex.assert_trees_all_equal(trained["weights"], initial.weights)
      moved = jax.tree.map(lambda new, old: float(jnp.mean(new != old)), trained["scores"],
                           initial.scores)
      assert min(jax.tree.leaves(moved)) > 0.5, (name, moved)


def test_r2s_search_step_runs_fast_in_a_loop(digits, tiny_network):
  apply_fn, params, batch_stats, prunable = tiny_network
  optimizer = rst.score_optimizer(0.1)

  def member(kept):
    ticket = rst.init_ticket(KEY, jax.random.key(1), params, kept, prunable)
    return rst.init_search_state(KEY, ticket, batch_stats, optimizer)

  # Crops, PGD and the masks' top-k of two tickets, as the runner's R2S search compiles them.
  step = population.run(rst.make_search_step(apply_fn, optimizer, prunable, batch_size=16))
  states = jax.vmap(member)(tickets.kept_counts(params, [0.3, 0.5], prunable))
  assert_fast_in_a_loop(step, states, train_lib.device_data(digits.train))


def test_population_step_equals_its_members_run_one_at_a_time(digits, tiny_network):
  apply_fn, params, batch_stats, prunable = tiny_network
  optimizer = rst.score_optimizer(0.1)
  step = rst.make_search_step(apply_fn, optimizer, prunable, batch_size=16, augment=None,
                              attack=rst.TrainingAttack(num_steps=2))
  kept = tickets.kept_counts(params, [0.3, 0.5], prunable)
  ticket = rst.init_ticket(KEY, jax.random.key(1), params, kept, prunable)
  keys = jax.random.split(jax.random.PRNGKey(0))  # Raw keys: the states are compared as arrays.
  states = jax.vmap(lambda ticket, key: rst.init_search_state(key, ticket, batch_stats,
                                                              optimizer),
                    in_axes=(rst.Ticket(None, None, 0), 0))(ticket, keys)
  data = train_lib.device_data(digits.train)
  for strategy in ("vmap", "map"):
    together, metrics = jax.jit(population.run(step, strategy=strategy))(states, data)
    for member in range(2):
      alone, alone_metrics = jax.jit(step)(population.select(states, member), data)
      chex.assert_trees_all_close(population.select(together, member), alone, atol=1e-5)
      chex.assert_trees_all_close(population.select(metrics, member), alone_metrics, atol=1e-5)


def test_search_step_sorts_each_layer_once(digits, tiny_network):
  apply_fn, params, batch_stats, prunable = tiny_network
  optimizer = rst.score_optimizer(0.1)
  kept = tickets.kept_counts(params, 0.5, prunable)
  ticket = jax.jit(lambda: rst.init_ticket(KEY, jax.random.key(1), params, kept, prunable))()
  state = rst.init_search_state(KEY, ticket, batch_stats, optimizer)
  step = rst.make_search_step(apply_fn, optimizer, prunable, batch_size=16, augment=None)
  data = train_lib.device_data(digits.train)
  run = jax.jit(step)

  def sorts(jaxpr, in_loop=False):
    """(inside a loop, dtype) of every sort in ``jaxpr`` and its sub-jaxprs."""
    found = []
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "sort":
        found.append((in_loop, eqn.invars[0].aval.dtype))
      for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else (value,):
          inner = getattr(sub, "jaxpr", sub)
          if hasattr(inner, "eqns"):
            found += sorts(inner, in_loop or eqn.primitive.name in ("while", "scan"))
    return found

  score_sorts = [in_loop for in_loop, dtype in sorts(jax.make_jaxpr(run)(state, data).jaxpr)
                 if dtype == jnp.float32]
  num_layers = sum(jax.tree.leaves(prunable))
  # The attack loop never sorts; the attack and the training forward each form the mask once.
  assert score_sorts == [False] * (2 * num_layers)
  # XLA merges the two identical sorts: the compiled step sorts each layer's scores once.
  hlo = run.lower(state, data).compile().as_text()
  assert len(re.findall(r"= f32\[\d+\]\S* sort\(", hlo)) == num_layers


def test_adversarial_tickets_are_more_robust_than_natural_ones(small_run):
  results, _, _ = small_run
  adversarial = np.array(results["tickets"]["rst"]["last"]["pgd"])
  natural = np.array(results["tickets"]["natural"]["last"]["pgd"])
  assert np.all(adversarial > natural)
  assert np.mean(adversarial - natural) > 0.05


def test_population_members_keep_their_own_counts(small_run):
  results, config, _ = small_run
  stage = results["stages"]["rst"]
  searched = stage.last.train.params
  subnetworks = jax.jit(stage.subnetworks)(searched)  # i32[K] kept counts, vmapped
  for member, keep_ratio in enumerate(config.keep_ratios):
    weights = population.select(subnetworks, member)
    prunable = tickets.prunable(weights)
    kept = tickets.kept_counts(weights, keep_ratio, prunable)
    chex.assert_trees_all_equal(population.select(stage.last.kept, member), kept)
    single = jax.jit(lambda params: rst.subnetwork(rst.ticket_of(params, kept), prunable))(
        population.select(searched, member))
    for (path, leaf), single_leaf in zip(jax.tree.leaves_with_path(weights),
                                         jax.tree.leaves(single)):
      assert int(jnp.count_nonzero(leaf)) == reference_kept(leaf.size, keep_ratio), path
      np.testing.assert_array_equal(leaf, single_leaf)


def test_last_and_best_states_are_checkpointed_and_restored(small_run):
  results, _, workdir = small_run
  stage = results["stages"]["rst"]
  with checkpoint.Checkpointer(workdir / "rst" / "checkpoints") as checkpointer:
    chex.assert_trees_all_equal(checkpointer.restore(stage.last), stage.last)
  restored = runner.BestStates(workdir / "rst" / "best", stage.last.train)
  chex.assert_trees_all_equal(restored.best, stage.best)
  restored.close()
  val_scores = np.array([record["val_pgd_accuracy"] for record in stage.records])
  np.testing.assert_allclose(stage.best["score"], val_scores.max(axis=0))


# ----------------------------------------------------------------------------------------------
# Fine-tuning and R2S


def test_finetune_stage_trains_the_selected_tickets_kept_weights(small_run):
  results, config, _ = small_run
  selected, finetuned = results["stages"]["rst"].best["params"], results["stages"]["finetune"]
  for member, keep_ratio in enumerate(config.keep_ratios):
    params = population.select(selected, member)
    prunable = tickets.prunable(params["weights"])
    ticket = rst.ticket_of(params, tickets.kept_counts(params["weights"], keep_ratio, prunable))
    mask = rst.ticket_mask(ticket, prunable)
    chex.assert_trees_all_equal(population.select(finetuned.last.mask, member), mask)
    weights = population.select(finetuned.last.train.params, member)
    for new, old, keep in zip(*map(jax.tree.leaves, (weights, ticket.weights, mask))):
      assert np.mean(np.asarray(new != old)[np.asarray(keep)]) > 0.5
  table = results["tickets"]["finetune"]["last"]
  assert len(table["clean"]) == len(config.keep_ratios) and min(table["clean"]) > 0.3


def test_finetuning_trains_only_the_kept_weights(digits, tiny_network):
  apply_fn, params, batch_stats, prunable = tiny_network
  kept = tickets.kept_counts(params, 0.3, prunable)

  @jax.jit
  def draw():
    ticket = rst.init_ticket(KEY, jax.random.key(1), params, kept, prunable)
    return (ticket, rst.ticket_mask(ticket, prunable), rst.finetune_weights(ticket, prunable),
            rst.finetune_weights(ticket, prunable, init="reinit", key=jax.random.key(5)))

  ticket, mask, weights, fresh = draw()
  chex.assert_trees_all_equal(weights, ticket.weights)
  assert not np.array_equal(fresh["stem"]["kernel"], ticket.weights["stem"]["kernel"])
  optimizer = train_lib.sgd(0.1, momentum=0.0, weight_decay=0.0)
  state = rst.FinetuneState(train_lib.create_train_state(KEY, weights, batch_stats, optimizer),
                            mask)
  step = rst.make_finetune_step(apply_fn, optimizer, batch_size=32, augment=None, attack=None)
  new_state, _ = jax.jit(step)(state, train_lib.device_data(digits.train))
  chex.assert_trees_all_equal(new_state.mask, mask)
  for new, old, keep in zip(*map(jax.tree.leaves, (new_state.train.params, weights, mask))):
    changed = np.asarray(new != old)
    assert not changed[~np.asarray(keep)].any()
    assert changed[np.asarray(keep)].mean() > 0.5


def test_even_batch_size_keeps_the_batch_count_and_pads_under_one_example_per_batch():
  assert rst.even_batch_size(359, 500) == 359 and rst.even_batch_size(1000, 300) == 250
  for num_examples in range(1, 400, 7):
    for batch_size in (1, 2, 50, 128, 500):
      even = rst.even_batch_size(num_examples, batch_size)
      batches = -(-num_examples // even)
      assert even <= min(batch_size, num_examples)
      assert batches == -(-num_examples // min(batch_size, num_examples))
      assert batches * even - num_examples < batches


def test_switch_draws_one_ticket_per_batch_or_per_example():
  def constant(params, batch_stats, x, train, key=None):
    return jnp.broadcast_to(params["logits"], (x.shape[0], 3)), batch_stats

  params = {"logits": jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])}  # ticket k answers k
  x = jnp.zeros((64, 2, 2, 1))
  keys = jax.random.split(KEY, 16)
  per_batch = jax.vmap(lambda key: jnp.argmax(
      rst.switch_apply_fn(constant)(params, {}, x, False, key)[0], -1))(keys)
  assert np.all(per_batch == per_batch[:, :1])  # one ticket answers the whole batch
  assert set(np.asarray(per_batch[:, 0])) == {0, 1}
  per_example = jnp.argmax(
      rst.switch_apply_fn(constant, per_example=True)(params, {}, x, False, KEY)[0], -1)
  assert 0.25 < float(jnp.mean(per_example)) < 0.75


def test_switch_accuracy_attacks_the_switch_by_default(digits):
  def linear(params, batch_stats, x, train, key=None):
    return x.reshape(x.shape[0], -1) @ params["w"], batch_stats

  params = {"w": jax.random.normal(KEY, (3, int(np.prod(digits.image_shape)), 10))}
  test = train_lib.device_data(digits.test)
  attack = attacks.get_attack("pgd", eps=0.1, step_size=0.05, num_steps=2, eot_samples=2)
  accuracy = jax.jit(lambda **options: rst.switch_accuracy(linear, params, {}, test, KEY,
                                                           batch_size=180, **options),
                     static_argnames=("attack", "attacked_apply_fn"))
  default = accuracy(attack=attack)
  assert default == accuracy(attack=attack, attacked_apply_fn=rst.switch_apply_fn(linear))
  assert default < accuracy()


def test_transfer_matrix_rows_are_sources_and_columns_targets(digits):
  # Ticket 0 is a logistic regression; ticket 1 always answers class 0 (no gradient).
  from sklearn.linear_model import LogisticRegression

  train = digits.train.images.reshape(len(digits.train.labels), -1) / 255
  regression = LogisticRegression(max_iter=500).fit(train, digits.train.labels)
  params = {"w": jnp.stack([jnp.asarray(regression.coef_.T, jnp.float32),
                            jnp.zeros((train.shape[1], 10))]),
            "b": jnp.stack([jnp.asarray(regression.intercept_, jnp.float32),
                            jnp.eye(10)[0]])}

  def linear(params, batch_stats, x, train, key=None):
    return x.reshape(x.shape[0], -1) @ params["w"] + params["b"], batch_stats

  attack = attacks.get_attack("pgd", eps=0.2, step_size=0.05, num_steps=10)
  matrix = np.asarray(jax.jit(lambda p: rst.transfer_matrix(
      linear, p, {}, train_lib.device_data(digits.test), KEY, attack, batch_size=180))(params))
  share_of_zeros = np.mean(digits.test.labels == 0)
  # Crafted on the regression, the regression falls; crafted on the constant ticket (a random
  # start only), it stays accurate. The constant ticket is right on the zeros, whatever comes.
  assert matrix[0, 0] < 0.5 < 0.9 < matrix[1, 0]
  np.testing.assert_allclose(matrix[:, 1], share_of_zeros, atol=1e-6)


def test_r2s_evaluations(small_run):
  results, config, workdir = small_run
  r2s = results["r2s"]
  matrix = np.array(r2s["transfer_matrix"])
  num_tickets = len(config.keep_ratios)
  assert matrix.shape == (num_tickets, num_tickets)
  assert np.all((0 <= matrix) & (matrix <= 1))
  # The diagonal is the white-box accuracy of each selected ticket: the same attack with the
  # same keys as its table's PGD column (up to one example's float rounding).
  np.testing.assert_allclose(np.diag(matrix), results["tickets"]["rst"]["best"]["pgd"],
                             atol=1.01 / results["split_sizes"]["test"])
  assert r2s["clean"] > r2s["random_ticket_attacker"]
  # The adaptive (EOT) attacker does better than attacking one random ticket.
  assert r2s["eot_attacker"] < r2s["random_ticket_attacker"]


def test_report_is_rendered_from_the_results_file(small_run):
  results, _, workdir = small_run
  assert results["study"] == "rst"
  report = report_runner.render(workdir).read_text()
  assert report.startswith("# RST + R2S: convnet3 on digits\n")
  assert "(d) R2S vs adaptive EOT-PGD-20" in report
  assert "| RST (adversarial search) | 0.500 | best val PGD-20 (epoch" in report
  assert (workdir / "rst_transfer_matrix.png").stat().st_size > 0


# ----------------------------------------------------------------------------------------------
# Bad input


def test_unknown_names_raise_value_errors(tiny_network):
  _, params, _, prunable = tiny_network
  with pytest.raises(ValueError, match="unknown attack batch_norm 'train'"):
    rst.TrainingAttack(batch_norm="train")
  ticket = rst.Ticket(params, params, tickets.kept_counts(params, 0.5, prunable))
  with pytest.raises(ValueError, match="unknown fine-tuning init 'rewind'"):
    rst.finetune_weights(ticket, prunable, init="rewind")
