"""The command line every study shares: bad input is one line on stderr and exit status 2, and
``python -m experiments.report`` re-renders a finished run's report."""

import importlib
import os
import pathlib
import subprocess
import sys

import pytest

from experiments import cli, dense, report

ROOT = pathlib.Path(__file__).resolve().parents[1]
TFDS_EMPTY = "/nonexistent/tensorflow_datasets"


def _small(study):
  return ["--config", f"experiments/configs/{study}.py:small"]


def _set(*settings):
  return [f"--config.{setting}" for setting in settings]


# (study, arguments before --workdir, a fragment of the one-line error); ``--config.*`` settings
# alone apply to the study's small preset. Most rows fail in the study's configs.check_config;
# those past it (a dataset, a model, shapes, the devices) fail after the workdir was claimed, and
# the failed command removes it.
BAD_INPUTS = [
    # The command line itself.
    ("dense", ["--config", "experiments/configs/dense.py:nope"], "unknown config preset 'nope'"),
    ("dense", ["--config", "small"], "no config file 'small'"),
    ("dense", ["--config", ""], "no config file ''"),
    ("dense", ["--config", "README.md"], "no config file 'README.md'"),
    ("dense", _set("no_such_key=1"), "unknown config key 'no_such_key'"),
    ("dense", _set("epochs.sub=1"), "unknown config key 'epochs.sub'"),
    ("dense", _set("attack.eps=1"), "unknown config key 'attack.eps'"),
    ("dense", ["--config.epochs=3", *_small("dense")], "before a value for --config"),
    ("dense", [*_small("dense"), "--sett", "epochs=1"], "Unknown command line flag 'sett'"),
    ("dense", [*_small("dense"), "extra"], "unexpected arguments: extra"),
    # Values of the wrong type.
    ("dense", _set("epochs=abc"), "--config.epochs=abc"),
    ("dense", _set("epochs=2.5"), "--config.epochs=2.5"),
    ("dense", _set("seed={1: []}"), "--config.seed={1: []}"),
    ("dense", _set("model_options=3"), "--config.model_options=3"),
    ("dense", _set("model_options=None"), "--config.model_options=None"),
    ("dense", _set("milestones=(5, 2"), "--config.milestones=(5, 2"),
    ("rst", _set("natural_baseline=None"), "--config.natural_baseline=None"),
    ("distill", _set("flip=None"), "--config.flip=None"),
    # Dense training (every study's training fields are checked by experiments.checks).
    ("dense", _set("dataset=nope"), "unknown dataset"),
    ("dense", _set("model=nope"), "unknown model"),
    ("dense", _set("dataset=npz:/does/not/exist.npz"), "exist.npz"),
    ("dense", _set("dataset=cifar10", f"data_dir={TFDS_EMPTY}"), "not prepared"),
    ("dense", _set("model_options.widht=3"), "unknown config key 'model_options.widht'"),
    ("dense", _set("learning_rate=-1"), "learning_rate=-1"),
    ("dense", _set("momentum=1.5"), "momentum=1.5"),
    ("dense", _set("weight_decay=-0.1"), "weight_decay=-0.1"),
    ("dense", _set("gamma=0"), "gamma=0"),
    ("dense", _set("milestones=(5, 2)"), "milestones=(5, 2)"),
    ("dense", _set("milestones=('a',)"), "milestones=('a',)"),
    ("dense", _set("schedule=step"), "unknown schedule 'step'"),
    ("dense", _set("seed=-1"), "seed=-1"),
    ("dense", _set("seed=4294967296"), "seed=4294967296"),
    ("dense", _set("batch_size=None"), "batch_size=None"),
    ("dense", _set("dataset=None"), "dataset=None"),
    ("dense", _set("learning_rate=1e999"), "learning_rate=inf"),
    ("dense", _set("model_options.dtype=float16"),
     "model_options.dtype='float16' would be ignored"),
    ("dense", _set("model_options.depth=0"), "no conv units"),
    # RST.
    ("rst", _set("attack.eps=-0.1"), "attack.eps=-0.1"),
    ("rst", _set("attack.num_steps=0"), "attack.num_steps=0"),
    ("rst", _set("attack.batch_norm=train"), "unknown attack batch_norm 'train'"),
    ("rst", _set("keep_ratios=(0.5, 1.5)"), "keep_ratios=(0.5, 1.5)"),
    ("rst", _set("keep_ratios=(0.0,)"), "keep_ratios=(0.0,)"),
    ("rst", _set("keep_ratios=None"), "keep_ratios=None"),
    ("rst", _set("keep_ratios=(0.3, 0.3)"), "repeats 0.3"),
    ("rst", _set("eval.pgd_steps=0"), "eval.pgd_steps=0"),
    ("rst", _set("eval.step_size=-0.01"), "eval.step_size=-0.01"),
    ("rst", _set("eval.attacks=('cw',)"), "eval.attacks=('cw',)"),
    ("rst", _set("eval.attacks=None"), "eval.attacks=None"),
    ("rst", _set("epochs=0"), "epochs=0"),
    ("rst", _set("weight_init=kaiming"), "unknown initializer 'kaiming'"),
    ("rst", _set("strategy=pmap"), "unknown population strategy 'pmap'"),
    ("rst", _set("val_fraction=None"), "val_fraction=None"),
    ("rst", _set("val_fraction=1"), "val_fraction=1"),
    ("rst", _set("model_options.norm=group"), "model_options.norm='group' would be ignored"),
    ("rst", _set("strategy=shard"), "the tickets (keep_ratios): 2 members"),
    ("rst", _set("dense_baseline.enabled=True", "dense_baseline.model_options.width=0"),
     "dense_baseline.model_options.width=0"),
    ("rst", _set("dense_baseline.enabled=True", "dense_baseline.model_options.use_bias=1"),
     "dense_baseline.model_options.use_bias=1"),
    ("rst", _set("dense_baseline.enabled=True", "dense_baseline.model_options.norm=bn"),
     "unknown norm 'bn'"),
    ("rst", _set("finetune.init=rewind"), "unknown finetune.init 'rewind'"),
    ("rst", _set("finetune.epochs=1", "finetune.weight_init=kaiming"),
     "unknown initializer 'kaiming'"),
    ("rst", _set("finetune.epochs=1", "finetune.schedule=linear"),
     "finetune.schedule 'linear'"),
    # AWS.
    ("aws", _set("pruning.rounds=0"), "pruning rounds must be an int >= 1"),
    ("aws", _set("transfer.densities=(1.5,)"), "density must be in (0, 1]"),
    ("aws", _set("transfer.densities=(0.0,)"), "density must be in (0, 1]"),
    ("aws", _set("pruning.fraction=1.2"), "pruning fraction"),
    ("aws", _set("methods=('lrr', 'imp')"), "methods=('lrr', 'imp'); unknown 'imp', known: "),
    ("aws", _set("transfer.variants=('sign', 'sign')"),
     "transfer.variants=('sign', 'sign') repeats 'sign'"),
    ("aws", _set("transfer.seeds=(3, 3)"),
     "transfer.seeds=(3, 3) repeats 3; each seed is one member"),
    ("aws", _set("transfer.seeds=(1, True)"), "transfer.seeds entry=True"),
    ("aws", _set("methods=('imp', 1)"), "unknown 'imp'"),
    ("aws", _set("methods=(['lrr'],)"), "expected names or numbers"),
    ("aws", _set("transfer.densities=(0.25, 0.26)"), "are both nearest round 2"),
    ("aws", _set("lmc.batch_size=5000"), "lmc.batch_size=5000 exceeds"),
    ("aws", _set("train_subset=0.0"), "train_subset=0.0"),
    ("aws", _set("test_subset=1.5"), "test_subset=1.5"),
    ("aws", _set("model_options.norm=none"), "AWS interpolates norm params"),
    ("aws", _set("methods=None"), "methods=None"),
    ("aws", _set("transfer.seeds=None"), "transfer.seeds=None"),
    ("aws", _set("transfer.densities=None"), "densities=None"),
    ("aws", _set("transfer.dense=None"), "--config.transfer.dense=None"),
    # Four test devices: every population must split over them (found before any training).
    ("aws", _set("strategy=shard"), "the pruning population (methods): 2 members"),
    # Dataset distillation.
    ("distill", _set("ipc=0"), "ipc=0"),
    ("distill", _set("ipc=500"), "class"),
    ("distill", _set("method=kip"), "unknown distillation method"),
    ("distill", _set("method_overrides.factor=0"), "factor=0"),
    ("distill", _set("num_models=0"), "num_models=0"),
    ("distill", _set("class_map=pmap"), "class_map='pmap'"),
    ("distill", _set("method_overrides.net_mix_probability=x"), "net_mix_probability='x'"),
    ("distill", _set("method_overrides.image_lr=-0.1"), "image_lr=-0.1"),
    ("distill", _set("method_overrides.net_unit=epoch"), "net_unit 'epoch'"),
    ("distill", _set("normalization=cifar10_common"), "digits images have 1"),
    ("distill", _set("chunk_size=2"), "chunk_size=2 applies to strategy 'map'"),
    ("distill", _set("eval.strategy=None"), "DSA strategy None"),
    ("distill", _set("train_fraction=None"), "train_fraction=None"),
    ("distill", _set("trajectory_chunk=0"), "trajectory_chunk=0"),
    ("distill", _set("trajectory_chunk=2"),
     "trajectory_chunk=2 must divide the checkpoint_every (1)"),
    ("distill", _set("strategy=shard"), "num_models: 1 members"),
    # Transfusion.
    ("transfusion", _set("transfusion_blocks=(5,)"), "num_blocks=5"),
    ("transfusion", _set("arms=('random', 'imagenet')"), "imagenet"),
    ("transfusion", _set("models=('cbr_tiny', 'resnet18')"), "one width"),
    ("transfusion", _set("widths=(0,)"), "widths entry=0"),
    ("transfusion", _set("models=(3,)"), "unknown 3, known: "),
    ("transfusion", _set("seeds=0"), "seeds=0"),
    ("transfusion", _set("epochs=0"), "epochs=0"),
    ("transfusion", _set("strategy=pmap"), "unknown population strategy 'pmap'"),
    ("transfusion", _set("similarity.methods=('cka',)"), "similarity.methods=('cka',)"),
    ("transfusion", _set("similarity.keep_variance=0"), "similarity.keep_variance=0"),
    ("transfusion", _set("similarity.max_datapoints=5"),
     "max_datapoints=5 is below the batch size 100"),
    ("transfusion", _set("target_classes=('a', 'b')"),
     "target_classes=('a', 'b'); expected a sequence of at least 2 distinct int labels"),
    ("transfusion", _set("target_classes=(5, 5)"), "target_classes=(5, 5)"),
    ("transfusion", _set("source.classes=(0, 10)"), "in [0, 10) of digits"),
    # The source is pretrained with the study's models and seed; it has no fields of its own.
    ("transfusion", _set("source.model=resnet18"), "unknown config key 'source.model'"),
    ("transfusion", _set("source.seed=1"), "unknown config key 'source.seed'"),
    ("transfusion", _set("source.epochs=0"), "source.epochs=0"),
    ("transfusion", _set("models=None"), "models=None"),
    ("transfusion", _set("arms=None"), "arms=None"),
    ("transfusion", _set("sweep_arms=None"), "sweep_arms=None"),
    ("transfusion", _set("transfusion_blocks=None"), "transfusion_blocks"),
    ("transfusion", _set("source.train_fraction=None"), "source.train_fraction=None"),
    ("transfusion", _set("val_fraction=1"), "val_fraction=1"),
    # Found from shapes before anything trains: the last unit's 1 x 1 map of one probe image.
    ("transfusion", _set("similarity.probe_size=1"), "fewer datapoints (1) than neurons"),
    ("transfusion", _set("strategy=shard"), "cbr_tiny full (arms x seeds): 10 members"),
    ("transfusion", _set("arms=('random', 'transfer', 'random')"),
     "arms=('random', 'transfer', 'random') repeats 'random'; it would train identical members"),
    ("transfusion", _set("arms=('random', 1, 'x')"), "unknown 1, known: "),
    ("transfusion", _set("transfusion_blocks=(1, 1.0)"), "transfusion num_blocks=1.0"),
    ("transfusion", _set("transfusion_blocks=(1, 1)"), "transfusion_blocks=(1, 1) repeats 1"),
]


