"""Transfusion's initialization arms, grayscale adaptation and convergence, its runner and report.

The ``small`` preset (digits 0-4 -> held-out digits 5-9, CBR-Tiny of width 2) runs once for the
module; the library tests use parameter shapes from ``jax.eval_shape`` filled with known draws.
"""

import functools
import json
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import report as report_renderer
from experiments import transfusion as runner
from experiments.configs import transfusion as transfusion_configs
from experiments.reports import transfusion as transfusion_report
from jaxtickets import checkpoint, models, population, transfusion
from jaxtickets import data as data_lib
from jaxtickets.transfusion import Arm

KEY = jax.random.key(0)
CONFIG = "experiments/configs/transfusion.py:small"


def variables_like(name, seed, *, image_shape=(8, 8, 1), num_classes=5, shift=0.0, **options):
  """Variables of model ``name`` whose every leaf is a distinct normal draw (no model init).

  Leaf i is N(shift + 0.1 i, (0.5 + 0.05 i)^2), so each tensor has its own mean and variance.
  """
  model = models.get_model(name, num_classes=num_classes, **options)
  shapes = jax.eval_shape(lambda: model.init(KEY, jnp.zeros((1, *image_shape)), train=False))
  rng = np.random.default_rng(seed)
  leaves, treedef = jax.tree.flatten(shapes)
  drawn = [jnp.asarray(shift + 0.1 * i + (0.5 + 0.05 * i) * rng.standard_normal(leaf.shape),
                       jnp.float32) for i, leaf in enumerate(leaves)]
  return model, jax.tree.unflatten(treedef, drawn)


def module_of(path, collection=True):
  """The top-level module of a leaf path into variables (or, ``collection=False``, params)."""
  return str(path[1 if collection else 0].key)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
  """The ``small`` preset's results (with ``"runs"``), its config and its workdir (with its
  rendered report)."""
  config = transfusion_configs.get_config("small")
  workdir = tmp_path_factory.mktemp("transfusion") / "small"
  results = runner.train_and_evaluate(config, workdir, progress=False)
  report_renderer.render(workdir)
  return results, config, workdir


# ----------------------------------------------------------------------------------------------
# Units and arms


def test_units_group_each_norm_with_its_module_and_leave_out_the_head():
  cbr = models.get_model("cbr_small", num_classes=2)
  assert transfusion.transfer_units(cbr.block_names) == (
      ("stem", "stem_norm"), ("block1",), ("block2",), ("block3",))
  resnet = models.get_model("resnet18", num_classes=2)
  units = transfusion.transfer_units(resnet.block_names)
  assert units[0] == ("stem", "stem_norm") and len(units) == 9 and units[-1] == ("layer4_1",)
  unnormed = models.get_model("cbr_tiny", num_classes=2, norm="none")
  assert transfusion.transfer_units(unnormed.block_names)[0] == ("stem",)


@pytest.mark.parametrize("name", ["cbr_tiny", "resnet18"])
def test_transfusion_of_k_blocks_copies_exactly_those_blocks(name):
  model, pretrained = variables_like(name, 0, width=2, shift=5.0)
  _, fresh = variables_like(name, 1, width=2)
  units = transfusion.transfer_units(model.block_names)
  for k in range(len(units) + 1):
    copied = {module for unit in units[:k] for module in unit}
    result = jax.jit(lambda p, f: transfusion.transfuse(p, f, model.block_names, k))(
        pretrained, fresh)
    for (path, leaf), source_leaf, fresh_leaf in zip(jax.tree.leaves_with_path(result),
                                                     jax.tree.leaves(pretrained),
                                                     jax.tree.leaves(fresh)):
      expected = source_leaf if module_of(path) in copied else fresh_leaf
      np.testing.assert_array_equal(leaf, expected, err_msg=f"k={k} {path}")
  full = transfusion.initialize(Arm("transfer"), KEY, pretrained, fresh, model.block_names)
  np.testing.assert_array_equal(full["params"]["head"]["kernel"], fresh["params"]["head"]["kernel"])
  np.testing.assert_array_equal(full["params"]["stem"]["kernel"],
                                pretrained["params"]["stem"]["kernel"])


