"""Train a dense network: the baseline of every study, and the demo's first section.

``python -m experiments.dense --config experiments/configs/dense.py:small --workdir DIR``
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import ml_collections

from experiments import build, cli
from experiments.configs import dense as configs
from jaxtickets import checkpoint, files
from jaxtickets import data as data_lib
from jaxtickets import train as train_lib


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
                       progress: bool = True) -> dict[str, Any]:
  """Trains ``config.model`` on ``config.dataset``; resumes from ``workdir`` if it holds a run.

  Writes ``config.json``, ``metrics.jsonl`` (one record per epoch), ``checkpoints/`` and
  ``results.json`` into ``workdir``. Returns the results dict plus the per-epoch records.
  """
  configs.check_config(config)
  ds = build.dataset(config)
  model = build.model(config, ds.num_classes)
  data_lib.steps_per_epoch(len(ds.train.labels), config.batch_size)  # The batch fits.
  workdir = checkpoint.claim_workdir(workdir, config.to_dict())

  apply_fn = train_lib.model_apply_fn(model, ds.mean, ds.std)
  init_key, state_key = jax.random.split(jax.random.PRNGKey(config.seed))
  params, batch_stats = train_lib.init_variables(init_key, model, ds.image_shape)
  test = train_lib.device_data(ds.test)

  @jax.jit
  def evaluate(state):
    metrics = train_lib.evaluate(apply_fn, state.params, state.batch_stats, test)
    return {f"test_{k}": v for k, v in metrics.items()}

  state, records = build.fit_model(config, apply_fn, state_key, params, batch_stats, ds.train,
                                   workdir=workdir, evaluate=evaluate, progress=progress,
                                   description=f"{config.model} on {ds.name}")
  results = {"study": "dense", "dataset": ds.name, "model": config.model,
             "num_params": sum(x.size for x in jax.tree_util.tree_leaves(state.params)),
             "test_accuracy": records[-1]["test_accuracy"], "steps": records[-1]["step"]}
  files.write_json(workdir / "results.json", results)
  return {**results, "records": records}


def main(argv=None) -> None:
  cli.main("dense", train_and_evaluate, argv)


if __name__ == "__main__":
  main()
