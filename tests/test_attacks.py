"""Attacks against small convnets trained on sklearn digits (8x8), and APGD's schedule."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxtickets import attacks, rst
from jaxtickets import data as data_lib
from jaxtickets import train as train_lib
from jaxtickets.errors import UserError

from assertions import host_waits_of

EPS = 0.12  # Linf, on pixels in [0, 1]
L2_EPS = 1.0
KEY = jax.random.key(7)
# name -> (registry name, options); shared so that each configuration compiles once.
CONFIGS = {
    "fgsm": ("fgsm", {"eps": EPS}),
    "pgd": ("pgd", {"eps": EPS, "step_size": EPS / 4, "num_steps": 20}),
    "pgd-l2": ("pgd", {"eps": L2_EPS, "step_size": L2_EPS / 4, "num_steps": 20, "norm": "l2"}),
    "cw": ("cw", {"eps": EPS, "step_size": EPS / 4, "num_steps": 20}),
    "apgd-ce": ("apgd-ce", {"eps": EPS, "num_steps": 20}),
    "apgd-dlr": ("apgd-dlr", {"eps": EPS, "num_steps": 20}),
    "pgd-early-stop": ("pgd", {"eps": EPS, "step_size": EPS / 4, "num_steps": 20,
                               "early_stop": True}),
    "pgd-early-stop-5": ("pgd", {"eps": EPS, "step_size": EPS / 4, "num_steps": 5,
                                 "early_stop": True}),
    "pgd-restarts": ("pgd", {"eps": EPS, "step_size": EPS / 4, "num_steps": 20, "restarts": 3}),
    "pgd-train": ("pgd", {"eps": EPS, "step_size": EPS / 4, "num_steps": 3, "train": True}),
}


def configured(name):
  registry_name, options = CONFIGS[name]
  return attacks.get_attack(registry_name, **options)


class TinyNet(nn.Module):
  """conv3x3(8) -> BatchNorm -> ReLU -> Dense(10); > 95% test accuracy on digits after 200 steps."""

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(8, (3, 3), name="stem")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="norm")(x)
    x = nn.relu(x).reshape(x.shape[0], -1)
    return nn.Dense(10, name="head")(x)


@pytest.fixture(scope="module")
def population(digits):
  """Two TinyNets trained from different seeds: (apply_fn, stacked params, stacked stats)."""
  model = TinyNet()
  apply_fn = train_lib.model_apply_fn(model, digits.mean, digits.std)
  optimizer = optax.adam(1e-2)
  step = train_lib.make_train_step(apply_fn, optimizer, batch_size=128, augment=None)

  def init(key):
    params, batch_stats = train_lib.init_variables(key, model, digits.image_shape)
    return train_lib.create_train_state(key, params, batch_stats, optimizer)

  states = jax.jit(jax.vmap(init))(jax.random.split(jax.random.key(0), 2))
  run = jax.jit(jax.vmap(train_lib.repeat(step, 200), in_axes=(0, None)))
  states, _ = run(states, train_lib.device_data(digits.train))
  return apply_fn, states.params, states.batch_stats


def member(tree, index):
  return jax.tree.map(lambda leaf: leaf[index], tree)


@pytest.fixture(scope="module")
def net(population):
  """Member 0: (apply_fn, params, batch_stats)."""
  apply_fn, params, batch_stats = population
  return apply_fn, member(params, 0), member(batch_stats, 0)


@pytest.fixture(scope="module")
def test_set(digits):
  return data_lib.to_unit(jnp.asarray(digits.test.images)), jnp.asarray(digits.test.labels)


@pytest.fixture(scope="module")
def attack_fns(net):
  """name -> jitted ``(params, batch_stats, x, y, key) -> AttackResult`` on the TinyNet."""
  apply_fn = net[0]
  compiled = {}

  def get(name):
    if name not in compiled:
      compiled[name] = jax.jit(functools.partial(configured(name), apply_fn))
    return compiled[name]

  return get


@pytest.fixture(scope="module")
def results(net, test_set, attack_fns):
  """name -> the attack's AttackResult on the digits test split (computed once)."""
  _, params, batch_stats = net
  cache = {}

  def get(name):
    if name not in cache:
      cache[name] = attack_fns(name)(params, batch_stats, *test_set, KEY)
    return cache[name]

  return get


