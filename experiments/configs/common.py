"""Helpers shared by the study configs."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import ml_collections

from jaxtickets.errors import UserError


def select(presets: Mapping[str, Callable[[], ml_collections.ConfigDict]],
           preset: str) -> ml_collections.ConfigDict:
  """Builds the named preset; unknown names are a UserError listing the known ones."""
  if preset not in presets:
    raise UserError(f"unknown config preset {preset!r}; known: {', '.join(presets)}")
  config = presets[preset]()
  config.preset = preset
  return config


def training(**values) -> ml_collections.ConfigDict:
  """The fields every trainer reads through ``experiments/build.py``, with ``values`` applied.

  Data (``dataset``, ``data_dir``, ``image_size``, ``normalization``), model (``model``,
  ``model_options``, ``dtype``), SGD and its schedule, augmentation and seed.
  """
  c = ml_collections.ConfigDict()
  c.dataset = "digits"
  # For tfds datasets; None: $TFDS_DATA_DIR. Typed str, so --config.data_dir=2024 stays text.
  c.data_dir = ml_collections.config_dict.placeholder(str)
  c.image_size = None  # Resize every split to this (digits: 8, 16 or 32); None: as stored.
  # "dataset" (its own statistics), "cifar10" or "cifar10_common" (jaxtickets.data.NORMALIZATIONS).
  c.normalization = "dataset"
  c.model = "convnet3"
  c.model_options = ml_collections.ConfigDict()
  c.dtype = "float32"
  c.batch_size = 128
  c.epochs = 1
  c.learning_rate = 0.1
  c.momentum = 0.9
  c.weight_decay = 5e-4
  c.schedule = "multistep"  # or "cosine" / "constant"; multistep uses milestones (epochs), gamma.
  c.milestones = ()
  c.gamma = 0.1
  c.augment = "none"  # or "crop_flip".
  c.seed = 0
  c.update(values)
  return c
