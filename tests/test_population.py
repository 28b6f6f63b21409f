"""A population trained together equals its members trained alone, under every strategy.

The members are ConvNet-3s (width 8, BatchNorm) on the 8x8 digits; conftest provides 4 CPU
devices, so the sharded strategy splits 8 members 2 per device.

Why every step is compared rather than only the ends of two free runs: a population step and the
solo step agree to ~1e-7 (batched convolutions sum in another order), but SGD on a ReLU net
amplifies such noise. When a pre-activation within ~1e-7 of zero lands on the other side of a
ReLU, that step's gradient moves by up to ~1.5e-2 (one example at one position of a 2x2 map), and
from then on the two runs drift apart as runs with different data orders do. After 200 free steps
(width 16) 1 to 3 of 8 members typically differed from their solo runs by 1e-5..4e-3 (2.3e-3 at
lr 0.01 with BatchNorm; which members, and whether any, depends on the seed). So the population
trains freely for 200 steps in one compiled scan, and at every 4th step each member's next state
is checked against the solo step from that member's own state. A flip then moves a parameter by
at most ~lr * 1.5e-2 (measured: 1.4e-5 at lr 1e-3, 7.8e-6 at lr 5e-4), so at lr 3e-4 it stays
within the fp32 tolerance below. BatchNorm rather than ConvNet-3's default instance norm:
instance norm over the 2x2 maps of 8x8 inputs is ill-conditioned and jumps further.
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtickets import checkpoint
from jaxtickets import data as data_lib
from jaxtickets import loop
from jaxtickets import population
from jaxtickets import train as train_lib
from jaxtickets.models import get_model

NUM_MEMBERS = 8
WIDTH = 8
NUM_STEPS = 200
CHECK_EVERY = 4
BATCH_SIZE = 32
LEARNING_RATE = 3e-4
RTOL, ATOL = 1e-4, 1e-5

STRATEGIES = [("vmap", {}), ("map", {"chunk_size": 4}), ("shard", {})]


def _member_factory(model, image_shape, optimizer):
  """``keys: u32[2, 2] (init key, data key) -> TrainState`` of one member."""

  def member(keys):
    params, batch_stats = train_lib.init_variables(keys[0], model, image_shape)
    return train_lib.create_train_state(keys[1], params, batch_stats, optimizer)

  return member


def _member_keys(seed: int, num_members: int) -> jax.Array:
  """u32[N, 2, 2] (init key, data key) per member; member 1 reuses member 0's init key.

  Members 0 and 1 then start from the same weights and differ only in their data order.
  """
  init_keys, data_keys = jax.random.split(jax.random.PRNGKey(seed), 2 * num_members).reshape(
      2, num_members, 2)
  init_keys = init_keys.at[1].set(init_keys[0])
  return jnp.stack([init_keys, data_keys], axis=1)


def _crop_flip(key: jax.Array, images: jax.Array) -> jax.Array:
  """Crop (1-pixel padding) and flip: 8x8 digits are too small for CIFAR's 4-pixel padding."""
  return data_lib.random_crop_flip(key, images, pad=1)


@pytest.fixture(scope="module")
def convnet():
  """Step, training data and initial population of 8 BatchNorm ConvNet-3s."""
  digits = data_lib.load_dataset("digits", image_size=8)
  model = get_model("convnet3", num_classes=digits.num_classes, width=WIDTH, norm="batch")
  optimizer = train_lib.sgd(LEARNING_RATE, momentum=0.9)
  step = train_lib.make_train_step(train_lib.model_apply_fn(model, digits.mean, digits.std),
                                   optimizer, batch_size=BATCH_SIZE, augment=_crop_flip)
  initial = population.init(_member_factory(model, digits.image_shape, optimizer),
                            _member_keys(0, NUM_MEMBERS))
  return types.SimpleNamespace(step=step, data=train_lib.device_data(digits.train),
                               initial=initial)


@pytest.fixture(scope="module")
def step_alone(convnet):
  """``states: TrainState[T] -> TrainState[T]``: the solo step from each of T states of one member.

  One compiled function serves every member and strategy. ``lax.map`` without chunks runs the
  unbatched single-member step, one state after another.
  """
  return jax.jit(lambda states: jax.lax.map(lambda state: convnet.step(state, convnet.data)[0],
                                            states))


def _recording(population_step):
  """The population step, also returning the states it started from as a metric."""

  def step(states, data):
    new_states, metrics = population_step(states, data)
    return new_states, {**metrics, "states": states}

  return step


