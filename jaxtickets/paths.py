"""Names of pytree leaves: how messages, name-based rules and checkpoints refer to a leaf.

A path from ``jax.tree_util`` holds ``DictKey`` (``.key``), ``GetAttrKey`` (``.name``) and
``SequenceKey`` (``.idx``) entries; a flax param path reads e.g. ``("block1", "conv", "kernel")``.
"""

from collections.abc import Sequence
from typing import Any


def key_name(key: Any) -> str:
  """One path entry as a string."""
  for attribute in ("key", "name", "idx"):
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def names(path: Sequence[Any]) -> tuple[str, ...]:
  """Every entry of ``path`` as a string."""
  return tuple(key_name(key) for key in path)


def joined(path: Sequence[Any], separator: str = "/") -> str:
  """``path`` as one string, e.g. ``"block1/conv/kernel"``."""
  return separator.join(names(path))


def is_norm_param(path_names: Sequence[str]) -> bool:
  """Whether a leaf is a norm layer's affine ``scale`` or ``bias`` (the models name every norm
  module ``*norm*``)."""
  return (len(path_names) > 1 and path_names[-1] in ("scale", "bias")
          and any("norm" in module.lower() for module in path_names[:-1]))
