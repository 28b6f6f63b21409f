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