def _max_deviation(tree_a, tree_b) -> float:
  """Largest absolute difference between matching leaves, compared on the host."""
  return max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
             for a, b in zip(jax.tree.leaves(tree_a), jax.tree.leaves(tree_b), strict=True))


def _assert_close(actual, expected):
  for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("strategy, options", STRATEGIES, ids=[s for s, _ in STRATEGIES])
def test_population_training_equals_each_member_trained_alone(convnet, step_alone, strategy,
                                                               options):
  assert jax.device_count() == 4
  train_together = jax.jit(train_lib.repeat(
      _recording(population.run(convnet.step, strategy=strategy, **options)), NUM_STEPS))
  final, metrics = train_together(convnet.initial, convnet.data)

  assert metrics["loss"].shape == (NUM_STEPS, NUM_MEMBERS)
  assert np.all(np.asarray(final.step) == NUM_STEPS)
  if strategy == "shard":
    kernel = final.params["head"]["kernel"]
    assert len(kernel.sharding.device_set) == 4
    assert kernel.sharding.shard_shape(kernel.shape)[0] == NUM_MEMBERS // 4

  # states[t] is the population before step t; [T + 1, N, ...] once the final state is added.
  states = jax.device_get(jax.tree.map(lambda before, last: jnp.concatenate([before, last[None]]),
                                       metrics["states"], final))
  deviation = 0.0
  for member in range(NUM_MEMBERS):
    before = jax.tree.map(lambda x: x[0:NUM_STEPS:CHECK_EVERY, member], states)
    together = jax.tree.map(lambda x: x[1:NUM_STEPS + 1:CHECK_EVERY, member], states)
    alone = step_alone(before)
    np.testing.assert_array_equal(together.step, alone.step)
    np.testing.assert_array_equal(together.key, alone.key)
    # The momentum trace is a sum of gradients, so a ReLU flip moves it by up to 1e-2; the
    # parameters it moves by lr times that are compared instead.
    _assert_close((together.params, together.batch_stats), (alone.params, alone.batch_stats))
    deviation = max(deviation, _max_deviation((together.params, together.batch_stats),
                                              (alone.params, alone.batch_stats)))
  print(f"{strategy}: max |together - alone| over {NUM_MEMBERS} members and "
        f"{NUM_STEPS // CHECK_EVERY} steps = {deviation:.2e}")

  # Members 0 and 1 start from the same weights with different keys: their first batches, hence
  # their whole runs, differ.
  assert metrics["loss"][0, 0] != metrics["loss"][0, 1]
  member0, member1 = population.select(final.params, 0), population.select(final.params, 1)
  assert _max_deviation(member0, member1) > 100 * ATOL
  # BatchNorm statistics are each member's own (equal to its solo step's, checked above), so
  # they differ between members; a reduction over members would make them equal.
  means = final.batch_stats["stem_norm"]["mean"]
  assert float(jnp.min(jnp.abs(means[1:] - means[0]).max(axis=-1))) > 100 * ATOL


def test_shard_takes_a_population_committed_to_one_device(convnet):
  # As a checkpoint restored onto one device would be; the result is the vmapped one.
  committed = jax.device_put(convnet.initial, jax.devices()[1])
  sharded, _ = population.run(convnet.step, strategy="shard")(committed, convnet.data)
  assert len(sharded.params["head"]["kernel"].sharding.device_set) == 4
  vmapped, _ = jax.jit(population.run(convnet.step))(convnet.initial, convnet.data)
  _assert_close(sharded, vmapped)


def test_stack_unstack_select_round_trip(convnet):
  members = population.unstack(convnet.initial)
  assert len(members) == NUM_MEMBERS == population.size(convnet.initial)
  assert members[2].params["stem"]["kernel"].shape == (3, 3, 1, WIDTH)
  restacked = population.stack(members)
  assert _max_deviation(restacked, convnet.initial) == 0.0
  pair = population.select(convnet.initial, [3, 5])
  assert population.size(pair) == 2
  assert _max_deviation(population.select(pair, 1), members[5]) == 0.0


def test_init_builds_each_member_from_its_key():
  def member(key):
    return {"weights": jax.random.normal(key, (3,)), "step": jnp.zeros((), jnp.int32)}

  keys = jax.random.split(jax.random.PRNGKey(1), 5)
  together = population.init(member, keys)
  assert population.size(together) == 5
  assert _max_deviation(together, population.stack([member(key) for key in keys])) < 1e-6


