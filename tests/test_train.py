"""Train steps, optimizer semantics, and resumable dense training through the real CLI."""

import json
import os
import pathlib
import subprocess
import sys
import time
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from assertions import assert_one_line_user_error
from jaxtickets import checkpoint, loop, metrics
from jaxtickets import data as data_lib
from jaxtickets import train as train_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMALL = ["--config", "experiments/configs/dense.py:small"]


def test_sgd_couples_weight_decay_like_pytorch():
  """Three steps against torch.optim.SGD's update rule written out in NumPy."""
  lr, momentum, wd = 0.1, 0.9, 5e-4
  optimizer = train_lib.sgd(lr, momentum=momentum, weight_decay=wd)
  w = jnp.array([1.0, -2.0, 3.0])
  state = optimizer.init(w)
  w_ref, buf = np.array(w), None
  for grad in ([0.5, 0.1, -0.3], [0.2, -0.4, 0.0], [1.0, 1.0, 1.0]):
    grad = np.array(grad, np.float32)
    updates, state = optimizer.update(jnp.asarray(grad), state, w)
    w = optax.apply_updates(w, updates)
    d = grad + wd * w_ref
    buf = d if buf is None else momentum * buf + d
    w_ref = w_ref - lr * buf
  np.testing.assert_allclose(w, w_ref, rtol=1e-6)


def test_multistep_schedule_drops_at_milestone_epochs():
  schedule = train_lib.multistep_schedule(0.1, steps_per_epoch=10, milestones=(2, 3), gamma=0.1)
  values = [float(schedule(s)) for s in (0, 19, 20, 29, 30, 100)]
  np.testing.assert_allclose(values, [0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-6)
  # MultiStepLR counts its milestones: one listed twice decays twice (IDC's 2E//3 and 5E//6
  # coincide for a 2- or 3-epoch evaluation).
  twice = train_lib.multistep_schedule(0.1, steps_per_epoch=10, milestones=(2, 2), gamma=0.2)
  assert [float(twice(s)) for s in (19, 20)] == pytest.approx([0.1, 0.1 * 0.2**2])


def test_mixed_labels_weigh_the_two_losses(digits):
  # A label-mixing augmentation (CutMix's form) whose second labels are the next class.
  data = train_lib.device_data(digits.train)
  weights = jax.random.normal(jax.random.key(0), (64, 10))

  def linear(params, batch_stats, x, train, key=None):
    return x.reshape(x.shape[0], -1) @ params, batch_stats

  def mix(key, x, labels):
    return x, (labels + 1) % 10, 0.3

  optimizer = train_lib.sgd(0.0)
  step = train_lib.make_train_step(linear, optimizer, batch_size=len(data.labels), augment=None,
                                   mix=mix)
  _, metrics = step(train_lib.create_train_state(jax.random.key(1), weights, {}, optimizer), data)
  logits = data_lib.to_unit(data.images).reshape(len(data.labels), -1) @ weights
  expected = (0.3 * train_lib.cross_entropy(logits, data.labels)
              + 0.7 * train_lib.cross_entropy(logits, (data.labels + 1) % 10))
  assert float(metrics["loss"]) == pytest.approx(float(expected), rel=1e-5)


def test_cross_entropy_of_uniform_logits_is_log_k():
  loss = train_lib.cross_entropy(jnp.zeros((4, 10)), jnp.array([0, 3, 9, 2]))
  assert float(loss) == pytest.approx(np.log(10), rel=1e-6)


def _run_cli(*args, check=True, prelude=""):
  """Runs the dense CLI in a fresh interpreter; ``prelude`` is Python executed before it."""
  code = prelude + "from experiments import dense; dense.main()"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  result = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
  if check and result.returncode != 0:
    raise AssertionError(result.stderr[-3000:])
  return result


def _final_params(workdir: pathlib.Path):
  step = checkpoint.Checkpointer(workdir / "checkpoints").latest_step()
  import orbax.checkpoint as ocp
  return step, ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "default")


# Kills the process (SIGKILL, no clean-up) when it is about to write its second checkpoint:
# the metrics log then already holds a record the checkpoint does not, the hardest case.
_KILL_ON_SECOND_SAVE = (
    "import os, signal; from jaxtickets import checkpoint as ck; _save = ck.Checkpointer.save\n"
    "def save(self, step, tree, _n=[0]):\n"
    "  _n[0] += 1\n"
    "  if _n[0] == 2: os.kill(os.getpid(), signal.SIGKILL)\n"
    "  _save(self, step, tree)\n"
    "ck.Checkpointer.save = save\n")


@pytest.mark.slow
def test_sigkill_then_rerun_resumes_to_identical_result(tmp_path):
  args = [*SMALL, "--config.epochs=4"]
  _run_cli(*args, "--workdir", str(tmp_path / "straight"))
  killed = _run_cli(*args, "--workdir", str(tmp_path / "resumed"), check=False,
                    prelude=_KILL_ON_SECOND_SAVE)
  assert killed.returncode == -9
  assert not (tmp_path / "resumed" / "results.json").exists()
  assert checkpoint.Checkpointer(tmp_path / "resumed" / "checkpoints").latest_step() is not None
  _run_cli(*args, "--workdir", str(tmp_path / "resumed"))

  step_a, params_a = _final_params(tmp_path / "straight")
  step_b, params_b = _final_params(tmp_path / "resumed")
  assert step_a == step_b
  chex.assert_trees_all_equal(params_a, params_b)
  log_a = metrics.MetricsLog(tmp_path / "straight" / "metrics.jsonl").read()
  log_b = metrics.MetricsLog(tmp_path / "resumed" / "metrics.jsonl").read()
  assert without_seconds(log_a) == without_seconds(log_b)
  assert len(log_a) == 4
  # The resumed log's wall times carry on from the killed process's first checkpoint.
  assert np.all(np.diff([record["seconds"] for record in log_b]) > 0)
  results = json.loads((tmp_path / "straight" / "results.json").read_text())
  assert results["test_accuracy"] > 0.9  # Chance is 0.1.