def test_mean_var_init_matches_per_tensor_mean_and_variance():
  model, pretrained = variables_like("cbr_small", 0, width=8, shift=1.0)
  _, fresh = variables_like("cbr_small", 1, width=8)
  result = jax.jit(lambda key, p, f: transfusion.mean_var_init(key, p, f))(KEY, pretrained, fresh)
  checked = 0
  for (path, leaf), source_leaf in zip(jax.tree.leaves_with_path(result["params"]),
                                       jax.tree.leaves(pretrained["params"])):
    if module_of(path, collection=False) == "head":
      continue
    count = leaf.size
    mean, std = float(jnp.mean(source_leaf)), float(jnp.std(source_leaf))
    assert not np.array_equal(leaf, source_leaf)
    # Sampling error of an i.i.d. normal draw: 5 standard errors of the mean and of the std.
    assert abs(float(jnp.mean(leaf)) - mean) < 5 * std / np.sqrt(count), path
    assert abs(float(jnp.std(leaf)) - std) < 5 * std * np.sqrt(0.5 / count) + 1e-6, path
    checked += count > 1000
  assert checked == 3  # The kernels of block1..block3, where the test has power.
  np.testing.assert_array_equal(result["params"]["head"]["kernel"],
                                fresh["params"]["head"]["kernel"])
  chex.assert_trees_all_equal(result["batch_stats"], fresh["batch_stats"])
  # The other BatchNorm choice keeps the fresh affine parameters of the norms.
  default = transfusion.mean_var_init(KEY, pretrained, fresh, norm_init="default")
  np.testing.assert_array_equal(default["params"]["block1"]["norm"]["scale"],
                                fresh["params"]["block1"]["norm"]["scale"])
  np.testing.assert_allclose(default["params"]["block1"]["conv"]["kernel"],  # jit vs eager
                             result["params"]["block1"]["conv"]["kernel"], rtol=1e-5)


def test_gabor_filters_replace_only_the_first_conv_at_its_scale():
  _, fresh = variables_like("cbr_tiny", 0, width=8)
  result = transfusion.gabor_init(KEY, fresh)
  kernel = result["params"]["stem"]["kernel"]
  assert kernel.shape == fresh["params"]["stem"]["kernel"].shape
  assert float(jnp.std(kernel)) == pytest.approx(float(jnp.std(fresh["params"]["stem"]["kernel"])),
                                                 rel=1e-4)
  for module in ("block1", "head"):
    chex.assert_trees_all_equal(result["params"][module], fresh["params"][module])
  assert abs(float(jnp.mean(kernel))) < 1e-6
  filters = np.asarray(kernel[:, :, 0, :]).reshape(-1, kernel.shape[-1]).T
  assert np.linalg.matrix_rank(filters) == kernel.shape[-1]  # eight different filters
  np.testing.assert_array_equal(transfusion.gabor_init(KEY, fresh)["params"]["stem"]["kernel"],
                                kernel)
  rgb = transfusion.gabor_filters(KEY, (5, 5, 3, 4), std=0.2)
  np.testing.assert_allclose(rgb[:, :, 0], rgb[:, :, 2])  # One luminance filter per channel.


def test_rgb_first_conv_summed_over_channels_equals_repeating_the_gray_channel(digits):
  kernel = jax.random.normal(KEY, (3, 3, 3, 4))
  adapted = transfusion.adapt_input_channels({"stem": {"kernel": kernel}}, 1)["stem"]["kernel"]
  gray = data_lib.to_unit(jnp.asarray(digits.test.images[:16]))

  def conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  np.testing.assert_allclose(conv(gray, adapted), conv(jnp.repeat(gray, 3, axis=-1), kernel),
                             rtol=1e-5, atol=1e-5)
  back = transfusion.adapt_input_channels({"stem": {"kernel": adapted}}, 3)["stem"]["kernel"]
  np.testing.assert_allclose(back.sum(axis=2), adapted[:, :, 0], rtol=1e-6)


