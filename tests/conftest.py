"""Test-wide settings.

Four host "devices" let the sharded population strategy run on a CPU-only machine; the flag has
to be set before JAX is first imported.
"""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402

from jaxtickets import data  # noqa: E402


@pytest.fixture
def shared_data() -> pathlib.Path:
  """Path of the shared data folder; skips the test when it is absent."""
  path = data.shared_data_dir()
  if not path.is_dir():
    pytest.skip(f"shared data folder {path} not found (set {data.SHARED_DATA_ENV})")
  return path