def without_seconds(records):
  """Records without their wall times, the one field two runs of the same training differ in."""
  return [{k: v for k, v in record.items() if k != "seconds"} for record in records]


class Counter(NamedTuple):
  step: jax.Array
  total: jax.Array


def test_fit_redoes_records_past_its_last_checkpoint(tmp_path):
  def step(state, data):
    return Counter(state.step + 1, state.total + jnp.sum(data.labels)), {"total": state.total}

  data = train_lib.Data(jnp.zeros((4, 2, 2, 1), jnp.uint8), jnp.arange(4, dtype=jnp.int32))
  initial = Counter(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))

  def run(workdir):
    return loop.fit(step, initial, data, num_steps=4, eval_every=2, workdir=workdir,
                    progress=False)[1]

  straight = run(tmp_path / "straight")
  # A kill while the first checkpoint was being saved: its record is logged, no checkpoint is.
  metrics.MetricsLog(tmp_path / "killed" / "metrics.jsonl").write(**straight[0])
  redone = run(tmp_path / "killed")
  assert without_seconds(redone) == without_seconds(straight)
  assert (metrics.MetricsLog(tmp_path / "killed" / "metrics.jsonl").read() == redone)


def test_evaluate_in_batches_that_do_not_divide_the_split_is_exact(digits):
  def linear(params, batch_stats, x, train, key=None):
    return x.reshape(x.shape[0], -1) @ params["w"], batch_stats

  params = {"w": jax.random.normal(jax.random.key(0), (64, 10)) * 0.1}
  test = train_lib.device_data(digits.test)
  assert len(digits.test.labels) % 7
  batched = train_lib.evaluate(linear, params, {}, test, batch_size=7)
  whole = train_lib.evaluate(linear, params, {}, test, batch_size=len(digits.test.labels))
  logits = linear(params, {}, data_lib.to_unit(test.images), False)[0]
  expected = float(np.mean(np.argmax(logits, -1) == np.asarray(test.labels)))
  assert float(batched["accuracy"]) == pytest.approx(expected) and 0.02 < expected < 0.98
  np.testing.assert_allclose(batched["loss"], whole["loss"], rtol=1e-5)


def test_fit_refuses_counts_that_are_not_multiples_of_step_size():
  data = train_lib.Data(jnp.zeros((4, 2, 2, 1), jnp.uint8), jnp.arange(4, dtype=jnp.int32))
  initial = Counter(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))
  assert_one_line_user_error(lambda: loop.fit(lambda state, data: (state, {}), initial, data,
                                              num_steps=4, eval_every=2, step_size=3,
                                              progress=False), "multiples of step_size 3")


def test_fit_sums_wall_seconds_over_resumed_runs(tmp_path):
  def step(state, data):
    return Counter(state.step + 1, state.total + jnp.sum(data.labels)), {"total": state.total}

  def slow_evaluate(state):
    time.sleep(0.3)
    return {}

  data = train_lib.Data(jnp.zeros((4, 2, 2, 1), jnp.uint8), jnp.arange(4, dtype=jnp.int32))
  initial = Counter(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))

  def run(num_steps):
    return loop.fit(step, initial, data, num_steps=num_steps, eval_every=2,
                    evaluate=slow_evaluate, workdir=tmp_path, progress=False)[1]

  first = run(2)
  started = time.perf_counter()
  resumed = run(4)
  own = time.perf_counter() - started
  assert resumed[0] == first[0] and first[0]["seconds"] >= 0.3
  assert first[0]["seconds"] + 0.3 <= resumed[1]["seconds"] <= first[0]["seconds"] + own
  assert loop.wall_seconds(resumed) == resumed[1]["seconds"] and loop.wall_seconds([]) == 0


def test_fit_gives_the_same_run_for_any_steps_per_call():
  # Chunks of 3 cross the evaluations every 2 steps; 1 << 30 runs each interval as one scan
  # (the accelerator default).
  def step(state, data):
    return Counter(state.step + 1, state.total * 3 + jnp.sum(data.labels)), {"total": state.total}

  data = train_lib.Data(jnp.zeros((4, 2, 2, 1), jnp.uint8), jnp.arange(4, dtype=jnp.int32))
  initial = Counter(jnp.zeros((), jnp.int32), jnp.ones((), jnp.int32))
  runs = [loop.fit(step, initial, data, num_steps=5, eval_every=2, steps_per_call=calls,
                   progress=False) for calls in (1, 3, 1 << 30)]
  for state, records in runs[1:]:
    assert int(state.total) == int(runs[0][0].total)
    assert without_seconds(records) == without_seconds(runs[0][1])
  assert [record["step"] for record in runs[0][1]] == [2, 4, 5]


def test_workdir_of_another_config_is_refused_untouched(tmp_path):
  workdir = tmp_path / "w"
  checkpoint.claim_workdir(workdir, {"something": "else"})
  before = sorted(p.name for p in workdir.iterdir())
  result = _run_cli(*SMALL, "--workdir", str(workdir), check=False)
  assert result.returncode == 2 and "different config" in result.stderr
  assert sorted(p.name for p in workdir.iterdir()) == before