def test_slim_top_keeps_the_lowest_units_and_narrows_the_rest():
  model, pretrained = variables_like("cbr_small", 0, width=8)
  widths = transfusion.slim_unit_widths(pretrained["params"], model.block_names, 2, 4)
  assert widths == (8, 16, 8, 16)
  slim_model, slim_fresh = variables_like("cbr_small", 1, width=8, unit_widths=widths)
  result = transfusion.initialize(Arm("slim", 2), KEY, pretrained, slim_fresh,
                                  slim_model.block_names)
  np.testing.assert_array_equal(result["params"]["block1"]["conv"]["kernel"],
                                pretrained["params"]["block1"]["conv"]["kernel"])
  assert result["params"]["block2"]["conv"]["kernel"].shape == (7, 7, 16, 8)


def test_steps_to_threshold_and_speedup():
  steps = [10, 20, 30, 40]
  auc = np.array([[0.5, 0.7, np.nan], [0.8, 0.7, 0.6], [0.9, 0.85, 0.7], [0.7, 0.9, 0.75]])
  np.testing.assert_array_equal(transfusion.steps_to_threshold(steps, auc, 0.8),
                                [20, 30, np.inf])
  assert transfusion.speedup(np.array([40.0, 40.0]), np.array([20.0, 10.0])) == pytest.approx(
      80 / 30)
  assert transfusion.speedup(np.array([40.0]), np.array([np.inf])) == 0.0
  assert np.isnan(transfusion.speedup(np.array([np.inf]), np.array([np.inf])))
  with pytest.raises(ValueError, match="evaluations"):  # Fewer AUCs than steps.
    transfusion.steps_to_threshold(steps, auc[:3], 0.8)


def test_class_subset_relabels_in_the_given_order(digits):
  subset = transfusion.class_subset(digits, (7, 3))
  assert subset.num_classes == 2
  np.testing.assert_array_equal(subset.train.images, digits.train.images[
      np.isin(digits.train.labels, (3, 7))])
  np.testing.assert_array_equal(subset.train.labels,
                                (digits.train.labels[np.isin(digits.train.labels, (3, 7))] == 3))
  assert transfusion.class_subset(digits, None) is digits


def test_initialize_population_puts_each_seeds_arms_on_its_fresh_draw():
  model, pretrained = variables_like("cbr_tiny", 0, width=2, shift=5.0)
  fresh = population.stack([variables_like("cbr_tiny", seed, width=2)[1] for seed in (1, 2)])
  arms = [Arm("random"), Arm("transfer"), Arm("transfusion", 1)]
  keys = jax.random.split(KEY)
  members = transfusion.initialize_population(arms, keys, pretrained, fresh, model.block_names)
  assert population.size(members) == 6  # member = arm * seeds + seed
  for index, arm in enumerate(arms):
    for seed in range(2):
      chex.assert_trees_all_equal(
          population.select(members, index * 2 + seed),
          transfusion.initialize(arm, keys[seed], pretrained, population.select(fresh, seed),
                                 model.block_names))
  # Each unit's output, keyed by the unit's last module, as the similarity compares them.
  shapes = jax.eval_shape(functools.partial(transfusion.unit_outputs, model),
                          population.select(fresh, 0), jnp.zeros((3, 8, 8, 1)))
  assert list(shapes) == ["block1", "block2", "block3", "stem_norm"]  # jit sorts the keys
  assert shapes["stem_norm"].shape[0] == 3 and shapes["stem_norm"].dtype == jnp.float32


