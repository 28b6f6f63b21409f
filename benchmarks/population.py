"""Training throughput of N models trained together, per population strategy and precision.

    python -m benchmarks.population [--quick] [--models convnet3,resnet18] [--out FILE.json]

For ConvNet-3 (batch 64) and ResNet-18 (batch 256) on synthetic 32x32x3 uint8 images held in
device memory, it times one training step of N members (each member draws its batch on device,
then forward, backward and SGD with momentum and weight decay; no augmentation) under every
strategy of ``jaxtickets.population``: ``vmap``, ``map`` one member at a time and in chunks, and
``shard`` when there is more than one device. Each strategy that vmaps members is timed with XLA's
convolutions and with ``conv_impl="im2col"`` (batched matrix products instead of grouped
convolutions; labelled ``+im2col``), in float32 and bfloat16 compute (parameters stay float32).
Every configuration is compiled and run once, then timed over calls of several steps (one
``lax.scan`` each); images/s = N * batch * steps per call / median seconds per call.

With PyTorch and a CUDA GPU it also times the same ConvNet-3s trained one after another in an
eager PyTorch loop (the baseline, in the same process) and prints the largest population's
speed-up over it. ``--quick`` shrinks N, batch, width and steps to check on a CPU that the script
runs; ``--models`` times a subset.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec

from benchmarks import common
from jaxtickets import population
from jaxtickets import train as train_lib
from jaxtickets.errors import UserError, exit_on_user_error, first_line
from jaxtickets.models import get_model

IMAGE_SHAPE = (32, 32, 3)
NUM_CLASSES = 10
# Normalization of the synthetic pixels (uniform on [0, 1]: mean 1/2, std 1/sqrt(12)).
MEAN, STD = (0.5,) * 3, (0.2887,) * 3
LEARNING_RATE = 0.01


@dataclasses.dataclass(frozen=True)
class ModelSettings:
  """How one model family is timed.

  Attributes:
    batch_size: images per member per step.
    members: population sizes N to time.
    dtypes: compute dtypes to time.
    width: the model's base width; None keeps the architecture's (128 for ConvNet-3, 64 for
      ResNet-18).
  """

  batch_size: int
  members: tuple[int, ...]
  dtypes: tuple[str, ...] = ("float32", "bfloat16")
  width: int | None = None


@dataclasses.dataclass(frozen=True)
class Settings:
  """One benchmark run.

  Attributes:
    models: per registry model name, how it is timed.
    chunk_size: members vmapped together by the "map" strategy.
    steps_per_call: training steps per timed call (one compiled scan).
    timings: timed calls per configuration (the median counts).
    num_examples: synthetic training images in device memory.
    torch_steps: steps per model in the PyTorch baseline.
    torch_members: models trained one after another by the PyTorch baseline.
  """

  models: dict[str, ModelSettings]
  chunk_size: int = 8
  steps_per_call: int = 10
  timings: int = 5
  num_examples: int = 50_000
  torch_steps: int = 50
  torch_members: int = 32


FULL = Settings(models={"convnet3": ModelSettings(64, (1, 8, 32)),
                        "resnet18": ModelSettings(256, (1, 4, 8))})
QUICK = Settings(models={"convnet3": ModelSettings(8, (1, 2), width=16),
                         "resnet18": ModelSettings(4, (2,), dtypes=("float32",), width=8)},
                 chunk_size=1, steps_per_call=2, timings=2, num_examples=256, torch_steps=5,
                 torch_members=2)


@dataclasses.dataclass(frozen=True)
class Result:
  """Throughput of one configuration (``images_per_s`` None when it failed, e.g. out of memory)."""

  model: str
  dtype: str
  members: int
  strategy: str
  chunk_size: int | None
  batch_size: int
  images_per_s: float | None
  step_ms: float | None
  error: str | None = None
  conv_impl: str = "xla"


def _strategies(num_members: int, chunk_size: int) -> list[tuple[str, int | None, str]]:
  """(strategy, chunk size, conv_impl) triples that apply to a population of ``num_members``.

  ``map`` runs one member at a time (the plain, ungrouped convolutions) and, when the population
  is larger than a chunk, in chunks of ``chunk_size`` vmapped members. Every strategy that vmaps
  several members is also timed with ``conv_impl="im2col"``.
  """
  vmapped = [("vmap", None)]
  if 1 < chunk_size < num_members:
    vmapped.append(("map", chunk_size))
  if jax.device_count() > 1 and num_members % jax.device_count() == 0:
    vmapped.append(("shard", None))
  impls = ("xla", "im2col") if num_members > 1 else ("xla",)
  return ([(strategy, chunk, impl) for strategy, chunk in vmapped for impl in impls]
          + [("map", 1, "xla")])


def time_strategies(model_name: str, dtype: str, num_members: int, data: train_lib.Data,
                    settings: Settings) -> Iterator[Result]:
  """Images/s of training ``num_members`` members of ``model_name`` under each strategy."""
  model_settings = settings.models[model_name]
  batch_size = model_settings.batch_size
  width = {} if model_settings.width is None else {"width": model_settings.width}
  models = {impl: get_model(model_name, num_classes=NUM_CLASSES, dtype=dtype, conv_impl=impl,
                            **width) for impl in ("xla", "im2col")}
  model = models["xla"]  # Both implementations have the same params.
  optimizer = train_lib.sgd(LEARNING_RATE)
  steps = {impl: train_lib.make_train_step(train_lib.model_apply_fn(m, MEAN, STD), optimizer,
                                           batch_size=batch_size, augment=None)
           for impl, m in models.items()}

  def member(key: jax.Array) -> train_lib.TrainState:
    init_key, data_key = jax.random.split(key)
    params, batch_stats = train_lib.init_variables(init_key, model, IMAGE_SHAPE)
    return train_lib.create_train_state(data_key, params, batch_stats, optimizer)

  strategies = _strategies(num_members, settings.chunk_size)
  try:
    states = population.init(member, jax.random.split(jax.random.PRNGKey(0), num_members))
  except jax.errors.JaxRuntimeError as error:  # Out of device memory, typically.
    for strategy, chunk_size, impl in strategies:
      yield Result(model_name, dtype, num_members, strategy, chunk_size, batch_size, None, None,
                   first_line(error), impl)
    return
  for strategy, chunk_size, impl in strategies:
    result = functools.partial(Result, model_name, dtype, num_members, strategy, chunk_size,
                               batch_size, conv_impl=impl)
    try:
      if strategy == "shard":
        mesh = population.make_mesh()
        inputs = (population.shard(states, mesh),
                  jax.device_put(data, NamedSharding(mesh, PartitionSpec())))
        population_step = population.run(steps[impl], strategy="shard", mesh=mesh)
      else:
        inputs = (states, data)
        population_step = population.run(steps[impl], strategy=strategy,
                                         chunk_size=chunk_size)
      train_steps = jax.jit(train_lib.repeat(population_step, settings.steps_per_call))
      seconds = common.median_seconds(lambda: train_steps(*inputs), settings.timings)
    except jax.errors.JaxRuntimeError as error:
      yield result(images_per_s=None, step_ms=None, error=first_line(error))
      continue
    images = num_members * batch_size * settings.steps_per_call
    yield result(images_per_s=images / seconds, step_ms=1e3 * seconds / settings.steps_per_call)


def time_torch_convnet3(dtype: str, settings: Settings) -> float:
  """Images/s of PyTorch eager ConvNet-3s trained one after another on CUDA.

  The same network as ``get_model("convnet3")``: 3 x [conv3x3 128 (bias), GroupNorm(128, 128),
  ReLU, AvgPool 2], Linear(2048, 10) at the default width 128; SGD with momentum 0.9 and weight
  decay 5e-4; batches drawn on the GPU from uint8 images held there and normalized per step, as
  the JAX step does; bfloat16 through autocast. Models and optimizers are built before the clock
  starts.
  """
  import torch  # noqa: PLC0415
  from torch import nn  # noqa: PLC0415

  batch_size = settings.models["convnet3"].batch_size
  width = settings.models["convnet3"].width or 128
  device = torch.device("cuda")
  torch.backends.cudnn.benchmark = True
  generator = torch.Generator(device=device).manual_seed(0)
  images = torch.randint(0, 256, (settings.num_examples, 3, *IMAGE_SHAPE[:2]),
                         dtype=torch.uint8, device=device, generator=generator)
  labels = torch.randint(0, NUM_CLASSES, (settings.num_examples,), device=device,
                         generator=generator)
  mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
  std = torch.tensor(STD, device=device).view(1, 3, 1, 1)

  def train(model: nn.Module, optimizer: torch.optim.Optimizer, num_steps: int) -> None:
    for _ in range(num_steps):
      index = torch.randint(0, settings.num_examples, (batch_size,), device=device,
                            generator=generator)
      x = (images[index].float() / 255 - mean) / std
      with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        loss = nn.functional.cross_entropy(model(x), labels[index])
      optimizer.zero_grad(set_to_none=True)
      loss.backward()
      optimizer.step()

  def convnet3() -> nn.Module:
    return common.torch_convnet3(width, IMAGE_SHAPE[0], NUM_CLASSES, device)

  models = [convnet3() for _ in range(settings.torch_members)]
  optimizers = [torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=0.9,
                                weight_decay=5e-4) for model in models]
  warm_up = convnet3()
  train(warm_up, torch.optim.SGD(warm_up.parameters(), lr=LEARNING_RATE), 10)  # cuDNN autotuning.
  torch.cuda.synchronize()
  start = time.perf_counter()
  for model, optimizer in zip(models, optimizers):
    train(model, optimizer, settings.torch_steps)
  torch.cuda.synchronize()
  seconds = time.perf_counter() - start
  return settings.torch_members * settings.torch_steps * batch_size / seconds


def fastest(results: Sequence[Result]) -> dict[tuple[str, str, int], Result]:
  """The fastest successful result per (model, dtype, members)."""
  best: dict[tuple[str, str, int], Result] = {}
  for result in results:
    key = (result.model, result.dtype, result.members)
    if result.images_per_s is not None and (
        key not in best or result.images_per_s > best[key].images_per_s):
      best[key] = result
  return best


def _strategy_label(result: Result) -> str:
  chunk = "" if result.chunk_size is None else f"(chunk={result.chunk_size})"
  return f"{result.strategy}{chunk}{common.impl_suffix(result.conv_impl)}"


_HEADER = f"{'model':<10}{'dtype':<10}{'N':>4}  {'strategy':<24}{'images/s':>12}{'ms/step':>10}"


def _row(result: Result) -> str:
  speed = (f"{result.images_per_s:>12,.0f}{result.step_ms:>10.2f}"
           if result.images_per_s is not None else f"  failed: {result.error}")
  return (f"{result.model:<10}{result.dtype:<10}{result.members:>4}  "
          f"{_strategy_label(result):<24}{speed}")


def _report(settings: Settings, quick: bool, results: Sequence[Result],
            torch_report: dict[str, Any] | None) -> dict[str, Any]:
  device = jax.devices()[0]
  return {
      "device": device.device_kind, "platform": device.platform,
      "device_count": jax.device_count(), "jax_version": jax.__version__, "quick": quick,
      "settings": dataclasses.asdict(settings),
      "results": [dataclasses.asdict(result) for result in results],
      "fastest": [{"model": m, "dtype": d, "members": n, "strategy": r.strategy,
                   "chunk_size": r.chunk_size, "conv_impl": r.conv_impl,
                   "images_per_s": r.images_per_s}
                  for (m, d, n), r in fastest(results).items()],
      "torch": torch_report,
  }


def run_benchmark(settings: Settings, models: Sequence[str], quick: bool,
                  save: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
  """Times every configuration, prints the table and returns the JSON report, saved after
  each measurement (a time limit that stops the run keeps what was measured)."""
  data = train_lib.device_data(
      common.synthetic_split(settings.num_examples, IMAGE_SHAPE, NUM_CLASSES))
  print(f"{jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}")
  torch_report = None
  if "convnet3" in models and common.torch_cuda_available():
    # First, so that a time limit stopping the (many) JAX configurations keeps the baseline.
    convnet = settings.models["convnet3"]
    torch_report = {"members": settings.torch_members, "steps_per_model": settings.torch_steps,
                    "batch_size": convnet.batch_size, "speedup": {},
                    "images_per_s": {dtype: time_torch_convnet3(dtype, settings)
                                     for dtype in convnet.dtypes}}
    print(f"PyTorch eager, {settings.torch_members} ConvNet-3 one after another: "
          + ", ".join(f"{dtype} {speed:,.0f} images/s"
                      for dtype, speed in torch_report["images_per_s"].items()), flush=True)
  print(f"{_HEADER}\n{'-' * len(_HEADER)}", flush=True)
  results = []
  for model_name in models:
    model_settings = settings.models[model_name]
    for dtype in model_settings.dtypes:
      for num_members in model_settings.members:
        for result in time_strategies(model_name, dtype, num_members, data, settings):
          print(_row(result), flush=True)
          results.append(result)
          save(_report(settings, quick, results, torch_report))
  best = fastest(results)
  print("\nfastest strategy per (model, dtype, N):")
  for (model_name, dtype, num_members), result in best.items():
    print(f"  {model_name} {dtype} N={num_members}: {_strategy_label(result)} "
          f"({result.images_per_s:,.0f} images/s)")

  if torch_report is not None:
    largest = max(convnet.members)
    print(f"\nPyTorch eager, {settings.torch_members} ConvNet-3 one after another, "
          f"vs the fastest population of N={largest}:")
    for dtype, torch_speed in torch_report["images_per_s"].items():
      population_best = best.get(("convnet3", dtype, largest))
      if population_best is None:
        print(f"  {dtype}: PyTorch {torch_speed:,.0f} images/s; no population result")
        continue
      speedup = population_best.images_per_s / torch_speed
      torch_report["speedup"][dtype] = speedup
      print(f"  {dtype}: population {population_best.images_per_s:,.0f} images/s "
            f"({_strategy_label(population_best)}) / PyTorch {torch_speed:,.0f} images/s = "
            f"{speedup:.1f}x (target >= 10x)")

  report = _report(settings, quick, results, torch_report)
  save(report)
  return report


def main(argv: Sequence[str] | None = None) -> int:
  args = common.parse_args(__doc__, "benchmarks/out/population.json", argv, lambda parser: (
      parser.add_argument("--models", default="convnet3,resnet18",
                          help="comma-separated subset of: convnet3, resnet18")))
  settings = QUICK if args.quick else FULL
  models = [name for name in args.models.split(",") if name]
  with exit_on_user_error():
    unknown = [name for name in models if name not in settings.models]
    if unknown or not models:
      raise UserError(f"--models {args.models!r}: choose from {', '.join(settings.models)}")
    run_benchmark(settings, models, args.quick, common.json_writer(args.out))
  print(f"\nwrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
