"""Checkpoint round trips and the refusal to mix runs of different configs."""

import json
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from assertions import assert_one_line_user_error
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


def test_typed_prng_keys_are_refused_before_anything_is_written(tmp_path):
  # orbax stores a typed key's raw data, which would not restore into the same template.
  with checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:
    with pytest.raises(UserError, match="'state.key' is a typed PRNG key") as err:
      ckpt.save(1, {"state": {"key": jax.random.key(0), "w": jnp.ones(2)}})
    assert ckpt.latest_step() is None
  assert "\n" not in str(err.value)


@pytest.mark.parametrize("damaged", ["_METADATA", "data"])
def test_a_damaged_checkpoint_is_a_user_error(tmp_path, damaged):
  with checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:
    ckpt.save(1, _tree())
  files = [path for path in (tmp_path / "ckpt" / "1").rglob("*") if path.is_file()
           and (path.name == "_METADATA") == (damaged == "_METADATA")]
  assert files
  for path in files:
    path.write_bytes(b"{")
  with checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:
    assert_one_line_user_error(lambda: ckpt.restore(_tree()), "cannot be read",
                               "use a new --workdir")


def test_reads_silence_only_the_closed_loop_callbacks_of_an_aborted_restore(tmp_path,
                                                                            monkeypatch):
  # A failed read leaves tensorstore callbacks that hit orbax's closed event loop; Python
  # reports them through sys.unraisablehook (a traceback each under the one-line error).
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", seen.append)
  with checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:
    ckpt.save(1, _tree())
    ckpt.restore(_tree())
  closed, other = RuntimeError("Event loop is closed"), RuntimeError("something else")
  for error in (closed, other):
    sys.unraisablehook(types.SimpleNamespace(exc_value=error))
  # By identity: a late callback of the previous test's aborted read (same worker) may have
  # reached ``seen`` before this test's first read installed the filter.
  assert [item.exc_value for item in seen
          if item.exc_value is closed or item.exc_value is other] == [other]


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


def test_claim_workdir_refuses_files_and_unreadable_claims(tmp_path):
  (tmp_path / "results.json").write_text("{}")
  for workdir, message in ((tmp_path / "results.json", "is a file"),
                           (tmp_path / "results.json" / "run", "cannot create workdir")):
    with pytest.raises(UserError, match=message) as error:
      checkpoint.claim_workdir(workdir, {"lr": 0.1})
    assert "\n" not in str(error.value)
  truncated = tmp_path / "truncated"
  truncated.mkdir()
  (truncated / "config.json").write_text('{"lr": 0.')
  with pytest.raises(UserError, match="not readable JSON"):
    checkpoint.claim_workdir(truncated, {"lr": 0.1})
  assert (truncated / "config.json").read_text() == '{"lr": 0.'


def test_claim_workdir_finishes_a_claim_cut_short(tmp_path):
  # A kill between writing the claim and renaming it leaves only the partial file.
  (tmp_path / "config.json.partial").write_text('{"lr"')
  checkpoint.claim_workdir(tmp_path, {"lr": 0.1})
  assert json.loads((tmp_path / "config.json").read_text()) == {"lr": 0.1}
  assert sorted(path.name for path in tmp_path.iterdir()) == ["config.json"]