@functools.cache
def classifier(apply_fn):
  """Jitted eval-mode ``(params, batch_stats, x) -> i32[B]`` predicted classes."""
  return jax.jit(lambda params, batch_stats, x: jnp.argmax(
      apply_fn(params, batch_stats, x, False)[0], -1))


def predictions(net, x):
  apply_fn, params, batch_stats = net
  return classifier(apply_fn)(params, batch_stats, x)


def robust_fraction(result):
  """Fraction of the batch the network still classifies correctly after the attack."""
  return float(jnp.mean(~result.success))


@pytest.mark.parametrize("name", ["fgsm", "pgd", "pgd-l2", "cw", "apgd-ce", "apgd-dlr"])
def test_attack_stays_in_ball_and_box_and_reports_success(name, net, test_set, attack_fns,
                                                          results):
  x_digits, y_digits = test_set
  noise_key, zero_key, one_key, label_key = jax.random.split(jax.random.key(3), 4)
  # Random pixels, a third exactly 0 and a tenth exactly 1, where the box constraint binds.
  x_random = jax.random.uniform(noise_key, x_digits.shape)
  x_random = jnp.where(jax.random.bernoulli(zero_key, 0.3, x_random.shape), 0.0, x_random)
  x_random = jnp.where(jax.random.bernoulli(one_key, 0.1, x_random.shape), 1.0, x_random)
  y_random = jax.random.randint(label_key, y_digits.shape, 0, 10)
  _, params, batch_stats = net
  cases = [(x_digits, y_digits, results(name)),
           (x_random, y_random, attack_fns(name)(params, batch_stats, x_random, y_random, KEY))]
  for x, y, result in cases:
    delta = np.asarray(result.x_adv - x).reshape(x.shape[0], -1)
    if CONFIGS[name][1].get("norm") == "l2":
      assert np.linalg.norm(delta, axis=1).max() <= L2_EPS + 1e-5
    else:
      assert np.abs(delta).max() <= EPS + 1e-6
    assert float(result.x_adv.min()) >= 0.0 and float(result.x_adv.max()) <= 1.0
    assert result.success.dtype == jnp.bool_ and result.success.shape == y.shape
    np.testing.assert_array_equal(result.success, predictions(net, result.x_adv) != y)
  # On the digits (random labels are wrong anyway) each attack fools a good part of the batch,
  # far beyond the network's few clean errors.
  assert results(name).success.mean() > 0.3


def test_fgsm_is_one_signed_gradient_step(net, test_set, results):
  apply_fn, params, batch_stats = net
  x, y = test_set

  def total_loss(x):
    logits, _ = apply_fn(params, batch_stats, x, False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).sum()

  expected = jnp.clip(x + EPS * jnp.sign(jax.jit(jax.grad(total_loss))(x)), 0.0, 1.0)
  np.testing.assert_allclose(results("fgsm").x_adv, expected, atol=1e-6)


def test_pgd_beats_fgsm_and_apgd_matches_pgd(net, test_set, results):
  x, y = test_set
  clean = float(jnp.mean(predictions(net, x) == y))
  robust = {name: robust_fraction(results(name))
            for name in ("fgsm", "pgd", "apgd-ce")}
  assert clean > 0.9
  assert robust["pgd"] < robust["fgsm"]
  assert robust["pgd"] < 0.5 * clean
  assert robust["apgd-ce"] <= robust["pgd"] + 0.02


def test_robust_accuracy_evaluates_padded_batches_exactly(net, digits, test_set, results):
  apply_fn, params, batch_stats = net
  # 360 test images in batches of 128: the last batch is padded with 24 dummies. FGSM has no
  # random start, so the per-batch keys do not change its result.
  metrics = attacks.robust_accuracy(
      apply_fn, params, batch_stats, jnp.asarray(digits.test.images),
      jnp.asarray(digits.test.labels), KEY, configured("fgsm"), batch_size=128)
  clean = train_lib.evaluate(apply_fn, params, batch_stats,
                             train_lib.device_data(digits.test))["accuracy"]
  assert float(metrics["clean_accuracy"]) == pytest.approx(float(clean), abs=1e-6)
  expected = robust_fraction(results("fgsm"))
  assert float(metrics["robust_accuracy"]) == pytest.approx(expected, abs=1.5 / 360)


