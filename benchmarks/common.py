"""Pieces every benchmark shares: timing, synthetic data, the PyTorch ConvNet-3, JSON output."""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from jaxtickets import data as data_lib
from jaxtickets import errors
from jaxtickets.errors import UserError


def first_and_median_seconds(call: Callable[[], Any], timings: int) -> tuple[float, float]:
  """(seconds of the first call, compilation included unless compiled ahead; median seconds of
  ``timings`` more).

  ``call``'s result is waited for with ``jax.block_until_ready`` (JAX dispatches
  asynchronously), so ``call`` may return arrays still being computed.
  """
  seconds = []
  for _ in range(timings + 1):
    start = time.perf_counter()
    jax.block_until_ready(call())
    seconds.append(time.perf_counter() - start)
  return seconds[0], statistics.median(seconds[1:])


def compile_ahead(fn: Callable[..., Any], *args: Any) -> tuple[jax.stages.Compiled, float]:
  """``jax.jit(fn)`` compiled for ``args``, and the seconds compiling took (so that first-call
  times are the program's own and ``compiled.host_waits`` can read it)."""
  start = time.perf_counter()
  program = jax.jit(fn).lower(*args).compile()
  return program, time.perf_counter() - start


def median_seconds(call: Callable[[], Any], timings: int) -> float:
  """Median wall time of ``call()`` after one untimed call (compilation and warm-up)."""
  return first_and_median_seconds(call, timings)[1]


def synthetic_split(num_examples: int, image_shape: Sequence[int], num_classes: int,
                    seed: int = 0) -> data_lib.Split:
  """Uniform random ``u8[num_examples, *image_shape]`` images with balanced i32 labels."""
  rng = np.random.default_rng(seed)
  return data_lib.Split(rng.integers(0, 256, (num_examples, *image_shape), dtype=np.uint8),
                        np.arange(num_examples, dtype=np.int32) % num_classes)


def torch_cuda_available() -> bool:
  try:
    import torch  # noqa: PLC0415  (optional: only the PyTorch baselines need it)
  except ImportError:
    return False
  return torch.cuda.is_available()


def torch_convnet3(width: int, image_size: int, num_classes: int, device: Any) -> Any:
  """The PyTorch twin of ``get_model("convnet3", width=width)`` on 3-channel images.

  3 x [conv3x3 (bias), GroupNorm(width, width) (= instance norm with affine), ReLU, AvgPool 2],
  then Linear(width * (image_size // 8)**2, num_classes), on ``device``.
  """
  from torch import nn  # noqa: PLC0415

  layers, channels = [], 3
  for _ in range(3):
    layers += [nn.Conv2d(channels, width, 3, padding=1), nn.GroupNorm(width, width), nn.ReLU(),
               nn.AvgPool2d(2)]
    channels = width
  features = width * (image_size // 8) ** 2
  return nn.Sequential(*layers, nn.Flatten(), nn.Linear(features, num_classes)).to(device)


def parse_args(description: str, default_out: str, argv: Sequence[str] | None = None,
               extra: Callable[[argparse.ArgumentParser], None] | None = None,
               ) -> argparse.Namespace:
  """``--quick`` and ``--out`` (plus what ``extra`` adds), parsed from ``argv``."""
  parser = errors.ArgumentParser(description=description.strip().splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="tiny sizes, to check on a CPU that it runs")
  parser.add_argument("--out", default=default_out, help="where the JSON report goes")
  if extra is not None:
    extra(parser)
  return parser.parse_args(argv)


def json_writer(out: str | pathlib.Path) -> Callable[[dict[str, Any]], None]:
  """``save(report)``: (re)writes ``out`` as indented JSON, so a killed run keeps what it had.

  Raises:
    UserError (now, before anything is measured): ``out`` is a directory, or a file stands where
    one of its folders would be. The folders are made at the first save.
  """
  out = pathlib.Path(out)
  if out.is_dir():
    raise UserError(f"--out {out} is a directory; expected a .json file path")
  folder = out.parent
  while not folder.exists():
    folder = folder.parent
  if not folder.is_dir():
    raise UserError(f"--out {out}: {folder} is a file, not a folder")

  def save(report: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")

  return save


def impl_suffix(conv_impl: str) -> str:
  """A printed label's suffix for a model's ``conv_impl``: "" for XLA's, else "+im2col"."""
  return "" if conv_impl == "xla" else f"+{conv_impl}"
