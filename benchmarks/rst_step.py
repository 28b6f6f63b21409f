"""Images/s of one RST search step, in JAX and in PyTorch eager as the reference code runs it.

    python -m benchmarks.rst_step [--quick] [--out benchmarks/out/rst_step.json]

The step (``jaxtickets.rst.make_search_step``): a ResNet-18 ticket (non-affine BatchNorm, every
conv and the classifier masked, keep ratio 0.05) draws a batch of 256 synthetic 32x32x3 images
from device memory, attacks it with PGD-7 (eps 8/255, step 2/255, random start, BatchNorm in
train mode updating its running statistics on every pass), and takes one SGD step on the scores
from the adversarial batch. JAX forms the subnetwork once per step; it is timed in float32 and
in bfloat16 compute (parameters stay float32), ``steps_per_call`` steps per compiled call.

When PyTorch is importable and CUDA is available, the same step is timed in PyTorch eager
written the way the official RST code (and edge-popup) works: ``SubnetConv`` layers whose
``GetSubnet`` autograd function sorts the scores in EVERY forward, the model in train mode
during the attack, ``torch.autograd.grad`` for the attack, ``loss.backward()`` and
``torch.optim.SGD`` for the scores; in float32 (the reference) and under bfloat16 autocast.
Neither side augments (the reference does that in its data loader).

It also reports the model-FLOP rate: FLOPs per image and step = dense MACs (from
``tickets.effective_flops``) x 2 x 3 (forward + backward = 3 forwards) x (7 attack passes + 1
training pass), as achieved by the bf16 step, against the card's bf16 matmul rate measured here
(a large ``jnp.dot``). The attack's backward passes need no weight gradients, so the count is an
upper bound on the work done, as is usual for model-FLOP utilization.

``--quick`` shrinks everything (width 8, batch 4, few iterations) to run on a CPU; its numbers
only show that the benchmark runs. ``--torch-device cpu`` times
the PyTorch step on the CPU (to check that code path where there is no GPU).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import platform
import subprocess
import time
import traceback
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from jaxtickets import data as data_lib
from jaxtickets import rst, tickets
from jaxtickets import train as train_lib
from jaxtickets.errors import exit_on_user_error
from jaxtickets.models import get_model

IMAGE_SHAPE = (32, 32, 3)
NUM_CLASSES = 10
# CIFAR-10's normalization (inside the model, as the reference's normalize layer).
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
LEARNING_RATE = 0.1
ATTACK = rst.TrainingAttack()  # PGD-7, eps 8/255, step 2/255, random start, BN "update"


@dataclasses.dataclass(frozen=True)
class Settings:
  """One benchmark run.

  Attributes:
    batch_size: images per step.
    width: ResNet-18 base width (64 is the real network).
    keep_ratio: the ticket's keep ratio (costs do not depend on it: dense kernels are used).
    steps_per_call: JAX steps per compiled call (one ``lax.scan``).
    timings: timed JAX calls (the median counts), after one untimed call.
    num_examples: synthetic images in device memory.
    matmul_size: n of the n x n x n bf16 matmul that measures the card's rate.
    torch_warmup: untimed PyTorch steps.
    torch_steps: timed PyTorch steps.
  """
  batch_size: int
  width: int
  keep_ratio: float = 0.05
  steps_per_call: int = 10
  timings: int = 3
  num_examples: int = 10_240
  matmul_size: int = 8192
  torch_warmup: int = 3
  torch_steps: int = 10


FULL = Settings(batch_size=256, width=64)
QUICK = Settings(batch_size=4, width=8, steps_per_call=1, timings=2, num_examples=64,
                 matmul_size=256, torch_warmup=1, torch_steps=2)


def flops_per_image(settings: Settings) -> tuple[int, int]:
  """(dense MACs of one forward, model FLOPs of one search step) per image."""
  model = get_model("resnet18", num_classes=NUM_CLASSES, width=settings.width,
                    **rst.MODEL_OPTIONS)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                                jnp.zeros((1, *IMAGE_SHAPE)), train=False))
  mask = jax.tree.map(lambda leaf: np.ones(leaf.shape, bool), variables["params"])
  dense_macs, _ = tickets.effective_flops(model, variables, mask, (1, *IMAGE_SHAPE))
  passes = ATTACK.num_steps + 1
  return dense_macs, dense_macs * 2 * 3 * passes


def time_jax(dtype: str, settings: Settings, images: np.ndarray,
             labels: np.ndarray) -> dict[str, Any]:
  """Images/s of the JAX search step in compute dtype ``dtype``."""
  model = get_model("resnet18", num_classes=NUM_CLASSES, width=settings.width, dtype=dtype,
                    **rst.MODEL_OPTIONS)
  params, batch_stats = train_lib.init_variables(jax.random.key(0), model, IMAGE_SHAPE)
  prunable = tickets.prunable(params)
  kept = tickets.kept_counts(params, settings.keep_ratio, prunable)
  ticket = rst.init_ticket(jax.random.key(1), jax.random.key(2), params, kept, prunable)
  optimizer = rst.score_optimizer(LEARNING_RATE)
  state = rst.init_search_state(jax.random.key(3), ticket, batch_stats, optimizer)
  step = rst.make_search_step(train_lib.model_apply_fn(model, MEAN, STD), optimizer, prunable,
                              batch_size=settings.batch_size, augment=None, attack=ATTACK)
  run = jax.jit(train_lib.repeat(step, settings.steps_per_call))
  data = train_lib.device_data(data_lib.Split(images, labels))
  holder = {"state": state}

  def call():
    holder["state"], metrics = run(holder["state"], data)
    jax.block_until_ready(metrics)

  start = time.perf_counter()
  call()
  compile_s = time.perf_counter() - start
  seconds = common.median_seconds(call, settings.timings)
  images_per_call = settings.batch_size * settings.steps_per_call
  return {"images_per_s": images_per_call / seconds,
          "step_ms": 1e3 * seconds / settings.steps_per_call,
          "first_call_s": compile_s}


def matmul_rate(size: int, timings: int = 5, chain: int = 50, warmup_s: float = 1.0) -> float:
  """Measured FLOP/s of n x n x n bf16 matmuls (f32 accumulation) on the default device.

  ``chain`` products run in one compiled call, each multiplying the last one's result (so none
  can be dropped or hoisted), after ``warmup_s`` seconds of the same calls: a few products right
  after the card idled run below its full clocks.
  """
  x = jax.random.normal(jax.random.key(0), (size, size), jnp.bfloat16)
  # Scaled so that repeated products keep unit variance.
  b = (jax.random.normal(jax.random.key(1), (size, size)) / size**0.5).astype(jnp.bfloat16)

  @jax.jit
  def products(x):
    return jax.lax.fori_loop(0, chain, lambda _, x: jnp.dot(
        x, b, preferred_element_type=jnp.float32).astype(jnp.bfloat16), x, unroll=True)

  started = time.perf_counter()
  while time.perf_counter() - started < warmup_s:
    jax.block_until_ready(products(x))
  return 2 * size**3 * chain / common.median_seconds(lambda: products(x), timings)


# ----------------------------------------------------------------------------------------------
# PyTorch: the reference code's step


def time_torch(settings: Settings, images: np.ndarray, labels: np.ndarray, *, device: str,
               autocast_bf16: bool) -> dict[str, Any]:
  """Images/s of the RST search step as the reference PyTorch code runs it."""
  import torch  # noqa: PLC0415  (optional dependency)
  import torch.nn.functional as F  # noqa: PLC0415,N812
  from torch import nn  # noqa: PLC0415

  class GetSubnet(torch.autograd.Function):
    """edge-popup / RST: 1 for the top-k |scores|, sorted in every forward; STE backward."""

    @staticmethod
    def forward(ctx, scores, keep_ratio):
      out = scores.clone()
      _, index = scores.flatten().sort()
      j = int((1 - keep_ratio) * scores.numel())
      flat_out = out.flatten()
      flat_out[index[:j]] = 0
      flat_out[index[j:]] = 1
      return out

    @staticmethod
    def backward(ctx, grad):
      return grad, None

  class SubnetConv(nn.Conv2d):
    """Conv with frozen signed-constant weights and trained scores (RST's SubnetConv)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0):
      super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                       bias=False)
      self.keep_ratio = settings.keep_ratio
      self.scores = nn.Parameter(torch.empty_like(self.weight))
      nn.init.kaiming_uniform_(self.scores, a=math.sqrt(5))
      fan_in = nn.init._calculate_correct_fan(self.weight, "fan_in")  # noqa: SLF001
      self.weight.data = self.weight.data.sign() * math.sqrt(2.0 / fan_in)
      self.weight.requires_grad = False

    def forward(self, x):
      subnet = GetSubnet.apply(self.scores.abs(), self.keep_ratio)
      return F.conv2d(x, self.weight * subnet, None, self.stride, self.padding)

  def norm(channels):
    return nn.BatchNorm2d(channels, affine=False)

  class BasicBlock(nn.Module):
    def __init__(self, in_planes, planes, stride):
      super().__init__()
      self.conv1 = SubnetConv(in_planes, planes, 3, stride=stride, padding=1)
      self.bn1 = norm(planes)
      self.conv2 = SubnetConv(planes, planes, 3, padding=1)
      self.bn2 = norm(planes)
      self.shortcut = nn.Sequential()
      if stride != 1 or in_planes != planes:
        self.shortcut = nn.Sequential(SubnetConv(in_planes, planes, 1, stride=stride),
                                      norm(planes))

    def forward(self, x):
      out = F.relu(self.bn1(self.conv1(x)))
      out = self.bn2(self.conv2(out))
      return F.relu(out + self.shortcut(x))

  class ResNet18(nn.Module):
    """RST's cResNet18: 3x3 stem, [2, 2, 2, 2] blocks, avg-pool 4, 1x1-conv classifier."""

    def __init__(self, width):
      super().__init__()
      self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1))
      self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1))
      self.conv1 = SubnetConv(3, width, 3, padding=1)
      self.bn1 = norm(width)
      blocks, in_planes = [], width
      for stage, stride in enumerate((1, 2, 2, 2)):
        planes = width * 2**stage
        for block_stride in (stride, 1):
          blocks.append(BasicBlock(in_planes, planes, block_stride))
          in_planes = planes
      self.layers = nn.Sequential(*blocks)
      self.fc = SubnetConv(in_planes, NUM_CLASSES, 1)

    def forward(self, x):
      out = F.relu(self.bn1(self.conv1((x - self.mean) / self.std)))
      out = F.avg_pool2d(self.layers(out), 4)
      return self.fc(out).flatten(1)

  torch.manual_seed(0)
  torch.backends.cudnn.benchmark = True  # As the other baselines: cuDNN picks its fastest kernels.
  model = ResNet18(settings.width).to(device).train()
  optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad],
                              lr=LEARNING_RATE, momentum=0.9, weight_decay=5e-4)
  all_images = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float().div(255)
  all_labels = torch.from_numpy(labels).long().to(device)
  generator = torch.Generator(device="cpu").manual_seed(0)

  def forward(x):
    with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=autocast_bf16):
      return model(x).float()

  def attack(x, y):
    """The reference PGD: train mode, random start, sign steps, projection to ball and box."""
    x_adv = (x + torch.empty_like(x).uniform_(-ATTACK.eps, ATTACK.eps)).clamp(0, 1)
    for _ in range(ATTACK.num_steps):
      x_adv.requires_grad_(True)
      loss = F.cross_entropy(forward(x_adv), y)
      (grad,) = torch.autograd.grad(loss, [x_adv])
      x_adv = x_adv.detach() + ATTACK.step_size * grad.sign()
      x_adv = torch.min(torch.max(x_adv, x - ATTACK.eps), x + ATTACK.eps).clamp(0, 1)
    return x_adv.detach()

  def step():
    index = torch.randint(0, all_images.shape[0], (settings.batch_size,), generator=generator)
    x, y = all_images[index.to(device)], all_labels[index.to(device)]
    x_adv = attack(x, y)
    optimizer.zero_grad()
    loss = F.cross_entropy(forward(x_adv), y)
    loss.backward()
    optimizer.step()
    return loss

  def synchronize():
    if device == "cuda":
      torch.cuda.synchronize()

  for _ in range(settings.torch_warmup):
    step()
  synchronize()
  start = time.perf_counter()
  for _ in range(settings.torch_steps):
    loss = step()
  float(loss)  # also synchronizes
  synchronize()
  seconds = (time.perf_counter() - start) / settings.torch_steps
  return {"images_per_s": settings.batch_size / seconds, "step_ms": 1e3 * seconds}


