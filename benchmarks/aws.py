"""A Winning Sign: one barrier curve and one transfer sweep, as populations vs one at a time.

    python -m benchmarks.aws [--quick] [--out benchmarks/out/aws.json]

On synthetic 32x32x3 uint8 images held in device memory (no dataset files), with ResNet-20
(BatchNorm) and a random 20%-density global-magnitude mask, on one device in one run:

1. **Barrier curve**: the 11 points of a linear path (interpolate, recalibrate BatchNorm from
   reset with one pass over the training images, evaluate the test images), computed as one
   population (``lmc.make_error_curve``, the default strategy) vs 11 sequential evaluations
   of one compiled single-point function.
2. **Transfer sweep**: one training step of N sparse members (``aws.make_sparse_step``:
   masked forward, SGD, re-masking), as one population (default strategy, and vmap) vs the
   same members stepped one after another by one compiled single-member step.

Every configuration is compiled and run once, then timed; the median wall time counts.
``--quick`` shrinks everything (a ConvNet-3 of width 8, small splits, N = 4) to check on a CPU
that the benchmark runs; its numbers mean nothing.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from jaxtickets import aws, lmc, population
from jaxtickets import train as train_lib
from jaxtickets.errors import exit_on_user_error
from jaxtickets.models import get_model

IMAGE_SHAPE = (32, 32, 3)
NUM_CLASSES = 10
MEAN, STD = (0.5,) * 3, (0.2887,) * 3  # of uniform pixels


@dataclasses.dataclass(frozen=True)
class Settings:
  """One benchmark run.

  Attributes:
    model: registry name; model_options: its options (BatchNorm always).
    train_examples: images of the recalibration pass; test_examples: evaluated images.
    recalibration_batch: batch size of the recalibration pass.
    num_points: points on the barrier curve.
    members: N of the transfer sweep; batch_size: its images per member per step.
    steps_per_call: sweep steps per timed call (one ``lax.scan``; 1 on CPU, see ``loop.py``).
    timings: timed calls per configuration.
  """

  model: str
  model_options: dict[str, Any]
  train_examples: int
  test_examples: int
  recalibration_batch: int
  num_points: int
  members: int
  batch_size: int
  steps_per_call: int
  timings: int


FULL = Settings(model="resnet20", model_options={}, train_examples=10_000, test_examples=2_000,
                recalibration_batch=128, num_points=11, members=16, batch_size=128,
                steps_per_call=20, timings=5)
QUICK = Settings(model="convnet3", model_options={"width": 8}, train_examples=512,
                 test_examples=256, recalibration_batch=64, num_points=11, members=4,
                 batch_size=32, steps_per_call=1, timings=2)


def time_barrier_curve(settings: Settings, apply_fn, params, batch_stats, mask,
                       train, test) -> dict[str, Any]:
  """Seconds for one curve: as one population vs point after point."""
  key = jax.random.PRNGKey(1)
  params = jax.tree.map(lambda leaf, keep: jnp.where(keep, leaf, 0), params, mask)
  other = aws.initialized_norms(params)
  run_options = population.default_strategy(
      settings.model, sum(leaf.size for leaf in jax.tree.leaves(params)))
  curve = lmc.make_error_curve(apply_fn, num_points=settings.num_points,
                               batch_size=settings.recalibration_batch, **run_options)

  @jax.jit
  def point_error(t, params_a, params_b, batch_stats, train, test, key):
    point = lmc.interpolate(params_a, params_b, t)
    point_stats = lmc.recalibrate(apply_fn, point, batch_stats, train, key,
                                  batch_size=settings.recalibration_batch)
    return 1 - train_lib.evaluate(apply_fn, point, point_stats, test)["accuracy"]

  points = np.linspace(0, 1, settings.num_points, dtype=np.float32)
  together = common.median_seconds(
      lambda: curve(params, other, batch_stats, train, test, key), settings.timings)
  one_by_one = common.median_seconds(
      lambda: [point_error(t, params, other, batch_stats, train, test, key) for t in points],
      settings.timings)
  return {"strategy": run_options, "population_s": together, "sequential_s": one_by_one,
          "speedup": one_by_one / together}


def time_transfer_sweep(settings: Settings, apply_fn, params, batch_stats, mask,
                        train) -> dict[str, Any]:
  """Seconds per sweep step (all N members advance one step)."""
  optimizer = train_lib.sgd(0.1)
  step = aws.make_sparse_step(apply_fn, optimizer, batch_size=settings.batch_size, augment=None)
  states = population.init(lambda key: aws.init_sparse_state(
      key, params, batch_stats, mask, False, optimizer), jax.random.split(
          jax.random.PRNGKey(2), settings.members))
  run_options = population.default_strategy(
      settings.model, sum(leaf.size for leaf in jax.tree.leaves(params)))
  timings = {}
  strategies = {"default": run_options, "vmap": {"strategy": "vmap", "chunk_size": None}}
  for name, options in strategies.items():
    run = jax.jit(train_lib.repeat(population.run(step, **options), settings.steps_per_call))
    timings[name] = common.median_seconds(lambda: run(states, train), settings.timings)
  single = jax.jit(train_lib.repeat(step, settings.steps_per_call))
  members = population.unstack(states)
  timings["one_at_a_time"] = common.median_seconds(
      lambda: [single(member, train) for member in members], settings.timings)
  per_step = {name: seconds / settings.steps_per_call for name, seconds in timings.items()}
  images = settings.members * settings.batch_size
  return {"strategy": run_options, "seconds_per_sweep_step": per_step,
          "images_per_s": {name: images / seconds for name, seconds in per_step.items()},
          "speedup_default": per_step["one_at_a_time"] / per_step["default"],
          "speedup_vmap": per_step["one_at_a_time"] / per_step["vmap"]}


def run_benchmark(settings: Settings, quick: bool) -> dict[str, Any]:
  model = get_model(settings.model, num_classes=NUM_CLASSES, norm="batch",
                    **settings.model_options)
  params, batch_stats = train_lib.init_variables(jax.random.PRNGKey(0), model, IMAGE_SHAPE)
  apply_fn = train_lib.model_apply_fn(model, MEAN, STD)
  # A 20%-density ticket from one global magnitude cut (one round removing 80%).
  prunable = aws.prunable_leaves(params)
  _, kept = aws.survivor_counts(aws.num_prunable(params, prunable), 1, 0.8)
  _, mask = aws.prune(params, aws.dense_mask(params), prunable, kept)
  train = train_lib.device_data(common.synthetic_split(
      settings.train_examples, IMAGE_SHAPE, NUM_CLASSES, seed=0))
  test = train_lib.device_data(common.synthetic_split(
      settings.test_examples, IMAGE_SHAPE, NUM_CLASSES, seed=1))
  device = jax.devices()[0]
  print(f"{device.device_kind}, jax {jax.__version__}, {settings.model}")
  curve = time_barrier_curve(settings, apply_fn, params, batch_stats, mask, train, test)
  print(f"barrier curve, {settings.num_points} points (recalibrate {settings.train_examples} "
        f"images + test {settings.test_examples}):")
  print(f"  one population ({curve['strategy']['strategy']}) {curve['population_s']:8.3f} s")
  print(f"  {settings.num_points} sequential points  {curve['sequential_s']:8.3f} s   "
        f"speed-up {curve['speedup']:.2f}x", flush=True)
  sweep = time_transfer_sweep(settings, apply_fn, params, batch_stats, mask, train)
  print(f"transfer sweep, N={settings.members} members, batch {settings.batch_size}, "
        f"seconds per step of all members (images/s):")
  for name, seconds in sweep["seconds_per_sweep_step"].items():
    print(f"  {name:<16}{seconds * 1000:10.2f} ms  {sweep['images_per_s'][name]:12,.0f}")
  print(f"  speed-up over one at a time: default {sweep['speedup_default']:.2f}x, "
        f"vmap {sweep['speedup_vmap']:.2f}x")
  return {"device": device.device_kind, "platform": device.platform,
          "jax_version": jax.__version__, "quick": quick,
          "settings": dataclasses.asdict(settings), "barrier_curve": curve,
          "transfer_sweep": sweep}


def main(argv: Sequence[str] | None = None) -> int:
  args = common.parse_args(__doc__, "benchmarks/out/aws.json", argv)
  with exit_on_user_error():
    save = common.json_writer(args.out)
    save(run_benchmark(QUICK if args.quick else FULL, args.quick))
  print(f"\nwrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
