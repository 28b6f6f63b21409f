"""Metrics against independent implementations (scikit-learn, NumPy ranks)."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from assertions import assert_one_line_user_error
from jaxtickets import metrics


def test_accuracy_counts_argmax_hits():
  logits = jnp.array([[0.1, 2.0], [3.0, -1.0], [0.0, 1.0]])
  assert float(metrics.accuracy(logits, jnp.array([1, 0, 0]))) == pytest.approx(2 / 3)


@pytest.mark.parametrize("seed", range(5))
def test_binary_auc_matches_sklearn_with_ties(seed):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 2, 200)
  scores = np.round(rng.normal(size=200) + labels, 1)  # Rounding makes ties common.
  assert float(metrics.roc_auc(jnp.asarray(scores), jnp.asarray(labels))) == pytest.approx(
      roc_auc_score(labels, scores), abs=1e-6)


def test_binary_auc_of_a_large_split_matches_sklearn():
  # 60,000 x 60,000 positive-negative pairs: more than an int32 holds.
  rng = np.random.default_rng(0)
  labels = np.repeat([0, 1], 60_000)
  scores = rng.normal(size=labels.size) + 0.5 * labels
  assert float(metrics.roc_auc(jnp.asarray(scores), jnp.asarray(labels))) == pytest.approx(
      roc_auc_score(labels, scores), abs=1e-4)


def test_auc_is_nan_for_a_class_without_positives():
  scores = jnp.asarray([0.1, 0.4, 0.35, 0.8])
  assert np.isnan(float(metrics.roc_auc(scores, jnp.zeros(4, jnp.int32))))


def test_auc_of_nan_scores_is_nan_not_chance():
  labels = jnp.asarray([0, 1, 0, 1])
  assert np.isnan(float(metrics.roc_auc(jnp.full((4, 2), jnp.nan), labels)))
  assert np.isnan(float(metrics.roc_auc(jnp.asarray([0.1, jnp.nan, 0.2, 0.9]), labels)))


def test_two_column_logits_rank_like_probabilities():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 2, 300)
  logits = rng.normal(size=(300, 2)) + np.eye(2)[labels]
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  assert float(metrics.roc_auc(jnp.asarray(logits), jnp.asarray(labels))) == pytest.approx(
      roc_auc_score(labels, probs[:, 1]), abs=1e-6)


def test_one_vs_rest_macro_matches_sklearn():
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 4, 400)
  logits = rng.normal(size=(400, 4)) + 1.5 * np.eye(4)[labels]
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  expected = roc_auc_score(labels, probs, multi_class="ovr", average="macro")
  # Per-class AUC of raw logits equals that of softmax only up to ranking; use probabilities.
  assert float(metrics.roc_auc(jnp.asarray(probs), jnp.asarray(labels))) == pytest.approx(
      expected, abs=1e-6)


def test_a_single_score_column_is_refused_not_read_as_class_0():
  # One-vs-rest would score class 0 with it: the AUC of the positive class, inverted.
  labels = jnp.asarray([0, 1, 1, 0, 1])
  scores = jnp.asarray([0.1, 0.8, 0.7, 0.3, 0.9])
  assert float(metrics.roc_auc(scores, labels)) == pytest.approx(1.0)
  assert_one_line_user_error(lambda: metrics.roc_auc(scores[:, None], labels), "f32[N, 1]")


def test_metrics_log_truncates_for_resume(tmp_path):
  log = metrics.MetricsLog(tmp_path / "m.jsonl")
  for step in (10, 20, 30):
    log.write(step, loss=np.float32(step / 10), per_member=jnp.arange(2))
  log.truncate(20)
  records = log.read()
  assert [r["step"] for r in records] == [10, 20]
  assert records[1] == {"step": 20, "loss": 2.0, "per_member": [0, 1]}
  json.loads((tmp_path / "m.jsonl").read_text().splitlines()[0])


def test_metrics_log_drops_a_record_cut_short_by_a_kill(tmp_path):
  log = metrics.MetricsLog(tmp_path / "m.jsonl")
  for step in (10, 20):
    log.write(step, loss=1.0)
  with (tmp_path / "m.jsonl").open("a") as f:
    f.write('{"step": 30, "lo')  # The process died inside this write.
  assert [r["step"] for r in log.read()] == [10, 20]
  log.truncate(20)
  assert (tmp_path / "m.jsonl").read_text().count("\n") == 2


def test_metrics_log_with_a_broken_record_inside_is_a_user_error(tmp_path):
  path = tmp_path / "m.jsonl"
  path.write_text('{"step": 10}\nnot json\n{"step": 30}\n')
  assert_one_line_user_error(metrics.MetricsLog(path).read, "m.jsonl line 2")
  assert sorted(path.name for path in tmp_path.iterdir()) == ["m.jsonl"]
