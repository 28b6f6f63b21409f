"""Configs for dense training (the baseline every study compares against):

    python -m experiments.dense --config experiments/configs/dense.py:cifar10_resnet18 \\
        --workdir runs/r18 --config.data_dir=$HOME/tensorflow_datasets

Presets: ``digits_convnet3`` (the demo's run; the default), ``small`` (the tests' run),
``cifar10_resnet18`` (the RST paper's dense recipe without adversarial training).
"""

import ml_collections

from experiments import checks
from experiments.configs import common


def _base() -> ml_collections.ConfigDict:
  # Flipping digits changes their meaning, so no augmentation.
  return common.training(image_size=16, batch_size=64, epochs=15, learning_rate=0.01,
                         schedule="cosine")


def _small() -> ml_collections.ConfigDict:
  c = _base()
  c.model_options.width = 16
  c.epochs = 3
  c.learning_rate = 0.05
  return c


def _cifar10_resnet18() -> ml_collections.ConfigDict:
  c = _base()
  c.dataset = "cifar10"
  c.image_size = None
  c.model = "resnet18"
  c.batch_size = 256
  c.epochs = 160
  c.learning_rate = 0.1
  c.schedule = "multistep"
  c.milestones = (80, 120)
  c.augment = "crop_flip"
  return c


PRESETS = {"digits_convnet3": _base, "small": _small, "cifar10_resnet18": _cifar10_resnet18}


def get_config(preset: str = "digits_convnet3") -> ml_collections.ConfigDict:
  return common.select(PRESETS, preset)


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises UserError for bad settings before anything is loaded."""
  checks.check_training(config)
