"""Train a dense network: the baseline of every study, and the demo's first section."""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import ml_collections

from experiments import build, cli
from experiments.configs import dense as dense_configs
from jaxtickets import checkpoint, files, loop
from jaxtickets import report as report_lib
from jaxtickets import data as data_lib
from jaxtickets import train as train_lib


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises UserError for bad settings before anything is loaded."""
  build.check_training(config)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
                       progress: bool = True) -> dict[str, Any]:
  """Trains ``config.model`` on ``config.dataset``; resumes from ``workdir`` if it holds a run.

  Writes ``config.json``, ``metrics.jsonl`` (one record per epoch), ``checkpoints/`` and
  ``results.json`` into ``workdir``. Returns the results dict plus the per-epoch records.
  """
  check_config(config)
  ds = build.dataset(config)
  model = build.model(config, ds.num_classes)
  augment = build.augment(config)
  steps_per_epoch = data_lib.steps_per_epoch(len(ds.train.labels), config.batch_size)
  optimizer = build.optimizer(config, steps_per_epoch)
  workdir = checkpoint.claim_workdir(workdir, config.to_dict())

  apply_fn = train_lib.model_apply_fn(model, ds.mean, ds.std)
  init_key, state_key = jax.random.split(jax.random.PRNGKey(config.seed))
  params, batch_stats = train_lib.init_variables(init_key, model, ds.image_shape)
  state = train_lib.create_train_state(state_key, params, batch_stats, optimizer)
  step = train_lib.make_train_step(apply_fn, optimizer, batch_size=config.batch_size,
                                   augment=augment)
  test = train_lib.device_data(ds.test)

  @jax.jit
  def evaluate(state):
    metrics = train_lib.evaluate(apply_fn, state.params, state.batch_stats, test)
    return {f"test_{k}": v for k, v in metrics.items()}

  state, records = loop.fit(step, state, train_lib.device_data(ds.train),
                            num_steps=config.epochs * steps_per_epoch, eval_every=steps_per_epoch,
                            evaluate=evaluate, workdir=workdir, progress=progress,
                            description=f"{config.model} on {ds.name}")
  results = {"dataset": ds.name, "model": config.model,
             "num_params": sum(x.size for x in jax.tree_util.tree_leaves(state.params)),
             "test_accuracy": records[-1]["test_accuracy"], "steps": records[-1]["step"]}
  files.write_json(workdir / "results.json", results)
  return {**results, "records": records}


def demo_section(report: report_lib.Report, workdir: pathlib.Path) -> None:
  """The demo's first section: the ``digits_convnet3`` preset in ``workdir / "dense"``."""
  result = train_and_evaluate(dense_configs.get_config("digits_convnet3"), workdir / "dense")
  records = result["records"]
  steps = [r["step"] for r in records]
  report.section(
      "Dense baseline",
      f"{result['model']} ({result['num_params']:,} parameters) trained on {result['dataset']}: "
      f"final test accuracy **{result['test_accuracy']:.2%}** after {result['steps']} steps.")
  report.figure("dense_learning_curve", report_lib.line_plot(
      {"train accuracy": (steps, [r["train_accuracy"] for r in records]),
       "test accuracy": (steps, [r["test_accuracy"] for r in records])},
      xlabel="step", ylabel="accuracy", title="Dense ConvNet-3 on digits"),
      "Dense ConvNet-3 learning curve on digits")


def main(argv=None) -> None:
  cli.main(train_and_evaluate, dense_configs, argv)


if __name__ == "__main__":
  main()
