"""Configs for A Winning Sign (``experiments/aws.py``).

    python -m experiments.aws --config experiments/configs/aws.py:cifar100_resnet50 \\
        --workdir runs/aws

Presets are the keys of ``PRESETS``; override a field with ``--config.FIELD=VALUE``, e.g.
``--config.dataset=npz:PATH`` to read a JPEG-packed CIFAR copy.

Deviations from the reference code:

- Pruned weights are re-zeroed after every optimizer step (the reference masks them in the
  forward pass and lets weight decay move the unused values); both train the same network.
- Ties at the pruning threshold: the reference keeps every weight equal to it, here exactly
  ``int(0.8 * S)`` of S survivors stay (ties by position).
- Training epochs and the BatchNorm recalibration of linear mode connectivity use full batches
  only (390 steps per CIFAR epoch; the reference's loader keeps the last partial batch: 391);
  the dataset has no validation split (the reference reports test accuracy at the last epoch,
  as here).
- ``transfer.population_size`` splits the transfer sweep into populations trained one after
  another (the reference trains every member in its own process).
- The digits presets use no augmentation (flips change digits' meaning), lr 0.05, shorter
  schedules and prune half of the survivors per round instead of 20% (see the preset functions).
"""

import math
import numbers
from typing import Any

import ml_collections
import numpy as np

from experiments import checks
from experiments.configs import common
from jaxtickets import aws
from jaxtickets.errors import UserError

_PAPER_ROUNDS = 15


def _base() -> ml_collections.ConfigDict:
  """The paper protocol: CIFAR-100 with ResNet-50."""
  # epochs, learning_rate, schedule, milestones: the transfer (and retraining) runs.
  c = common.training(dataset="cifar100", model="resnet50", batch_size=128, epochs=100,
                      learning_rate=0.1, milestones=(50, 75), augment="crop_flip", seed=1)
  c.normalization = "cifar10_common"  # The reference's, for CIFAR-10 and CIFAR-100 alike.
  # torchvision's resnet50 init (convs kaiming-normal by fan-out) with the 3x3 stem swapped in
  # afterwards (PyTorch's default init), as the reference builds it.
  c.model_options = ml_collections.ConfigDict(
      {"kernel_init": "kaiming_normal_fan_out", "stem_init": "pytorch"})
  # Stratified shares of the splits kept (None: all), for CPU-sized runs on real data.
  c.train_subset = None
  c.test_subset = None
  c.methods = ("lrr", "aws")  # Pruned side by side as one population (AWS alpha 0 for LRR).
  c.eval_every_epochs = 1  # Test accuracy in the logs (and checkpoints) every this many epochs.
  # The population strategy (jaxtickets.population.run); None: the measured default.
  c.strategy = None
  c.chunk_size = None

  c.pruning = ml_collections.ConfigDict()
  c.pruning.warmup_epochs = 10
  c.pruning.rounds = _PAPER_ROUNDS
  c.pruning.epochs_per_round = 10  # Each round removes `fraction` of survivors, then trains.
  c.pruning.fraction = 0.2
  # "none": LRR (continue from the weights), the reference's. "init": IMP, an extension: every
  # round restarts from the initialization at its new mask, so the warm-up only decides the
  # first mask.
  c.pruning.rewind = "none"
  # Learning rate of the pruning runs (constant; the reference does not step its scheduler).
  c.pruning.learning_rate = 0.1

  c.transfer = ml_collections.ConfigDict()
  # Tickets transferred, by density (the nearest round of the schedule); all rounds here.
  c.transfer.densities = tuple(0.8**k for k in range(1, _PAPER_ROUNDS + 1))
  c.transfer.variants = ("sign", "mask", "retrain")
  c.transfer.dense = True  # Also train the fresh dense network (one per seed).
  # Fresh initializations (and data orders), one member each: the reference's ft_seeds.
  c.transfer.seeds = (2, 3)
  c.transfer.population_size = 16  # Members per population; None: the whole sweep at once.

  c.lmc = ml_collections.ConfigDict()
  c.lmc.num_points = 11
  c.lmc.batch_size = 128  # Batches of the BatchNorm recalibration pass (augmented train data).
  # The paper's diagnostic after every round: trained sparse net vs its initialized norms.
  c.lmc.init_norm = True
  # At every transferred density: sign-transferred vs retrained network of the first seed, and
  # the sign transfers of the first two seeds (SGD noise stability).
  c.lmc.transfer_pairs = True
  return c


def _cifar100_mobilenetv2() -> ml_collections.ConfigDict:
  c = _base()
  c.model = "mobilenetv2"
  c.model_options = ml_collections.ConfigDict()  # PyTorch's default init, as the reference's.
  c.learning_rate = 0.05
  c.pruning.learning_rate = 0.05
  return c


def _cifar10_resnet20() -> ml_collections.ConfigDict:
  c = _base()
  c.dataset = "cifar10"
  c.model = "resnet20"
  c.model_options = ml_collections.ConfigDict()
  c.transfer.population_size = None
  return c


def _digits() -> ml_collections.ConfigDict:
  c = _base()
  c.dataset = "digits"
  c.normalization = "dataset"
  c.image_size = 8
  c.model = "convnet3"
  # AWS interpolates norm params; ConvNet-3's default is GroupNorm.
  c.model_options = ml_collections.ConfigDict({"norm": "batch", "width": 16})
  c.batch_size = 64
  c.augment = "none"  # Flipping digits changes their meaning.
  c.learning_rate = 0.05
  c.epochs = 8
  c.milestones = (4, 6)
  c.eval_every_epochs = 2
  c.pruning.warmup_epochs = 4
  # Half of the survivors per round reaches the sparse regime, where the digits separate the
  # transfers, in 4 rounds (each round costs a compilation on CPU).
  c.pruning.fraction = 0.5
  c.pruning.rounds = 4
  c.pruning.epochs_per_round = 2
  c.pruning.learning_rate = 0.05
  c.transfer.densities = (0.25, 0.0625)
  c.transfer.seeds = (2,)
  c.transfer.population_size = None
  c.lmc.batch_size = 32  # 44 batches: momentum 0.1 then forgets the reset statistics.
  return c