def test_early_stop_never_unfools(results):
  plain = results("pgd")
  early, early_short = results("pgd-early-stop"), results("pgd-early-stop-5")
  # Freezing keeps everything plain PGD (same key, same path until the freeze) fools.
  assert np.all(np.asarray(early.success)[np.asarray(plain.success)])
  # Examples fooled after 5 steps stay fooled, and unchanged, through step 20.
  fooled_early = np.asarray(early_short.success)
  assert fooled_early.any() and np.all(np.asarray(early.success)[fooled_early])
  np.testing.assert_array_equal(np.asarray(early.x_adv)[fooled_early],
                                np.asarray(early_short.x_adv)[fooled_early])


def test_restarts_keep_the_first_success(results):
  # The first restart draws the single run's key (a split's first key does not depend on the
  # count), so wherever the single run succeeds, the restarted attack keeps exactly its point.
  single, restarted = results("pgd"), results("pgd-restarts")
  fooled = np.asarray(single.success)
  assert np.all(np.asarray(restarted.success)[fooled])
  np.testing.assert_array_equal(np.asarray(restarted.x_adv)[fooled],
                                np.asarray(single.x_adv)[fooled])
  assert restarted.success.sum() > single.success.sum()  # later restarts fool some more


def test_train_mode_updates_running_stats_and_eval_mode_keeps_them(net, results):
  _, _, batch_stats = net
  trained = results("pgd-train").batch_stats
  moved = jax.tree.map(lambda new, old: bool(jnp.any(new != old)), trained, batch_stats)
  assert moved["norm"]["mean"] and moved["norm"]["var"]
  chex.assert_trees_all_equal(results("pgd").batch_stats, batch_stats)


def test_train_mode_threads_stats_through_every_pass():
  """A network that counts its train-mode passes in its "running statistics"."""

  def counting_fn(params, batch_stats, x, train, key=None):
    logits = x.reshape(x.shape[0], -1) @ params
    return logits, ({"passes": batch_stats["passes"] + 1} if train else batch_stats)

  params = jax.random.normal(jax.random.key(0), (16, 3))
  x = jax.random.uniform(jax.random.key(1), (4, 4, 4, 1))
  y = jnp.array([0, 1, 2, 0])
  attack = functools.partial(attacks.pgd, counting_fn, eps=0.1, step_size=0.02, num_steps=3,
                             eot_samples=2, restarts=2, train=True)
  result = jax.jit(attack)(params, {"passes": jnp.int32(0)}, x, y, KEY)
  # 3 steps x 2 EOT passes x 2 restarts; the passes that decide success do not count.
  assert int(result.batch_stats["passes"]) == 12


def test_evaluation_attacks_never_make_the_host_wait():
  """Early stopping and APGD's step-size halving are selects, not conditionals or loops of
  data-dependent length (each a device-to-host round trip per iteration on a GPU)."""

  def linear(params, batch_stats, x, train, key=None):
    return x.reshape(x.shape[0], -1) @ params, batch_stats

  params = jax.random.normal(KEY, (64, 10))
  x, y = jax.random.uniform(KEY, (8, 8, 8, 1)), jnp.arange(8)
  for name, attack in rst.evaluation_attacks(apgd_steps=20).items():
    assert host_waits_of(functools.partial(attack, linear), params, {}, x, y, KEY) == [], name


def test_jit_vmap_over_a_population_matches_each_member(population, test_set, attack_fns):
  apply_fn, params, batch_stats = population
  x, y = test_set
  attack = configured("pgd-train")
  batched = jax.jit(jax.vmap(functools.partial(attack, apply_fn),
                             in_axes=(0, 0, None, None, None)))(params, batch_stats, x, y, KEY)
  for index in range(2):
    single = attack_fns("pgd-train")(member(params, index), member(batch_stats, index), x, y,
                                     KEY)
    # PGD steps by the gradient's sign, so a pixel whose gradient is ~0 may step the other way
    # under vmap's different summation order (2 of 22,976 pixels here).
    differs = np.abs(member(batched.x_adv, index) - single.x_adv) > 1e-5
    assert differs.mean() < 1e-3, differs.sum()
    np.testing.assert_array_equal(member(batched.success, index), single.success)
    # The running statistics average activations over those pixels too.
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6),
                 member(batched.batch_stats, index), single.batch_stats)


