"""Every preset of every study passes the checks its runner makes before loading anything."""

import importlib

import pytest

STUDIES = ("dense", "rst", "aws", "distill", "transfusion")


@pytest.mark.parametrize("name", STUDIES)
def test_every_preset_passes_its_studys_checks(name):
  study = importlib.import_module(f"experiments.{name}")
  configs = importlib.import_module(f"experiments.configs.{name}")
  assert configs.PRESETS
  for preset in configs.PRESETS:
    study.check_config(configs.get_config(preset))