def _cifar10_subset() -> ml_collections.ConfigDict:
  """The digits protocol on stratified shares of CIFAR-10 (CPU-sized runs on real data)."""
  c = _digits()
  c.dataset = "cifar10"
  c.normalization = "cifar10_common"
  c.image_size = None
  c.augment = "crop_flip"
  c.train_subset = 0.1
  c.test_subset = 0.2
  c.epochs = 6
  c.milestones = (3, 5)
  return c


def _small() -> ml_collections.ConfigDict:
  """The tests' run."""
  c = _digits()
  c.model_options.width = 8
  c.epochs = 3
  c.milestones = (2,)
  c.eval_every_epochs = 3
  c.pruning.warmup_epochs = 2
  c.pruning.rounds = 2
  c.pruning.epochs_per_round = 1
  c.transfer.densities = (0.25,)
  c.transfer.seeds = (2, 3)  # Two seeds: the seed pair's barrier is measured too.
  return c


PRESETS = {"cifar100_resnet50": _base, "cifar100_mobilenetv2": _cifar100_mobilenetv2,
           "cifar10_resnet20": _cifar10_resnet20, "cifar10_subset": _cifar10_subset,
           "digits": _digits, "small": _small}


def get_config(preset: str = "digits") -> ml_collections.ConfigDict:
  return common.select(PRESETS, preset)


def check_config(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """Raises UserError for bad settings before anything is loaded; returns the pruning rounds
  whose tickets are transferred (one per ``transfer.densities`` entry)."""
  checks.check_training(config)
  checks.check_names("methods", config.methods, aws.METHODS, repeat="each runs once")
  checks.check_population_options(config)
  pruning = config.pruning
  rounds, fraction = pruning.rounds, pruning.fraction
  if isinstance(rounds, bool) or not isinstance(rounds, numbers.Integral) or rounds < 1:
    raise UserError(f"pruning rounds must be an int >= 1, got {rounds!r}")
  if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0 < fraction < 1:
    raise UserError(f"pruning fraction must be a number in (0, 1), got {fraction!r}")
  if pruning.rewind not in aws.REWINDS:
    raise UserError(f"unknown pruning.rewind {pruning.rewind!r}; known: {', '.join(aws.REWINDS)}")
  checks.check_int("pruning.warmup_epochs", pruning.warmup_epochs, minimum=0)
  checks.check_int("pruning.epochs_per_round", pruning.epochs_per_round)
  checks.check_number("pruning.learning_rate", pruning.learning_rate, 0, strict=True)
  checks.check_int("eval_every_epochs", config.eval_every_epochs)
  for name in ("train_subset", "test_subset"):
    if config[name] is not None:
      checks.check_number(name, config[name], 0, 1, strict=True)
  transfer = config.transfer
  checks.check_names("transfer.variants", transfer.variants, aws.TRAINED_TRANSFERS,
                     repeat="each runs once")
  checks.check_sequence("transfer.seeds", transfer.seeds)
  for seed in transfer.seeds:
    checks.check_seed("transfer.seeds entry", seed)
  checks.check_distinct("transfer.seeds", transfer.seeds, "each seed is one member")
  if transfer.population_size is not None:
    checks.check_int("transfer.population_size", transfer.population_size)
  checks.check_int("lmc.num_points", config.lmc.num_points, minimum=2)
  checks.check_int("lmc.batch_size", config.lmc.batch_size)
  transfer_rounds = rounds_for_densities(transfer.densities, rounds, fraction)
  # As the runner's transfer_members lists them.
  num_members = len(transfer.seeds) * (bool(transfer.dense) + len(config.methods)
                                       * len(transfer_rounds) * len(transfer.variants))
  group = min(transfer.population_size or num_members, num_members)
  checks.check_population_sizes(config, {
      "the pruning population (methods)": len(config.methods), "a transfer group": group,
      "the last transfer group": num_members % group or group,
      "the error curve (lmc.num_points)": config.lmc.num_points})
  return transfer_rounds


def rounds_for_densities(densities: Any, rounds: int, fraction: float) -> tuple[int, ...]:
  """Per wanted density, the round k in [1, rounds] whose ``(1 - fraction) ** k`` is nearest."""
  if np.ndim(densities) != 1 or not len(densities):
    raise UserError(f"densities={densities!r}; expected a non-empty sequence in (0, 1]")
  chosen = []
  for density in densities:
    if isinstance(density, bool) or not isinstance(density, numbers.Real) or not (
        0 < density <= 1):
      raise UserError(f"density must be in (0, 1], got {density!r}")
    k = round(math.log(density) / math.log(1 - fraction))
    if not 1 <= k <= rounds:
      raise UserError(f"density {density!r} is nearest round {k} of a schedule of rounds "
                      f"1..{rounds} (densities {(1 - fraction):.3g}..{(1 - fraction)**rounds:.3g})")
    if k in chosen:
      raise UserError(f"densities {densities[chosen.index(k)]!r} and {density!r} are both "
                      f"nearest round {k}; each would train the same ticket twice")
    chosen.append(k)
  return tuple(chosen)