def _arguments(study, arguments):
  """A row's arguments; ``--config.*`` settings alone apply to the study's small preset."""
  if all(arg.startswith("--config.") for arg in arguments):
    return [*_small(study), *arguments]
  return arguments


@pytest.mark.parametrize("study, arguments, fragment", BAD_INPUTS,
                         ids=[f"{row[0]}:{' '.join(row[1])}" for row in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2_and_leaves_no_workdir(study, arguments, fragment, tmp_path,
                                                             capsys):
  main = importlib.import_module(f"experiments.{study}").main
  workdir = tmp_path / "run"
  with pytest.raises(SystemExit) as exit_info:
    main([*_arguments(study, arguments), "--workdir", str(workdir)])
  error = capsys.readouterr().err
  assert (exit_info.value.code, error.count("\n")) == (2, 1), error
  assert error.startswith("error: ") and fragment in error, error
  assert not workdir.exists()


def test_workdir_is_required(capsys):
  with pytest.raises(SystemExit) as exit_info:
    dense.main(_small("dense"))
  error = capsys.readouterr().err
  assert exit_info.value.code == 2 and error == "error: --workdir is required\n"



def _python_m(module, *arguments, cwd):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", module, *arguments], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("module, arguments, fragment", [
    # From another folder: --config defaults to the study's config file and default preset.
    ("experiments.dense", ["--config.epochs=0", "--workdir", "{workdir}"], "epochs=0"),
    ("experiments.rst", ["--config", "{root}/experiments/configs/rst.py:small",
                         "--config.keep_ratios=(0.5,1.5)", "--workdir", "{workdir}"], "1.5"),
    ("experiments.report", ["{workdir}"], "cannot read"),
])
def test_bad_input_through_python_m(module, arguments, fragment, tmp_path):
  workdir = tmp_path / "run"
  result = _python_m(module, *(arg.format(workdir=workdir, root=ROOT) for arg in arguments),
                     cwd=tmp_path)
  assert (result.returncode, result.stderr.count("\n")) == (2, 1), result.stderr[-3000:]
  assert result.stderr.startswith("error: ") and fragment in result.stderr
  assert not workdir.exists()


