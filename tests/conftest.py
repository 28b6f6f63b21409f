"""Test-wide settings.

Four host "devices" let the sharded population strategy run on a CPU-only machine; the flag has
to be set before JAX is first imported.
"""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402

_DEFAULT_SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_data_dir() -> pathlib.Path | None:
  """The shared test data folder ($JAXTICKETS_SHARED_DATA or ../shared/data), or None."""
  path = pathlib.Path(os.environ.get("JAXTICKETS_SHARED_DATA", _DEFAULT_SHARED))
  return path if path.is_dir() else None


@pytest.fixture
def shared_data() -> pathlib.Path:
  """Path of the shared data folder; skips the test when it is absent."""
  path = shared_data_dir()
  if path is None:
    pytest.skip("shared data folder not found (set JAXTICKETS_SHARED_DATA)")
  return path
