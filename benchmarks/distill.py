"""Dataset distillation speed: an Acc-DD outer iteration, and evaluation nets as one population.

    python -m benchmarks.distill [--quick] [--out benchmarks/out/distill.json]

The default parts (``--parts outer,evaluation``) run on synthetic data (uniform random uint8
images held in device memory), so no dataset needs to be prepared:

1. **Outer iteration**: one Acc-DD outer iteration on a CIFAR-10-shaped problem (10 classes,
   32x32x3, IPC 10, factor 2, ConvNet-3 width 128): 100 inner iterations, each a matching step
   over all classes (real batch 64, 40 decoded synthetic images per class, Siamese DSA, IDC's
   squared gradient distance, second-order backward) plus 32 SGD steps of the net on real data
   with DSA + CutMix; 20 inner iterations are timed as one ``lax.scan`` and scaled to 100 (a
   ``chunkC`` variant times C whole outer iterations per call). The
   net comes from a pool (randomly initialized here; pretraining does not change the cost) and
   is perturbed. Printed: seconds per outer iteration, compile seconds, the program's host waits
   (``jaxtickets.compiled``: conditionals and data-dependent loops, each a GPU-to-host round trip
   per execution) and the projected time of the paper's 500, for
   the variants of ``Settings.outer`` / ``--outer`` (M nets per update, how the nets and classes
   are mapped, compute dtype, net steps, convolutions, trajectory chunk; by default M = 1 as the
   reference in float32 and bfloat16, and the setting of the distillation's
   ``cifar10_ipc10_fast`` preset: bfloat16, vmapped classes, im2col, chunks of 20).
2. **Evaluation throughput**: N = 1, 8, 32 ConvNet-3s (float32, and bfloat16 compute with
   float32 params) trained as one population on a decoded IPC-10 set (400 images), batch 64,
   per-sample DSA + CutMix, SGD; images/s over all nets.
3. When PyTorch with CUDA is importable: the same evaluation training one net after another in a
   PyTorch eager loop (the same ConvNet-3, per-sample DSA color/crop/flip/scale/rotate via
   ``affine_grid``, CutMix p 0.5, SGD 0.01 / 0.9 / 5e-4), and the speed-up of 32 nets as one
   population over it (target >= 10x).
4. ``--parts precision`` (real data, ``--dataset``, default the shared CIFAR-10 npz): the
   evaluation protocol's final test accuracy in float32 and in bfloat16 on IPC-10 random real
   images and on IDC's decoded ``mix`` start, so the bfloat16 speed is not bought with accuracy.

``--quick`` shrinks everything (16x16 images, width 8, 2 inner iterations, 1 net step, N = 1
and 2; precision on digits for 2 epochs) to run on a CPU; its numbers only show that the
benchmark runs.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from benchmarks import common
from jaxtickets import compiled, population
from jaxtickets import data as data_lib
from jaxtickets import train as train_lib
from jaxtickets.distill import augment_models, evaluate, matching, methods, synthetic
from jaxtickets.errors import UserError, exit_on_user_error, first_line
from jaxtickets.models import get_model

NUM_CLASSES = 10
IPC = 10
MEAN, STD = (0.5,) * 3, (0.2887,) * 3  # uniform pixels on [0, 1]


@dataclasses.dataclass(frozen=True)
class Settings:
  """One benchmark run.

  Attributes:
    image_size: H = W of the images (3 channels).
    width: ConvNet-3 width.
    inner_iterations: inner iterations per outer iteration.
    timed_inner_iterations: inner iterations per timed call (one scan), scaled up to
      ``inner_iterations``; fewer keep the benchmark short, the per-iteration cost is the same.
    outer: the outer-iteration variants to time, each
      ``M/model_map/class_map/dtype/net_steps[/conv_impl]``: M nets per image update;
      ``make_distill_step``'s maps over the nets and over the classes ("vmap" batches them,
      which with XLA's convolutions makes the per-class weight gradients grouped convolutions;
      "unroll" runs them one by one, "map" loops); the nets' compute dtype; net SGD steps per
      inner iteration (0 times the matching alone); the model's ``conv_impl`` (default "xla";
      "im2col" makes the batched convolutions batched matrix products); ``chunkC``: C outer
      iterations per timed call with ``make_distill_step``'s ``trajectory_chunk`` (their nets
      trained first as one population of C x M, then the matching steps in order).
    evaluation: the evaluation variants to time, each ``dtype/N[/conv_impl]``: the nets'
      compute dtype (params stay float32), the population size N, and the model's
      ``conv_impl`` (default "xla", run by the measured default strategy; "im2col" is run by
      ``vmap``, the strategy it is for).
    eval_steps: evaluation steps per timed call.
    num_examples: real images in device memory.
    timings: timed calls (median).
    torch_steps: steps per net in the PyTorch loop.
    torch_nets: nets trained one after another in the PyTorch loop.
    projected_outer: outer iterations of the projection (the paper's 500).
    precision_dataset: the real dataset of the ``precision`` part (``data.load_dataset`` name).
    precision_dtypes: its compute dtypes.
    precision_epochs: its evaluation epochs (the protocol's 1000).
  """
  image_size: int = 32
  width: int = 128
  inner_iterations: int = 100
  timed_inner_iterations: int = 20
  outer: tuple[str, ...] = ("1/vmap/unroll/float32/32", "1/vmap/unroll/bfloat16/32",
                            "1/vmap/vmap/bfloat16/32/im2col/chunk20")
  evaluation: tuple[str, ...] = tuple(f"{dtype}/{n}" for dtype in ("float32", "bfloat16")
                                     for n in (1, 8, 32))
  eval_steps: int = 50
  num_examples: int = 10_000
  timings: int = 3
  torch_steps: int = 50
  torch_nets: int = 8
  projected_outer: int = 500
  precision_dataset: str = f"npz:{data_lib.shared_data_dir() / 'cifar10' / 'cifar10_jpeg.npz'}"
  precision_dtypes: tuple[str, ...] = ("float32", "bfloat16")
  precision_epochs: int = 1000


FULL = Settings()
QUICK = Settings(image_size=16, width=8, inner_iterations=2, timed_inner_iterations=2,
                 outer=("1/unroll/unroll/float32/1", "2/vmap/vmap/float32/1/im2col",
                        "1/unroll/unroll/float32/1/chunk2"),
                 evaluation=("float32/1", "float32/2", "float32/2/im2col"), eval_steps=2,
                 num_examples=512, timings=2, torch_steps=3, torch_nets=2,
                 precision_dataset="digits", precision_dtypes=("float32",), precision_epochs=2)


class OuterVariant(NamedTuple):
  """One timed outer-iteration setting
  (``M/model_map/class_map/dtype/net_steps[/conv_impl][/chunkC]``; see ``Settings.outer``)."""
  num_models: int
  model_map: str
  class_map: str
  dtype: str
  net_steps: int
  conv_impl: str = "xla"
  trajectory_chunk: int | None = None

  @classmethod
  def parse(cls, text: str) -> OuterVariant:
    parts = text.split("/")
    options: dict[str, Any] = {
        ("trajectory_chunk" if part.startswith("chunk") else "conv_impl"): part
        for part in parts[5:]}
    chunk = options.get("trajectory_chunk", "chunk1")[len("chunk"):]
    if (len(parts) - 5 not in (0, len(options)) or not parts[0].isdecimal() or int(parts[0]) < 1
        or not parts[4].isdecimal() or not chunk.isdecimal() or int(chunk) < 1):
      raise UserError(f"outer variant {text!r}: expected "
                      "M/model_map/class_map/dtype/net_steps[/conv_impl][/chunkC] with M, C >= 1, "
                      "e.g. 1/vmap/unroll/bfloat16/32, 10/vmap/vmap/bfloat16/32/im2col or "
                      "1/vmap/unroll/bfloat16/32/chunk32")
    if "trajectory_chunk" in options:
      options["trajectory_chunk"] = int(chunk)
    variant = cls(int(parts[0]), parts[1], parts[2], parts[3], int(parts[4]), **options)
    for field in ("model_map", "class_map"):
      if getattr(variant, field) not in matching.MAP_STRATEGIES:
        raise UserError(f"{field}={getattr(variant, field)!r}; known: "
                        f"{', '.join(matching.MAP_STRATEGIES)}")
    if variant.trajectory_chunk:
      methods.check_trajectory_chunk(methods.get_method("acc_dd", IPC, net_steps=variant.net_steps))
    _check_model_options(variant.dtype, variant.conv_impl)
    return variant


def time_outer_iteration(settings: Settings, variant: OuterVariant) -> dict[str, Any]:
  """Seconds of one Acc-DD outer iteration (inner iterations as one compiled scan, or a
  ``trajectory_chunk`` of outer iterations as one call)."""
  image_shape = (settings.image_size, settings.image_size, 3)
  model = get_model("convnet3", num_classes=NUM_CLASSES, width=settings.width,
                    dtype=variant.dtype, conv_impl=variant.conv_impl)
  method = methods.get_method("acc_dd", IPC, inner_iterations=settings.inner_iterations,
                              net_steps=variant.net_steps)
  net_optimizer = train_lib.sgd(0.01)
  real = common.synthetic_split(settings.num_examples, image_shape, NUM_CLASSES)
  pool = augment_models.init_nets(jax.random.key(1), model, image_shape, 5, net_optimizer)
  data = methods.distill_data(real, NUM_CLASSES,
                              {"params": pool.params, "batch_stats": pool.batch_stats})
  step = methods.make_distill_step(
      method, model, mean=MEAN, std=STD, num_classes=NUM_CLASSES, image_shape=image_shape,
      images_per_class=IPC, num_models=variant.num_models,
      real_batch=methods.real_batch_size(method, real.labels, NUM_CLASSES),
      net_optimizer=net_optimizer, model_map=variant.model_map, class_map=variant.class_map,
      trajectory_chunk=variant.trajectory_chunk)
  images = synthetic.init_images(0, real.images, real.labels, NUM_CLASSES, IPC,
                                 factor=method.factor, init=method.init)
  nets = augment_models.init_nets(jax.random.key(2), model, image_shape, variant.num_models,
                                  net_optimizer)
  holder = {"state": methods.init_state(jax.random.key(3), images,
                                        methods.image_optimizer(method, IPC, STD), nets)}
  chunk = variant.trajectory_chunk
  outer, compile_s = common.compile_ahead(
      train_lib.repeat(step, 1 if chunk else settings.timed_inner_iterations),
      holder["state"], data)

  def call():
    holder["state"], metrics = outer(holder["state"], data)
    return metrics

  first, seconds = common.first_and_median_seconds(call, settings.timings)
  seconds *= (1 / chunk if chunk
              else settings.inner_iterations / settings.timed_inner_iterations)
  return {**variant._asdict(), "outer_iteration_s": seconds, "compile_s": compile_s,
          "first_call_s": first, "host_waits": compiled.host_waits(outer),
          "projected_s": seconds * settings.projected_outer / variant.num_models,
          "projected_outer_iterations": settings.projected_outer / variant.num_models}


def time_evaluation(settings: Settings, num_nets: int, dtype: str,
                    conv_impl: str = "xla") -> dict[str, Any]:
  """Images/s of ``num_nets`` evaluation nets trained as one population in ``dtype`` (see
  ``Settings.evaluation`` for ``conv_impl``)."""
  image_shape = (settings.image_size, settings.image_size, 3)
  model = get_model("convnet3", num_classes=NUM_CLASSES, width=settings.width, dtype=dtype,
                    conv_impl=conv_impl)
  protocol = evaluate.Protocol(num_nets=num_nets)
  split = common.synthetic_split(NUM_CLASSES * IPC * 4, image_shape, NUM_CLASSES, seed=1)
  steps_per_epoch = data_lib.steps_per_epoch(len(split.labels), protocol.batch_size)
  net_optimizer = evaluate.optimizer(protocol, steps_per_epoch)
  nets = augment_models.init_nets(jax.random.key(0), model, image_shape, num_nets,
                                  net_optimizer)
  step = evaluate.make_step(train_lib.model_apply_fn(model, MEAN, STD), protocol, net_optimizer,
                            len(split.labels), MEAN, STD)
  num_params = sum(leaf.size for leaf in jax.tree.leaves(nets.params)) // num_nets
  options = (population.default_strategy("convnet3", num_params) if conv_impl == "xla"
             else {"strategy": "vmap", "chunk_size": None})
  data = train_lib.device_data(split)
  run, compile_s = common.compile_ahead(
      train_lib.repeat(population.run(step, **options), settings.eval_steps), nets, data)
  holder = {"nets": nets}

  def call():
    holder["nets"], metrics = run(holder["nets"], data)
    return metrics

  first, seconds = common.first_and_median_seconds(call, settings.timings)
  images = num_nets * protocol.batch_size * settings.eval_steps
  return {"num_nets": num_nets, "dtype": dtype, "conv_impl": conv_impl,
          "strategy": options["strategy"],
          "images_per_s": images / seconds, "step_ms": 1e3 * seconds / settings.eval_steps,
          "compile_s": compile_s, "first_call_s": first, "host_waits": compiled.host_waits(run)}


def time_torch_evaluation(settings: Settings) -> float:
  """Images/s of PyTorch eager ConvNet-3s trained one after another (DSA + CutMix) on CUDA."""
  import math  # noqa: PLC0415

  import torch  # noqa: PLC0415
  import torch.nn.functional as F  # noqa: PLC0415,N812
  from torch import nn  # noqa: PLC0415

  device = torch.device("cuda")
  torch.backends.cudnn.benchmark = True
  size, width, batch = settings.image_size, settings.width, 64
  split = common.synthetic_split(NUM_CLASSES * IPC * 4, (size, size, 3), NUM_CLASSES, seed=1)
  images = torch.from_numpy(split.images).to(device).permute(0, 3, 1, 2).float() / 255
  labels = torch.from_numpy(split.labels).long().to(device)
  mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
  std = torch.tensor(STD, device=device).view(1, 3, 1, 1)

  def convnet3() -> nn.Module:
    return common.torch_convnet3(width, size, NUM_CLASSES, device)

  def dsa(x: torch.Tensor) -> torch.Tensor:
    """Per-sample DSA as IDC's DiffAug(batch=False): flip, color, one of crop/scale/rotate."""
    n = x.shape[0]
    x = torch.where(torch.rand(n, 1, 1, 1, device=device) < 0.5, x.flip(3), x)
    x = x + (torch.rand(n, 1, 1, 1, device=device) - 0.5)
    m = x.mean(dim=1, keepdim=True)
    x = (x - m) * (torch.rand(n, 1, 1, 1, device=device) * 2) + m
    m = x.mean(dim=[1, 2, 3], keepdim=True)
    x = (x - m) * (torch.rand(n, 1, 1, 1, device=device) + 0.5) + m
    theta = torch.zeros(n, 2, 3, device=device)
    choice = np.random.randint(3)
    if choice == 0:
      shift = int(size * 0.125 + 0.5)
      theta[:, 0, 0] = theta[:, 1, 1] = 1
      theta[:, :, 2] = torch.randint(-shift, shift + 1, (n, 2), device=device) * 2 / size
    elif choice == 1:
      theta[:, 0, 0] = torch.rand(n, device=device) * (1.2 - 1 / 1.2) + 1 / 1.2
      theta[:, 1, 1] = torch.rand(n, device=device) * (1.2 - 1 / 1.2) + 1 / 1.2
    else:
      angle = (torch.rand(n, device=device) - 0.5) * 2 * 15 / 180 * math.pi
      theta[:, 0, 0], theta[:, 0, 1] = angle.cos(), -angle.sin()
      theta[:, 1, 0], theta[:, 1, 1] = angle.sin(), angle.cos()
    grid = F.affine_grid(theta, x.shape, align_corners=False)
    return F.grid_sample(x, grid, align_corners=False)

  def train(model: nn.Module, optimizer: torch.optim.Optimizer, num_steps: int) -> None:
    for _ in range(num_steps):
      index = torch.randint(0, len(labels), (batch,), device=device)
      with torch.no_grad():
        x = dsa((images[index] - mean) / std)
      y = labels[index]
      if np.random.rand() < 0.5:  # CutMix
        lam = np.random.beta(1.0, 1.0)
        permutation = torch.randperm(batch, device=device)
        cut = int(size * math.sqrt(1 - lam))
        cx, cy = np.random.randint(size), np.random.randint(size)
        x1, x2 = np.clip(cx - cut // 2, 0, size), np.clip(cx + cut // 2, 0, size)
        y1, y2 = np.clip(cy - cut // 2, 0, size), np.clip(cy + cut // 2, 0, size)
        x[:, :, x1:x2, y1:y2] = x[permutation, :, x1:x2, y1:y2]
        ratio = 1 - (x2 - x1) * (y2 - y1) / size ** 2
        output = model(x)
        loss = F.cross_entropy(output, y) * ratio + F.cross_entropy(output, y[permutation]) * (
            1 - ratio)
      else:
        loss = F.cross_entropy(model(x), y)
      optimizer.zero_grad(set_to_none=True)
      loss.backward()
      optimizer.step()

  nets = [convnet3() for _ in range(settings.torch_nets)]
  optimizers = [torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
                for net in nets]
  warm_up = convnet3()
  train(warm_up, torch.optim.SGD(warm_up.parameters(), lr=0.01), 10)
  torch.cuda.synchronize()
  start = time.perf_counter()
  for net, optimizer in zip(nets, optimizers):
    train(net, optimizer, settings.torch_steps)
  torch.cuda.synchronize()
  return settings.torch_nets * settings.torch_steps * batch / (time.perf_counter() - start)


def evaluation_accuracy(dataset_name: str, dtypes: Sequence[str], epochs: int,
                        num_nets: int = 5) -> list[dict[str, Any]]:
  """Final test accuracy of the evaluation protocol in each compute dtype, on real data.

  Two training sets of a real dataset (e.g. ``npz:.../cifar10_jpeg.npz``): IPC random real images
  per class, and IDC's ``mix`` start (IPC stored images per class, each 2x2 real images, decoded
  to 4 x IPC) — the second is the size the speed numbers time. Same keys in every dtype, so the
  rows differ only by precision.
  """
  dataset = data_lib.load_dataset(dataset_name)
  train, num_classes = dataset.train, dataset.num_classes
  test = train_lib.device_data(dataset.test)
  sets = {
      "random real": synthetic.random_real_split(0, train.images, train.labels, num_classes,
                                                 IPC),
      "mix start (decoded)": synthetic.decoded_split(synthetic.init_images(
          0, train.images, train.labels, num_classes, IPC, factor=2, init="mix"), 2)}
  protocol = evaluate.Protocol(num_nets=num_nets, epochs=epochs)
  rows = []
  for dtype in dtypes:
    model = get_model("convnet3", num_classes=num_classes, dtype=dtype)
    for name, split in sets.items():
      result = evaluate.evaluate_split(jax.random.key(0), model, split, test, protocol,
                                       mean=dataset.mean, std=dataset.std, progress=False)
      rows.append({"dtype": dtype, "set": name, "images": len(split.labels), **result})
      print(f"{dtype:<10}{name:<22}{len(split.labels):>7}{100 * result['mean']:>9.2f} +- "
            f"{100 * result['std']:.2f}{result['seconds']:>9.1f}", flush=True)
  return rows


PARTS = ("outer", "evaluation", "precision")
DEFAULT_PARTS = ("outer", "evaluation")


def _evaluation_variant(text: str) -> tuple[str, int, str]:
  """(dtype, N, conv_impl) of ``dtype/N[/conv_impl]``."""
  parts = text.split("/")
  if len(parts) not in (2, 3) or not parts[1].isdigit() or int(parts[1]) < 1:
    raise UserError(f"evaluation variant {text!r}: expected dtype/N[/conv_impl], e.g. "
                    "bfloat16/32 or bfloat16/32/im2col")
  dtype, num_nets, conv_impl = parts[0], int(parts[1]), *(parts[2:] or ["xla"])
  _check_model_options(dtype, conv_impl)
  return dtype, num_nets, conv_impl


def _check_model_options(dtype: str, conv_impl: str) -> None:
  """Raises UserError for a dtype or conv_impl no model takes, before anything is timed."""
  get_model("convnet3", num_classes=NUM_CLASSES, dtype=dtype, conv_impl=conv_impl)


def _attempt(measure: Callable[[], dict[str, Any]], identity: dict[str, Any],
             row: str) -> dict[str, Any]:
  """``measure()``; when the device fails it (out of memory, typically), ``identity`` with the
  error's first line under "error", printed after ``row``, so later variants still run."""
  try:
    return measure()
  except jax.errors.JaxRuntimeError as error:
    print(f"{row}  failed: {first_line(error)}", flush=True)
    return {**identity, "error": first_line(error)}


def run_benchmark(settings: Settings, quick: bool, save: Callable[[dict[str, Any]], None],
                  parts: Sequence[str] = DEFAULT_PARTS) -> dict[str, Any]:
  """Times ``parts`` (see module docstring; "evaluation" includes the PyTorch baseline), prints
  the tables, and saves the report after each measurement; the PyTorch baseline and the
  evaluation run before the outer variants, which take most of a run's time."""
  device = jax.devices()[0]
  print(f"{device.device_kind} ({device.platform}), jax {jax.__version__}; ConvNet-3 width "
        f"{settings.width}, {settings.image_size}x{settings.image_size}x3, IPC {IPC}",
        flush=True)
  report: dict[str, Any] = {"device": device.device_kind, "platform": device.platform,
                            "jax_version": jax.__version__, "quick": quick,
                            "settings": dataclasses.asdict(settings), "outer_iteration": [],
                            "evaluation": [], "torch": None}
  variants = [OuterVariant.parse(text) for text in settings.outer] if "outer" in parts else []
  evaluations = [_evaluation_variant(text) for text in settings.evaluation] \
      if "evaluation" in parts else []
  # The baseline and the (short) evaluation first, so that a time limit stopping the outer
  # variants keeps them.
  torch_speed = None
  if evaluations and common.torch_cuda_available():
    torch_speed = time_torch_evaluation(settings)
    report["torch"] = {"images_per_s": torch_speed, "nets": settings.torch_nets,
                       "steps_per_net": settings.torch_steps, "dtype": "float32"}
    print(f"\nPyTorch eager fp32 (the reference's precision), one net after another: "
          f"{torch_speed:,.0f} images/s", flush=True)
    save(report)
  elif evaluations:
    print("\nPyTorch baseline skipped: torch with CUDA is not importable")
  if evaluations:
    print("\nEvaluation nets trained as one population (batch 64, DSA + CutMix):")
    print(f"{'dtype':<9}{'N':>3}  {'strategy':<14}{'images/s':>12}{'ms/step':>10}"
          f"{'host waits':>12}")
  for dtype, num_nets, conv_impl in evaluations:
    result = _attempt(functools.partial(time_evaluation, settings, num_nets, dtype, conv_impl),
                      {"num_nets": num_nets, "dtype": dtype, "conv_impl": conv_impl},
                      f"{dtype:<9}{num_nets:>3}  {conv_impl:<14}")
    report["evaluation"].append(result)
    if "error" not in result:
      strategy = result["strategy"] + common.impl_suffix(conv_impl)
      print(f"{dtype:<9}{num_nets:>3}  {strategy:<14}{result['images_per_s']:>12,.0f}"
            f"{result['step_ms']:>10.2f}{len(result['host_waits']):>12}", flush=True)
    save(report)
  if torch_speed is not None:
    largest = max(num_nets for _, num_nets, _ in evaluations)
    speedups = {result["dtype"] + common.impl_suffix(result["conv_impl"]):
                result["images_per_s"] / torch_speed for result in report["evaluation"]
                if result["num_nets"] == largest and "error" not in result}
    report["torch"][f"speedup_of_{largest}_nets"] = speedups
    print(f"{largest} nets as one population over PyTorch one at a time: "
          + ", ".join(f"{dtype} {ratio:.1f}x" for dtype, ratio in speedups.items())
          + " (target >= 10x)")
    save(report)
  if variants:
    print(f"\nAcc-DD outer iteration ({settings.inner_iterations} inner iterations; net_steps 0 "
          "times the matching alone):")
    print(f"{'M':>3}  {'maps':<29}{'dtype':<10}{'net steps':>10}{'s/outer':>10}"
          f"{'compile s':>11}{'host waits':>12}{'projected':>22}")
  for variant in variants:
    maps = f"{variant.model_map}/{variant.class_map}" + common.impl_suffix(variant.conv_impl)
    if variant.trajectory_chunk:
      maps += f" chunk{variant.trajectory_chunk}"
    row = f"{variant.num_models:>3}  {maps:<29}{variant.dtype:<10}{variant.net_steps:>10}"
    result = _attempt(functools.partial(time_outer_iteration, settings, variant),
                      variant._asdict(), row)
    report["outer_iteration"].append(result)
    if "error" not in result:
      print(f"{row}{result['outer_iteration_s']:>10.3f}"
            f"{result['compile_s']:>11.1f}{len(result['host_waits']):>12}"
            f"{result['projected_s'] / 60:>12.1f} min for "
            f"{result['projected_outer_iterations']:.0f} outer", flush=True)
    save(report)
  if "precision" in parts:
    print(f"\nEvaluation accuracy by compute dtype ({settings.precision_dataset}, "
          f"{settings.precision_epochs} epochs, 5 nets; final test accuracy %):")
    print(f"{'dtype':<10}{'set':<22}{'images':>7}{'accuracy':>17}{'seconds':>9}")
    report["precision"] = evaluation_accuracy(settings.precision_dataset, settings.precision_dtypes,
                                              settings.precision_epochs)
  save(report)
  return report


def main(argv: Sequence[str] | None = None) -> int:
  def extra(parser):
    parser.add_argument("--parts", default=",".join(DEFAULT_PARTS),
                        help=f"comma-separated subset of: {', '.join(PARTS)} (precision needs "
                        "--dataset, default the shared CIFAR-10 npz)")
    parser.add_argument("--dataset", help="the precision part's dataset")
    parser.add_argument("--outer", help="comma-separated "
                        "M/model_map/class_map/dtype/net_steps[/conv_impl][/chunkC] variants "
                        "(default: the settings')")
    parser.add_argument("--evaluation", help="comma-separated dtype/N[/conv_impl] variants")

  args = common.parse_args(__doc__, "benchmarks/out/distill.json", argv, extra)
  parts = [part for part in args.parts.split(",") if part]
  settings = QUICK if args.quick else FULL
  for field in ("outer", "evaluation"):
    if getattr(args, field):
      settings = dataclasses.replace(settings, **{field: tuple(getattr(args, field).split(","))})
  if args.dataset:
    settings = dataclasses.replace(settings, precision_dataset=args.dataset)
  with exit_on_user_error():
    if not parts or set(parts) - set(PARTS):
      raise UserError(f"--parts {args.parts!r}: choose from {', '.join(PARTS)}")
    run_benchmark(settings, args.quick, common.json_writer(args.out), parts)
  print(f"\nwrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