def switch_fn(apply_fn):
  """A randomized network: each pass uses population member 0 or 1, drawn from ``key``."""

  def apply_switch(params, batch_stats, x, train, key=None):
    index = jax.random.bernoulli(key).astype(jnp.int32)
    logits, _ = apply_fn(member(params, index), member(batch_stats, index), x, train)
    return logits, batch_stats

  return apply_switch


def test_eot_averages_gradients_over_sampled_passes(population, test_set):
  apply_fn, params, batch_stats = population
  randomized = switch_fn(apply_fn)
  x, y = test_set[0][:32], test_set[1][:32]
  loss_fn = optax.softmax_cross_entropy_with_integer_labels
  key, num_samples = jax.random.key(11), 6
  sample_keys = jax.random.split(key, num_samples)
  chosen = {int(jax.random.bernoulli(k)) for k in sample_keys}
  assert chosen == {0, 1}  # The samples do mix both members.

  def total_loss(x, sample_key):
    return loss_fn(randomized(params, batch_stats, x, False, sample_key)[0], y).sum()

  gradient = jax.jit(jax.grad(total_loss))
  expected = jnp.mean(jnp.stack([gradient(x, k) for k in sample_keys]), axis=0)
  loss, grad, _, _ = jax.jit(functools.partial(
      attacks.expected_gradient, randomized, loss_fn=loss_fn, eot_samples=num_samples))(
          params, batch_stats, x, y, key)
  np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-6)
  assert loss.shape == (32,)


def test_eot_attack_on_random_switch_is_stronger(population, test_set):
  apply_fn, params, batch_stats = population
  randomized = switch_fn(apply_fn)
  x, y = test_set

  def expected_accuracy(eot_samples):
    attack = attacks.get_attack("pgd", eps=EPS, step_size=EPS / 4, num_steps=10,
                                eot_samples=eot_samples)
    x_adv = jax.jit(functools.partial(attack, randomized))(params, batch_stats, x, y, KEY).x_adv
    # Accuracy averaged over the switch's two outcomes.
    return np.mean([float(jnp.mean(predictions((apply_fn, member(params, i),
                                                member(batch_stats, i)), x_adv) == y))
                    for i in range(2)])

  assert expected_accuracy(8) < expected_accuracy(1)


def test_margin_and_dlr_losses_follow_their_formulas():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(64, 5)).astype(np.float32)
  labels = rng.integers(0, 5, 64)
  logits[np.arange(0, 64, 4), labels[::4]] += 5  # A quarter with the true class on top.
  true = logits[np.arange(64), labels]
  others = np.where(np.eye(5, dtype=bool)[labels], -np.inf, logits)
  top = -np.sort(-logits, axis=1)
  margin = others.max(1) - true
  np.testing.assert_allclose(attacks.margin_loss(jnp.asarray(logits), jnp.asarray(labels)),
                             np.minimum(margin, 0.0), rtol=1e-6)
  np.testing.assert_allclose(
      attacks.margin_loss(jnp.asarray(logits), jnp.asarray(labels), kappa=0.5),
      np.minimum(margin, 0.5), rtol=1e-6)
  dlr = attacks.dlr_loss(jnp.asarray(logits), jnp.asarray(labels))
  np.testing.assert_allclose(dlr, margin / (top[:, 0] - top[:, 2] + 1e-12), rtol=1e-5)
  # Invariant to shifting and (positively) scaling the logits.
  np.testing.assert_allclose(attacks.dlr_loss(jnp.asarray(3 * logits + 7), jnp.asarray(labels)),
                             dlr, rtol=1e-4, atol=1e-6)


def test_apgd_checkpoints_follow_the_p_sequence():
  for num_steps in (100, 1000):
    fractions = [0.0, 0.22]
    while fractions[-1] + max(fractions[-1] - fractions[-2] - 0.03, 0.06) <= 1.0:
      fractions.append(fractions[-1] + max(fractions[-1] - fractions[-2] - 0.03, 0.06))
    expected = tuple(round(p * num_steps) for p in fractions[1:])
    assert attacks.apgd_checkpoints(num_steps) == expected
  assert attacks.apgd_checkpoints(100) == (22, 41, 57, 70, 80, 87, 93, 99)
  assert attacks.apgd_checkpoints(3) == (1, 2, 3)