def test_values_parse_for_their_fields_type():
  config, workdir = cli.parse("rst", [
      *_small("rst"), "--config.keep_ratios=(0.5,0.3)", "--config.weight_init=kaiming_normal",
      "--noconfig.natural_baseline", "--config.epochs", "2", "--config.strategy=vmap",
      "--config.chunk_size=None", "--config.data_dir=2024", "--config.model_options.width=None",
      "--config.model_options.conv_impl=im2col", "--config.dense_baseline.model_options.width=8",
      "--workdir", "w"])
  assert workdir == "w" and config.keep_ratios == (0.5, 0.3) and config.epochs == 2
  assert config.weight_init == "kaiming_normal" and config.natural_baseline is False
  assert (config.strategy, config.chunk_size, config.data_dir) == ("vmap", None, "2024")
  # Model options: any registered model's may be given; None (or not given) is the default.
  assert config.model_options.to_dict() == {"conv_impl": "im2col"}
  assert config.dense_baseline.model_options.to_dict() == {
      "norm": "batch", "head_bias": True, "width": 8}
  default, _ = cli.parse("dense", ["--workdir", "w"])
  assert default.to_dict() == importlib.import_module(
      "experiments.configs.dense").get_config().to_dict()


@pytest.mark.slow
def test_report_rerenders_a_finished_run_identically(tmp_path, capsys):
  workdir = tmp_path / "run"
  dense.main([*_small("dense"), "--workdir", str(workdir)])
  assert f"report written to {workdir / 'report.md'}" in capsys.readouterr().out
  rendered = {path.name: path.read_bytes() for path in workdir.glob("*.png")}
  rendered["report.md"] = (workdir / "report.md").read_bytes()
  assert "dense_learning_curve.png" in rendered and b"final test accuracy" in rendered["report.md"]
  for name in rendered:
    (workdir / name).unlink()
  report.main([str(workdir)])
  assert {name: (workdir / name).read_bytes() for name in rendered} == rendered


@pytest.mark.parametrize("results, fragment", [
    (None, "cannot read"), ("{", "is not JSON"), ("{}", "names no study"),
    ('{"study": "nope"}', "no report module for study 'nope'")])
def test_report_of_a_bad_workdir_is_one_line_exit_2(results, fragment, tmp_path, capsys):
  if results is not None:
    (tmp_path / "results.json").write_text(results)
  with pytest.raises(SystemExit) as exit_info:
    report.main([str(tmp_path)])
  error = capsys.readouterr().err
  assert (exit_info.value.code, error.count("\n")) == (2, 1) and fragment in error
