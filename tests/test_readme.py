"""The README's API tour runs as written and does what its comments say; its study commands
parse."""

import pathlib
import re
import shlex

import jax
import numpy as np

from experiments import cli

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _tour_code() -> str:
  section = README.read_text().split("## API tour", 1)[1]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_api_tour_runs_and_its_claims_hold(capsys):
  namespace: dict = {}
  exec(compile(_tour_code(), "README.md", "exec"), namespace)  # noqa: S102
  ns = type("Tour", (), namespace)
  assert abs(float(capsys.readouterr().out.split()[0]) - 0.3) < 1e-3
  # The ticket's mask and signs survive the transfer; magnitudes come from the fresh init.
  for new, old, fresh, keep, prunable in zip(
      jax.tree.leaves(ns.transferred), jax.tree.leaves(ns.params), jax.tree.leaves(ns.fresh),
      jax.tree.leaves(ns.mask), jax.tree.leaves(ns.prunable)):
    if prunable:
      np.testing.assert_array_equal(np.asarray(new) != 0, np.asarray(keep))
      np.testing.assert_array_equal(np.sign(new), np.sign(old) * keep)
      np.testing.assert_allclose(np.abs(new), np.abs(fresh) * keep)
  assert ns.accuracies.shape == (8,)
  assert np.all((np.asarray(ns.accuracies) >= 0) & (np.asarray(ns.accuracies) <= 1))


def _study_commands() -> list[tuple[str, list[str]]]:
  """``(study, arguments)`` of each ``python -m experiments.<study>`` in "Running a study"."""
  section = README.read_text().split("## Running a study", 1)[1]
  block = re.search(r"```bash\n(.*?)```", section, re.S).group(1).replace("\\\n", " ")
  folder = re.search(r"^C=(\S+)$", block, re.M).group(1)
  commands = []
  for line in block.splitlines():
    words = shlex.split(line.replace("$C", folder).replace("$HOME", "/home/user"), comments=True)
    if words[1:2] == ["-m"] and words[2] != "experiments.report":
      commands.append((words[2].removeprefix("experiments."), words[3:]))
  return commands


def test_study_commands_parse():
  commands = _study_commands()
  assert {study for study, _ in commands} == {"dense", "rst", "aws", "distill", "transfusion"}
  for study, arguments in commands:
    config, workdir = cli.parse(study, arguments)
    assert workdir.startswith("runs/") and config.preset in arguments[1]