def test_the_library_refuses_unknown_names():
  model, pretrained = variables_like("cbr_tiny", 0, width=2)
  with pytest.raises(ValueError, match="unknown arm 'imagenet'; known: random"):
    transfusion.initialize(Arm("imagenet"), KEY, pretrained, pretrained, model.block_names)
  with pytest.raises(ValueError, match="norm_init 'copy'"):
    transfusion.mean_var_init(KEY, pretrained, pretrained, norm_init="copy")


# ----------------------------------------------------------------------------------------------
# The runner


def test_small_run_trains_every_arm_and_starts_them_as_specified(small_run):
  results, config, workdir = small_run
  regimes = results["models"]["cbr_tiny"]["regimes"]
  assert set(regimes["full"]["arms"]) == {"random", "transfer", "meanvar", "transfusion_k1",
                                          "gabor", "slim_k2"}
  assert set(regimes["reduced"]["arms"]) == {"random", "transfer", "meanvar"}
  assert results["target"]["split_sizes"]["train_reduced"] < \
      0.2 * results["target"]["split_sizes"]["train_full"]
  for regime in regimes.values():
    for arm in regime["arms"].values():
      assert len(arm["test_auc"]) == config.seeds
      assert all(0.5 < auc <= 1.0 for auc in arm["test_auc"])  # every arm learns the 5 digits
  run = results["runs"]["cbr_tiny"]["full"]
  names = [arm.name for arm in run.arms]
  pretrained_stem = transfusion.adapt_input_channels(
      saved_pretrained_params(workdir, config), 1)["stem"]["kernel"]

  def initial(arm, seed=0):
    return population.select(run.initial["params"], names.index(arm) * config.seeds + seed)

  np.testing.assert_array_equal(initial("transfer")["stem"]["kernel"], pretrained_stem)
  np.testing.assert_array_equal(initial("transfusion_k1")["block1"]["conv"]["kernel"],
                                initial("random")["block1"]["conv"]["kernel"])
  assert not np.array_equal(initial("random", 0)["stem"]["kernel"],
                            initial("random", 1)["stem"]["kernel"])


def saved_pretrained_params(workdir, config):
  """The pretrained params the run saved in ``pretrain/cbr_tiny/pretrained``."""
  source = runner.load_task(config.source, config.source.classes, "source.classes")
  source_model = runner.SourceModel(config, transfusion_configs.check_config(config)[0], source)
  with checkpoint.Checkpointer(workdir / "pretrain" / "cbr_tiny" / "pretrained") as saved:
    return saved.restore(source_model.template)["params"]


def test_similarity_and_report(small_run):
  results, config, workdir = small_run
  result = results["similarity"]["cbr_tiny"]
  assert result["layers"] == ["stem_norm", "block1", "block2", "block3"]
  assert tuple(config.similarity.methods) == ("svcca", "pwcca")
  for method in config.similarity.methods:
    assert set(result[method]) == {"random_init_vs_trained", "transfer_init_vs_trained",
                                   "transfer_vs_random", "random_vs_random", "chance"}
    for values in result[method].values():
      assert len(values) == 4 and all(0.0 <= v <= 1.0 for v in values)
    # Values follow the layers, lowest first: the stem's output, with the most datapoints per
    # neuron, has the lowest chance level.
    assert result[method]["chance"][0] == min(result[method]["chance"])
  report = (workdir / "report.md").read_text()
  assert "| cbr_tiny | transfusion_k1 |" in report and "Do lower layers change less?" in report
  assert "above chance" in report
  for name in ("convergence", "cca_by_layer", "conv1_filters"):
    assert (workdir / f"transfusion_{name}.png").stat().st_size > 0
  saved = json.loads((workdir / "results.json").read_text())
  assert saved["study"] == "transfusion" and saved["steps"] == results["steps"]


def test_cli_resumes_a_finished_run_without_training(small_run):
  results, config, workdir = small_run
  before = (workdir / "results.json").read_text()
  log = workdir / "target" / "cbr_tiny" / "full" / "metrics.jsonl"
  log_before = log.read_text()
  runner.main(["--config", CONFIG, "--workdir", str(workdir)])
  assert (workdir / "results.json").read_text() == before
  assert log.read_text() == log_before


