"""Every preset of every study passes its config module's checks (what the runner checks before
loading anything), and loads through the command line's
``--config experiments/configs/<study>.py:<preset>``."""

import importlib

import pytest

from experiments import cli

STUDIES = ("dense", "rst", "aws", "distill", "transfusion")


@pytest.mark.parametrize("name", STUDIES)
def test_every_preset_passes_its_studys_checks(name):
  configs = importlib.import_module(f"experiments.configs.{name}")
  assert configs.PRESETS
  for preset in configs.PRESETS:
    configs.check_config(configs.get_config(preset))
    config, _ = cli.parse(name, ["--config", f"experiments/configs/{name}.py:{preset}",
                                 "--workdir", "w"])
    assert config.to_dict() == configs.get_config(preset).to_dict()