def test_fit_checkpoints_resumes_and_exports_a_sharded_population(convnet, tmp_path):
  sharded = population.shard(convnet.initial)
  step = population.run(convnet.step, strategy="shard")
  final, records = loop.fit(step, sharded, convnet.data, num_steps=4, eval_every=2,
                            workdir=tmp_path / "run", progress=False)
  assert [record["step"] for record in records] == [2, 4]
  assert len(records[-1]["train_loss"]) == NUM_MEMBERS  # One mean loss per member.

  # A second fit of the finished run restores the checkpoint instead of training.
  resumed, _ = loop.fit(step, sharded, convnet.data, num_steps=4, eval_every=2,
                        workdir=tmp_path / "run", progress=False)
  assert _max_deviation(resumed, final) == 0.0
  assert resumed.params["head"]["kernel"].sharding == final.params["head"]["kernel"].sharding

  # Stopped half-way and resumed, it trains the same members on the same devices.
  loop.fit(step, sharded, convnet.data, num_steps=2, eval_every=2, workdir=tmp_path / "half",
           progress=False)
  continued, _ = loop.fit(step, sharded, convnet.data, num_steps=4, eval_every=2,
                          workdir=tmp_path / "half", progress=False)
  assert _max_deviation(continued, final) == 0.0
  assert continued.params["head"]["kernel"].sharding == final.params["head"]["kernel"].sharding

  member = population.export_member(final, 3)
  assert len(member.params["head"]["kernel"].sharding.device_set) == 1
  with checkpoint.Checkpointer(tmp_path / "member") as checkpointer:
    checkpointer.save(4, member)
    restored_member = checkpointer.restore(jax.tree.map(jnp.zeros_like, member))
  assert _max_deviation(restored_member, population.select(final, 3)) == 0.0
  assert int(restored_member.step) == 4


def _noop_step(state, data):
  return state, data


def test_shard_on_a_given_mesh_splits_members_over_its_devices_only():
  mesh = population.make_mesh(jax.devices()[:2])
  members = {"w": jnp.arange(12.0).reshape(6, 2)}
  doubled = population.run(lambda state, scale: {"w": state["w"] * scale}, strategy="shard",
                           mesh=mesh)(members, 2.0)
  np.testing.assert_array_equal(doubled["w"], 2 * members["w"])
  assert doubled["w"].sharding.device_set == set(jax.devices()[:2])
  assert doubled["w"].sharding.shard_shape(doubled["w"].shape) == (3, 2)



def test_shard_replicates_over_a_meshs_other_axes():
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 2), ("population", "data"))
  members = {"w": jnp.arange(12.0).reshape(6, 2)}
  doubled = population.run(lambda state, scale: {"w": state["w"] * scale}, strategy="shard",
                           mesh=mesh)(members, 2.0)
  np.testing.assert_array_equal(doubled["w"], 2 * members["w"])
  # Three members per "population" shard, each held by both devices of its "data" row.
  assert doubled["w"].sharding.shard_shape(doubled["w"].shape) == (3, 2)
  assert len(doubled["w"].sharding.device_set) == 4
  assert not doubled["w"].sharding.is_fully_replicated

  other = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  with pytest.raises(ValueError, match="no 'population' axis"):
    population.run(_noop_step, strategy="shard", mesh=other)


@pytest.mark.parametrize("make_error, match", [
    # Each would otherwise fail obscurely (a sharding error) or silently (JAX clamps indices).
    (lambda: population.run(_noop_step, strategy="shard")({"w": jnp.zeros((6, 3))}, 0.0),
     "6 members cannot be split evenly over the 4 devices"),
    (lambda: population.select({"w": jnp.zeros((8, 3))}, 8), "out of range"),
    (lambda: population.select({"w": jnp.zeros((8, 3))}, [0, -9]), "out of range"),
    (lambda: population.run(_noop_step, strategy="pmap"), "unknown population strategy"),
])
def test_inputs_jax_would_misread_are_refused(make_error, match):
  with pytest.raises(ValueError, match=match):
    make_error()


def test_default_strategy_is_accepted_by_run():
  small = population.default_strategy("some_new_net", num_params=10_000, platform="gpu")
  large = population.default_strategy("some_new_net", num_params=20_000_000, platform="gpu")
  assert small["strategy"] == "vmap" and large["strategy"] == "map"
  assert population.default_strategy("convnet3", num_params=1, platform="cpu")["strategy"] == \
      "map"
  for model_name in ("convnet3", "resnet18"):
    options = population.default_strategy(model_name, num_params=1, platform="gpu")
    population.run(_noop_step, **options)