def test_cli_exits_2_on_a_target_npz_without_a_test_split(tmp_path, digits,
                                                          assert_cli_user_error):
  path = tmp_path / "target.npz"
  np.savez(path, train_images=digits.train.images[..., 0], train_labels=digits.train.labels)
  assert_cli_user_error(runner.main, ["--config", CONFIG, f"--config.dataset=npz:{path}",
                                      "--config.target_classes=None"],
                        "missing array 'test_images'")


def test_cli_exits_2_on_channels_a_first_conv_cannot_be_adapted_to(tmp_path, digits,
                                                                  assert_cli_user_error):
  def npz(name, channels):
    images = np.repeat(digits.train.images, channels, axis=-1)
    np.savez(tmp_path / name, train_images=images, train_labels=digits.train.labels,
             test_images=images[:200], test_labels=digits.train.labels[:200])
    return f"npz:{tmp_path / name}"

  assert_cli_user_error(runner.main, [
      "--config", CONFIG, f"--config.source.dataset={npz('rgb.npz', 3)}",
      f"--config.dataset={npz('two.npz', 2)}"], "from 3 to 2 input channels")


def test_a_previous_runs_pretrain_folder_is_a_checkpoint_dir(small_run):
  _, config, workdir = small_run
  config = config.copy_and_resolve_references()
  config.source.checkpoint_dir = str(workdir / "pretrain")
  settings = config.source
  source = runner.load_task(settings, settings.classes, "source.classes")
  (spec,) = transfusion_configs.check_config(config)
  given, step = runner.SourceModel(config, spec, source).restore_given()
  with checkpoint.Checkpointer(workdir / "pretrain" / spec.name / "pretrained") as kept:
    assert step == kept.latest_step()
    chex.assert_trees_all_equal(given, kept.restore(given))


def test_cli_exits_2_on_a_pretrained_checkpoint_of_another_architecture(
    small_run, tmp_path, assert_cli_user_error):
  _, _, workdir = small_run
  given = tmp_path / "pretrained"
  shutil.copytree(workdir / "pretrain" / "cbr_tiny" / "pretrained", given / "cbr_small")
  assert_cli_user_error(runner.main, [
      "--config", CONFIG, "--config.models=('cbr_small',)", "--config.model=cbr_small",
      f"--config.source.checkpoint_dir={given}"], "is not a cbr_small")


@pytest.mark.parametrize("large_similarity, verdict", [
    (0.9, "confirmed"), (0.5, "NOT confirmed"),
    # A unit with constant activations has no similarity; no verdict can be read from it.
    (float("nan"), "undefined (a unit's activations are constant on the probe)")])
def test_findings_judge_whether_larger_models_change_less(large_similarity, verdict):
  def model(num_params, similarity):
    curves = {"random_init_vs_trained": [similarity + 0.1, similarity - 0.1],
              "transfer_init_vs_trained": [0.5, 0.5], "chance": [0.2, 0.2]}
    return ({"num_params": num_params, "regimes": {"full": {"arms": {}}}},
            {"layers": ["stem", "block1"], "svcca": curves})

  # Listed largest first: the verdict must order the models by size, not by name or position.
  models = {"large": model(2_000_000, large_similarity), "small": model(50_000, 0.6)}
  results = {"models": {name: info for name, (info, _) in models.items()},
             "similarity": {name: curves for name, (_, curves) in models.items()},
             "convergence_fraction": 0.9, "eval_every_steps": 10}
  line = transfusion_report.findings(results).splitlines()[-1]
  assert line.startswith("- **Do larger models change less?**")
  assert line.index("small (50,000 params) 0.400") < line.index("large (2,000,000 params)")
  assert line.endswith(f": {verdict}.")
