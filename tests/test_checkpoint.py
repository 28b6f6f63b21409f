"""Checkpoint round trips and the refusal to mix runs of different configs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtickets import checkpoint
from jaxtickets.errors import UserError


def _tree(scale=1.0):
  return {"params": {"w": scale * jnp.arange(6.0).reshape(2, 3)}, "step": jnp.int32(7),
          "key": jax.random.PRNGKey(3)}


def test_save_restore_round_trip(tmp_path):
  with checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:
    assert ckpt.latest_step() is None
    ckpt.save(5, _tree(2.0))
    ckpt.save(9, _tree(3.0))
    assert ckpt.latest_step() == 9
    restored = ckpt.restore(_tree(0.0))
    np.testing.assert_array_equal(restored["params"]["w"], _tree(3.0)["params"]["w"])
    np.testing.assert_array_equal(restored["key"], jax.random.PRNGKey(3))
    older = ckpt.restore(_tree(0.0), step=5)
    np.testing.assert_array_equal(older["params"]["w"], _tree(2.0)["params"]["w"])


def test_restore_into_other_shapes_is_a_user_error(tmp_path):
  with checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:
    ckpt.save(1, _tree())
    other = {"params": {"w": jnp.zeros((3, 3))}, "step": jnp.int32(0),
             "key": jax.random.PRNGKey(0)}
    with pytest.raises(UserError) as err:
      ckpt.restore(other)
  assert "\n" not in str(err.value)


def test_restore_without_checkpoint_is_a_user_error(tmp_path):
  with checkpoint.Checkpointer(tmp_path / "empty") as ckpt, pytest.raises(UserError):
    ckpt.restore(_tree())


def test_claim_workdir_refuses_other_config_and_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  checkpoint.claim_workdir(workdir, {"lr": 0.1, "model": "convnet3"})
  before = (workdir / "config.json").read_text()
  # The same config (any key order) is a resume.
  checkpoint.claim_workdir(workdir, {"model": "convnet3", "lr": 0.1})
  with pytest.raises(UserError, match="different config"):
    checkpoint.claim_workdir(workdir, {"lr": 0.2, "model": "convnet3"})
  assert (workdir / "config.json").read_text() == before


def test_claim_workdir_refuses_foreign_non_empty_directory(tmp_path):
  (tmp_path / "notes.txt").write_text("mine")
  with pytest.raises(UserError, match="not empty"):
    checkpoint.claim_workdir(tmp_path, {"lr": 0.1})
  assert not (tmp_path / "config.json").exists()