def test_apgd_step_size_halves_on_conditions_1_and_2():
  num_steps, eps = 100, 0.1
  checkpoints = attacks.apgd_checkpoints(num_steps)
  t = np.arange(1, num_steps + 1, dtype=np.float32)
  losses = np.stack([
      t,                                 # always a new best: never halves
      np.where(t % 2 == 0, t, -t),       # half the steps increase: condition 1 at every check
      1.0 + 1e-3 * t,                    # increases but stays below the start's 10: condition 2
  ], axis=1)
  start_loss = jnp.array([0.0, 0.0, 10.0])
  is_checkpoint = np.isin(np.arange(1, num_steps + 1), checkpoints)
  interval = np.zeros(num_steps, np.int32)
  interval[np.array(checkpoints) - 1] = np.diff((0,) + checkpoints)

  def update(state, inputs):
    return attacks.apgd_step_size_update(state, *inputs, rho=0.75)

  state, halved = jax.lax.scan(
      update, attacks.ApgdStepSize.create(eps, start_loss),
      (jnp.asarray(losses), jnp.asarray(is_checkpoint), jnp.asarray(interval)))
  halved = np.asarray(halved)
  assert not halved[~is_checkpoint].any()
  at_checks = halved[is_checkpoint]
  assert not at_checks[:, 0].any()
  assert at_checks[:, 1].all()
  # Condition 2 cannot fire at the first check and needs no halving at the previous one.
  np.testing.assert_array_equal(at_checks[:, 2], [False, True] * (len(checkpoints) // 2))
  np.testing.assert_allclose(
      state.step_size, 2 * eps * 0.5 ** at_checks.sum(axis=0), rtol=1e-6)


def test_unknown_names_and_too_few_classes_for_dlr_raise_user_error():
  with pytest.raises(UserError, match="unknown attack 'square'"):
    attacks.get_attack("square")
  x, y = jnp.zeros((2, 4, 4, 1)), jnp.array([0, 1])

  def two_classes(params, batch_stats, x, train, key=None):
    return x.reshape(x.shape[0], -1)[:, :2] @ params, batch_stats

  def run(attack):
    return jax.eval_shape(lambda: attack(two_classes, jnp.eye(2), {}, x, y, KEY))

  with pytest.raises(UserError, match="DLR loss needs >= 3 classes"):
    run(attacks.get_attack("apgd-dlr", eps=0.1, num_steps=5))
  with pytest.raises(UserError, match="unknown norm 'l1'"):
    run(attacks.get_attack("pgd", eps=0.1, step_size=0.1, num_steps=1, norm="l1"))
  with pytest.raises(UserError, match="unknown attack loss 'hinge'"):
    run(functools.partial(attacks.apgd, eps=0.1, num_steps=1, loss="hinge"))


@pytest.mark.parametrize("options", [
    {"eps": -0.1, "step_size": 0.1, "num_steps": 1}, {"eps": 0.1, "step_size": 0.0, "num_steps": 1},
    {"eps": 0.1, "step_size": 0.1, "num_steps": 0}])
def test_a_budget_that_cannot_move_the_input_is_refused(options):
  # It would report the clean accuracy as robust accuracy.
  x, y = jnp.zeros((2, 4, 4, 1)), jnp.array([0, 1])

  def net(params, batch_stats, x, train, key=None):
    return x.reshape(x.shape[0], -1)[:, :3] @ params, batch_stats

  with pytest.raises(ValueError, match="expected eps >= 0, step_size > 0, num_steps >= 1"):
    attacks.pgd(net, jnp.ones((3, 3)), {}, x, y, KEY, **options)
  if "step_size" in options and options["step_size"] > 0:
    with pytest.raises(ValueError, match="expected eps"):
      attacks.apgd(net, jnp.ones((3, 3)), {}, x, y, KEY, eps=options["eps"],
                   num_steps=options["num_steps"])