def torch_status(torch_device: str) -> tuple[bool, str]:
  """Whether the PyTorch step can run on ``torch_device``, and a description (or why not)."""
  try:
    import torch  # noqa: PLC0415
  except ImportError:
    return False, "torch is not importable"
  if torch_device == "cuda" and not torch.cuda.is_available():
    return False, f"torch {torch.__version__} has no CUDA device"
  name = torch.cuda.get_device_name() if torch_device == "cuda" else platform.processor() or "cpu"
  return True, f"torch {torch.__version__} on {name}"


def git_commit() -> str | None:
  try:
    return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True, cwd=pathlib.Path(__file__).parent).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None


def run(settings: Settings, torch_device: str, save: Callable[[dict[str, Any]], None],
        ) -> dict[str, Any]:
  """Every measurement of one run, as a JSON-ready dict, printed and saved as it goes.

  ``save(results)`` runs after every measurement, so a run cut short by a time limit keeps what
  it measured.
  """
  device = jax.devices()[0]
  print(f"jax {jax.__version__} on {device.platform}: {device.device_kind}; batch "
        f"{settings.batch_size}, ResNet-18 width {settings.width}, PGD-{ATTACK.num_steps}",
        flush=True)
  dense_macs, step_flops = flops_per_image(settings)
  print(f"model FLOPs per image and step: {step_flops / 1e9:.3f} G "
        f"(dense forward {dense_macs / 1e6:.1f} M MACs x 2 x 3 x {ATTACK.num_steps + 1})",
        flush=True)
  split = common.synthetic_split(settings.num_examples, IMAGE_SHAPE, NUM_CLASSES)
  images, labels = split.images, split.labels
  results: dict[str, Any] = {
      "device": device.device_kind, "platform": device.platform, "jax": jax.__version__,
      "commit": git_commit(), "settings": dataclasses.asdict(settings),
      "attack": dataclasses.asdict(ATTACK), "dense_macs_per_image": dense_macs,
      "model_flops_per_image_step": step_flops, "jax_step": {}, "torch_step": {}}
  matmul = matmul_rate(settings.matmul_size)
  results["bf16_matmul_tflops"] = matmul / 1e12
  print(f"bf16 matmul ({settings.matmul_size}^3): {matmul / 1e12:.2f} TFLOP/s", flush=True)
  save(results)

  for dtype in ("float32", "bfloat16"):
    measured = time_jax(dtype, settings, images, labels)
    measured["model_tflops"] = measured["images_per_s"] * step_flops / 1e12
    results["jax_step"][dtype] = measured
    print(f"jax {dtype:8s}: {measured['images_per_s']:10.1f} img/s, "
          f"{measured['step_ms']:9.2f} ms/step, {measured['model_tflops']:.3f} model TFLOP/s "
          f"(first call {measured['first_call_s']:.1f} s)", flush=True)
    save(results)
  bf16_rate = results["jax_step"]["bfloat16"]["model_tflops"] * 1e12
  results["bf16_model_flop_utilization"] = bf16_rate / matmul
  print(f"jax bfloat16 model FLOP rate = {bf16_rate / matmul:.1%} of the measured bf16 matmul "
        f"rate (target >= 40% on an H100/H200)", flush=True)

  available, description = torch_status(torch_device)
  results["torch"] = description
  save(results)
  if not available:
    print(f"PyTorch reference skipped: {description}", flush=True)
    return results
  for name, autocast in (("float32", False), ("bfloat16_autocast", True)):
    try:
      measured = time_torch(settings, images, labels, device=torch_device,
                            autocast_bf16=autocast)
    except Exception as error:  # The JAX numbers above must survive a failing baseline.
      traceback.print_exc()
      results["torch_step"][name] = {"error": f"{type(error).__name__}: {error}"}
      continue
    results["torch_step"][name] = measured
    print(f"torch {name:17s}: {measured['images_per_s']:10.1f} img/s, "
          f"{measured['step_ms']:9.2f} ms/step ({description})", flush=True)
    save(results)
  ratios = {}
  for jax_dtype, torch_name in (("bfloat16", "float32"), ("float32", "float32"),
                                ("bfloat16", "bfloat16_autocast")):
    torch_result = results["torch_step"].get(torch_name, {})
    if "images_per_s" in torch_result:
      ratio = results["jax_step"][jax_dtype]["images_per_s"] / torch_result["images_per_s"]
      ratios[f"jax_{jax_dtype}/torch_{torch_name}"] = ratio
      print(f"speed-up jax {jax_dtype} over torch {torch_name}: {ratio:.2f}x"
            + (" (target >= 8x)" if (jax_dtype, torch_name) == ("bfloat16", "float32") else ""),
            flush=True)
  results["speedups"] = ratios
  save(results)
  return results


def main(argv=None) -> None:
  args = common.parse_args(__doc__, "benchmarks/out/rst_step.json", argv, lambda parser: (
      parser.add_argument("--torch-device", default="cuda", choices=("cuda", "cpu"),
                          help="where the PyTorch reference step runs (cpu: to check the code)")))
  with exit_on_user_error():
    write = common.json_writer(args.out)
    run(QUICK if args.quick else FULL, args.torch_device,
        lambda results: write({**results, "quick": args.quick}))
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
