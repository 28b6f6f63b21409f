"""Training steps in loop bodies on XLA:CPU: lax's convolution gradients vs ``models.conv``.

    python -m benchmarks.cpu_loops [--quick] [--out FILE.json]

XLA:CPU runs JAX's convolution gradients on its naive emitter when they sit in a loop body
(``jaxtickets.models.conv`` says why). On a ConvNet-3 and a ResNet-20 (synthetic 32x32x3 data,
batch 64, SGD), with the models' convolution swapped for ``lax.conv_general_dilated`` ("lax") or
kept ("models.conv"), it times:

1. one training step jitted alone, and 4 steps in one ``lax.scan`` (per step);
2. one step of a population of 4 members, ``population.run``'s "vmap" (grouped convolutions)
   and "map" (one member after another, a loop body);

and counts the program's non-canonical convolutions (``compiled.noncanonical_convolutions``).
Times are medians of ``timings`` calls after compilation and one untimed call. ``--quick``
shrinks the nets and images to check that the script runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Callable, Sequence
from typing import Any
from unittest import mock

import jax

from benchmarks import common
from jaxtickets import compiled, population
from jaxtickets import train as train_lib
from jaxtickets.errors import exit_on_user_error
from jaxtickets.models import conv, get_model

NUM_CLASSES = 10
MEAN, STD = (0.5,) * 3, (0.2887,) * 3  # uniform pixels on [0, 1]
CONVOLUTIONS = {"lax": jax.lax.conv_general_dilated, "models.conv": None}


@dataclasses.dataclass(frozen=True)
class Settings:
  """One run: ``models`` as ``name:width`` (width 0: the model's default), image size H = W,
  batch size, population size, scan length, timed calls."""
  models: tuple[str, ...] = ("convnet3:64", "resnet20:0")
  image_size: int = 32
  batch_size: int = 64
  members: int = 4
  scan_steps: int = 4
  timings: int = 2


QUICK = Settings(models=("convnet3:8", "resnet20:0"), image_size=8, batch_size=8, timings=1)


def _programs(settings: Settings, name: str, width: int) -> dict[str, tuple[Callable, tuple]]:
  """{label: (fn, args)} of the timed programs for one model, per step."""
  image_shape = (settings.image_size, settings.image_size, 3)
  model = get_model(name, num_classes=NUM_CLASSES, **({"width": width} if width else {}))
  apply_fn = train_lib.model_apply_fn(model, MEAN, STD)
  optimizer = train_lib.sgd(0.01)
  data = train_lib.device_data(common.synthetic_split(16 * settings.batch_size, image_shape,
                                                      NUM_CLASSES))

  def member(key):
    params, batch_stats = train_lib.init_variables(key, model, image_shape)
    return train_lib.create_train_state(key, params, batch_stats, optimizer)

  state = member(jax.random.key(0))
  members = jax.vmap(member)(jax.random.split(jax.random.key(1), settings.members))
  step = train_lib.make_train_step(apply_fn, optimizer, batch_size=settings.batch_size)
  return {
      "step alone": (step, (state, data)),
      f"step in a scan of {settings.scan_steps}": (
          train_lib.repeat(step, settings.scan_steps), (state, data)),
      f"population of {settings.members}, vmap": (
          population.run(step, strategy="vmap"), (members, data)),
      f"population of {settings.members}, map": (
          population.run(step, strategy="map"), (members, data)),
  }


def _time(settings: Settings, fn: Callable, args: Sequence[Any], steps: int) -> dict[str, Any]:
  program, compile_s = common.compile_ahead(fn, *args)
  seconds = common.median_seconds(lambda: program(*args), settings.timings)
  return {"ms_per_step": 1e3 * seconds / steps, "compile_s": compile_s,
          "noncanonical_convolutions": len(compiled.noncanonical_convolutions(program))}


def swapped_convolution(replacement: Callable | None) -> contextlib.AbstractContextManager:
  """Inside it, models built with the default ``conv_impl`` ("xla") convolve with
  ``replacement`` (None: unchanged)."""
  if replacement is None:
    return contextlib.nullcontext()
  return mock.patch.dict(conv.CONV_IMPLS, {"xla": replacement})


def run_benchmark(settings: Settings, save: Callable[[dict[str, Any]], None]) -> None:
  report = {"settings": dataclasses.asdict(settings), "device": str(jax.devices()[0]),
            "jax": jax.__version__, "results": []}
  print(f"{'model':<12} {'program':<28} {'convolution':<12} {'ms/step':>9} {'compile s':>9} "
        f"{'non-canonical':>13}")
  for spec in settings.models:
    name, width = spec.split(":")
    for convolution, replacement in CONVOLUTIONS.items():
      with swapped_convolution(replacement):
        for label, (fn, args) in _programs(settings, name, int(width)).items():
          steps = settings.scan_steps if "scan" in label else 1
          row = {"model": spec, "program": label, "convolution": convolution,
                 **_time(settings, fn, args, steps)}
          report["results"].append(row)
          save(report)
          print(f"{spec:<12} {label:<28} {convolution:<12} {row['ms_per_step']:>9.1f} "
                f"{row['compile_s']:>9.1f} {row['noncanonical_convolutions']:>13}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
  args = common.parse_args(__doc__, "benchmarks/out/cpu_loops.json", argv)
  with exit_on_user_error():
    run_benchmark(QUICK if args.quick else Settings(), common.json_writer(args.out))
  print(f"\nwrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
