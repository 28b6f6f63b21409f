"""Test-wide settings.

Four host "devices" let the sharded population strategy run on a CPU-only machine; the flag has
to be set before JAX is first imported. Compiled programs go to JAX's persistent compilation
cache (in pytest's cache folder, or ``$JAX_COMPILATION_CACHE_DIR``; none under ``-p
no:cacheprovider`` without it): many tests compile the same programs again (a study's resumed
run, its command-line subprocesses, each xdist worker), and XLA:CPU takes seconds for each.
Entries are keyed by the program, the backend and JAX's version; the folder grows by ~25 MB per
suite of changed programs (delete ``.pytest_cache`` to empty it).
"""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import pytest  # noqa: E402

from jaxtickets import data  # noqa: E402


def pytest_configure(config):
  cache = getattr(config, "cache", None)  # None under ``-p no:cacheprovider``.
  directory = os.environ.get("JAX_COMPILATION_CACHE_DIR") or (cache and str(cache.mkdir("xla")))
  if directory:
    # Set in the environment too, so that the command-line runs in subprocesses share it.
    os.environ["JAX_COMPILATION_CACHE_DIR"] = directory
    jax.config.update("jax_compilation_cache_dir", directory)


@pytest.fixture(scope="session")
def digits() -> data.Dataset:
  """scikit-learn's digits as every loader returns them (read once per test process)."""
  return data.load_dataset("digits")


@pytest.fixture
def shared_data() -> pathlib.Path:
  """Path of the shared data folder; skips the test when it is absent."""
  path = data.shared_data_dir()
  if not path.is_dir():
    pytest.skip(f"shared data folder {path} not found (set {data.SHARED_DATA_ENV})")
  return path


@pytest.fixture
def assert_cli_user_error(tmp_path, capsys):
  """``check(main, arguments, fragment="")``: ``main([*arguments, "--workdir", <tmp>/run])``
  exits with status 2 after printing one line ``error: ...`` that holds ``fragment``, and leaves
  no workdir behind."""

  def check(main, arguments, fragment=""):
    workdir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
      main([*arguments, "--workdir", str(workdir)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1 and fragment in error
    assert not workdir.exists()

  return check
