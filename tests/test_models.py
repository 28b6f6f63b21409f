"""Tests for the model zoo: architecture arithmetic, options, naming, initializers, BN behaviour.

Shape and parameter checks trace with ``jax.eval_shape`` (no compile); the few numeric checks run
a narrow ConvNet-3 on sklearn's 8x8 digits.
"""

import functools
import math

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.datasets import load_digits

from jaxtickets.errors import UserError
from jaxtickets.models import BLOCK_OUTPUTS, block_outputs, get_model, list_models, model_options
from jaxtickets.models.init import fan_in, get_initializer, pytorch_bias_init
from jaxtickets.models.layers import group_count

from assertions import assert_one_line_user_error

ALL_MODELS = ("convnet3", "resnet18", "resnet20", "resnet56", "resnet50", "vgg16", "wrn34_10",
              "cbr_large_t", "cbr_large_w", "cbr_small", "cbr_tiny", "mobilenetv2")
CIFAR_SHAPE = (2, 32, 32, 3)


# ---------------------------------------------------------------- hand-computed parameter counts


def conv(kernel, c_in, c_out, *, bias=False, groups=1):
  return kernel * kernel * c_in // groups * c_out + (c_out if bias else 0)


def bn(channels):
  return 2 * channels


def dense(d_in, d_out):
  return d_in * d_out + d_out


def count_convnet(depth=3, width=128, channels=3, size=32, classes=10):
  total, c_in = 0, channels
  for _ in range(depth):
    total += conv(3, c_in, width, bias=True) + bn(width)  # GroupNorm: scale + bias
    c_in, size = width, size // 2
  return total + dense(width * size * size, classes)


def count_resnet(stages, width, bottleneck=False, classes=10, projection=True):
  total, c_in = conv(3, 3, width) + bn(width), width
  for stage, blocks in enumerate(stages):
    planes = width * 2**stage
    for index in range(blocks):
      stride = 2 if stage > 0 and index == 0 else 1
      if bottleneck:
        c_out = 4 * planes
        total += (conv(1, c_in, planes) + bn(planes) + conv(3, planes, planes) + bn(planes)
                  + conv(1, planes, c_out) + bn(c_out))
      else:
        c_out = planes
        total += conv(3, c_in, planes) + bn(planes) + conv(3, planes, planes) + bn(planes)
      if projection and (stride != 1 or c_in != c_out):
        total += conv(1, c_in, c_out) + bn(c_out)
      c_in = c_out
  return total + dense(c_in, classes)


def count_vgg16(classes=10):
  cfg = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
  total, c_in = 0, 3
  for c_out in cfg:
    total += conv(3, c_in, c_out) + bn(c_out)
    c_in = c_out
  return total + dense(512, classes)


def count_wrn(depth=34, widen=10, classes=10):
  blocks = (depth - 4) // 6
  total, c_in = conv(3, 3, 16), 16
  for stage in range(3):
    c_out = 16 * widen * 2**stage
    for _ in range(blocks):
      total += bn(c_in) + conv(3, c_in, c_out) + bn(c_out) + conv(3, c_out, c_out)
      if c_in != c_out:
        total += conv(1, c_in, c_out)  # bias-free 1x1 shortcut, no norm
      c_in = c_out
  return total + bn(c_in) + dense(c_in, classes)


def count_cbr(widths, kernel, classes=10):
  total, c_in = 0, 3
  for c_out in widths:
    total += conv(kernel, c_in, c_out) + bn(c_out)
    c_in = c_out
  return total + dense(c_in, classes)


def count_mobilenetv2(classes=10):
  stages = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
            (6, 160, 3, 2), (6, 320, 1, 1)]
  total, c_in = conv(3, 3, 32) + bn(32), 32
  for expansion, c_out, blocks, first_stride in stages:
    for index in range(blocks):
      stride = first_stride if index == 0 else 1
      hidden = expansion * c_in
      total += (conv(1, c_in, hidden) + bn(hidden) + conv(3, hidden, hidden, groups=hidden)
                + bn(hidden) + conv(1, hidden, c_out) + bn(c_out))
      if stride == 1 and c_in != c_out:
        total += conv(1, c_in, c_out) + bn(c_out)
      c_in = c_out
  return total + conv(1, 320, 1280) + bn(1280) + dense(1280, classes)


EXPECTED_COUNTS = {
    "convnet3": count_convnet(),
    "resnet18": count_resnet([2, 2, 2, 2], 64),
    "resnet20": count_resnet([3, 3, 3], 16),
    "resnet56": count_resnet([9, 9, 9], 16),
    "resnet50": count_resnet([3, 4, 6, 3], 64, bottleneck=True),
    "vgg16": count_vgg16(),
    "wrn34_10": count_wrn(),
    "cbr_large_t": count_cbr([32, 64, 128, 256, 512], 7),
    "cbr_large_w": count_cbr([64, 128, 256, 512], 7),
    "cbr_small": count_cbr([32, 64, 128, 256], 7),
    "cbr_tiny": count_cbr([64, 128, 256, 512], 5),
    "mobilenetv2": count_mobilenetv2(),
}


# ------------------------------------------------------------------------- traced model summaries


def n_params(tree) -> int:
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


@functools.cache
def trace(name: str, **options):
  """Traces init + apply without compiling.

  Returns (model, variable shapes, {collection: top-level keys in creation order},
  sown block names in forward order, logits ShapeDtypeStruct, sown output dtypes).
  """
  model = get_model(name, num_classes=10, **options)
  order = {}

  def init_and_apply(key, x):
    variables = model.init(key, x)
    # Inside the trace dicts still have flax's creation order (eval_shape's output is sorted).
    order.update({col: tuple(tree) for col, tree in variables.items()})
    logits, state = model.apply(variables, x, mutable=["intermediates"])
    outputs = state["intermediates"][BLOCK_OUTPUTS]
    order["sown"] = tuple(outputs)
    return variables, logits, outputs

  variables, logits, outputs = jax.eval_shape(
      init_and_apply, jax.random.key(0), jax.ShapeDtypeStruct(CIFAR_SHAPE, jnp.float32))
  return model, variables, order, logits, outputs


@pytest.mark.parametrize("name", ALL_MODELS)
def test_param_count_matches_architecture_arithmetic(name):
  _, variables, _, _, _ = trace(name)
  assert n_params(variables["params"]) == EXPECTED_COUNTS[name]


def test_known_reference_counts():
  # RST's cResNet18 with affine BN and a biased 10-way head (the brief's known number).
  assert n_params(trace("resnet18")[1]["params"]) == 11_173_962
  assert EXPECTED_COUNTS["resnet50"] == pytest.approx(23.5e6, rel=0.01)
  assert EXPECTED_COUNTS["wrn34_10"] == pytest.approx(46.2e6, rel=0.01)


def test_registry_lists_every_model():
  assert sorted(ALL_MODELS) == list_models()


def test_zero_pad_shortcut_has_no_projection_params():
  _, variables, _, logits, _ = trace("resnet20", shortcut="zero_pad")
  assert n_params(variables["params"]) == count_resnet([3, 3, 3], 16, projection=False)
  paths = [jax.tree_util.keystr(path) for path, _ in
           jax.tree_util.tree_flatten_with_path(variables["params"])[0]]
  assert not any("shortcut" in path for path in paths)
  assert logits.shape == (CIFAR_SHAPE[0], 10)


def test_options_change_architecture():
  assert n_params(trace("convnet3", depth=2, width=16)[1]["params"]) == count_convnet(2, 16)
  assert (n_params(trace("wrn34_10", widen_factor=2, depth=16)[1]["params"])
          == count_wrn(depth=16, widen=2))
  assert n_params(trace("resnet18", head_bias=False)[1]["params"]) == 11_173_962 - 10
  assert (n_params(trace("convnet3", use_bias=False)[1]["params"])
          == count_convnet() - 3 * 128)
  narrow = trace("mobilenetv2", width_multiplier=0.5)[1]["params"]
  assert narrow["stem"]["kernel"].shape == (3, 3, 3, 16)
  assert narrow["final_conv"]["kernel"].shape == (1, 1, 160, 1280)


# ------------------------------------------------------------------------------ naming convention


@pytest.mark.parametrize("name", ALL_MODELS)
def test_naming_convention(name):
  model, variables, order, logits, outputs = trace(name)
  params = variables["params"]
  names = model.block_names
  assert names[0] == "stem" and names[-1] == "head"
  assert len(set(names)) == len(names) and names.count("stem") == 1
  # Forward order: creation order of every collection and the sown outputs follow block_names.
  for col in ("params", "batch_stats"):
    assert [n for n in names if n in order.get(col, ())] == list(order.get(col, ()))
  assert set(names) == set(order["params"]) | set(order.get("batch_stats", ()))
  assert order["sown"] == names
  assert outputs["head"].dtype == jnp.float32 and logits.shape == (2, 10)
  # stem: the first conv (4-D kernel on the 3 input channels); head: the Dense classifier.
  assert params["stem"]["kernel"].ndim == 4 and params["stem"]["kernel"].shape[2] == 3
  assert params["head"]["kernel"].shape[-1] == 10 and params["head"]["kernel"].ndim == 2
  for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
    keys = [entry.key for entry in path]
    module, leaf_name = keys[-2], keys[-1]
    if keys[0] == "batch_stats" or leaf_name == "scale":
      assert "norm" in module, keys
    if "norm" in module:
      assert leaf_name in ("scale", "bias", "mean", "var"), keys
    else:
      assert leaf_name in ("kernel", "bias"), keys
    if module == "shortcut":
      assert leaf.shape[:2] == (1, 1), keys


# ---------------------------------------------------------------------------------- norm options


def norm_modules(tree):
  return {"/".join(entry.key for entry in path[:-1])
          for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]
          if "norm" in path[-2].key}


@pytest.mark.parametrize("name", ["resnet20", "wrn34_10", "mobilenetv2", "cbr_small"])
def test_norm_options_change_param_structure(name):
  affine = trace(name)[1]  # "batch" is the default
  noaffine = trace(name, norm="batch_noaffine")[1]
  group = trace(name, norm="group")[1]
  instance = trace(name, norm="instance")[1]
  none = trace(name, norm="none")[1]
  bn_channels = sum(leaf.shape[0] for leaf in jax.tree.leaves(affine["batch_stats"])) // 2
  # noaffine keeps the running statistics and drops exactly scale + bias of every norm.
  assert norm_modules(noaffine["params"]) == set()
  assert norm_modules(noaffine["batch_stats"]) == norm_modules(affine["batch_stats"])
  assert n_params(affine["params"]) - n_params(noaffine["params"]) == 2 * bn_channels
  for grouped in (group, instance):
    assert "batch_stats" not in grouped
    assert norm_modules(grouped["params"]) == norm_modules(affine["params"])
    assert n_params(grouped["params"]) == n_params(affine["params"])
  assert "batch_stats" not in none and norm_modules(none["params"]) == set()
  assert n_params(none["params"]) == n_params(affine["params"]) - 2 * bn_channels
  assert "norm" not in "".join(trace(name, norm="none")[0].block_names)


def test_group_count_divides_channels():
  assert [group_count(c) for c in (16, 24, 64, 144, 1280)] == [16, 24, 32, 24, 32]


def test_convnet_defaults_to_instance_norm_with_conv_bias():
  model, variables, _, _, _ = trace("convnet3")
  assert model.norm == "instance" and "batch_stats" not in variables
  assert variables["params"]["stem"]["bias"].shape == (128,)
  assert variables["params"]["head"]["kernel"].shape == (2048, 10)


# -------------------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("name", ALL_MODELS)
def test_bf16_compute_keeps_fp32_params_and_logits(name):
  _, variables, _, logits, outputs = trace(name, dtype="bfloat16")
  assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  assert logits.dtype == jnp.float32 and logits.shape == (2, 10)
  assert outputs["stem"].dtype == jnp.bfloat16  # the convs really compute in bf16


def test_dtype_accepts_jnp_types_and_strings():
  assert trace("cbr_tiny", dtype=jnp.bfloat16)[4]["stem"].dtype == jnp.bfloat16
  assert trace("cbr_tiny", dtype="float32")[4]["stem"].dtype == jnp.float32


# --------------------------------------------------------------- numerics on digits (few compiles)


@pytest.fixture(scope="module")
def digits():
  data = load_digits()
  images = (data.images / 16.0 - 0.3) / 0.45
  return (jnp.asarray(images[:256, :, :, None], jnp.float32),
          jnp.asarray(data.target[:256], jnp.int32))


@pytest.fixture(scope="module")
def bn_convnet(digits):
  # RST's weight init for the convs; the classifier keeps PyTorch's default.
  model = get_model("convnet3", num_classes=10, norm="batch", width=8,
                    kernel_init="signed_kaiming_constant")
  variables = jax.jit(model.init)(jax.random.key(1), digits[0][:2])
  return model, variables


def test_batchnorm_updates_running_stats_only_in_train_mode(bn_convnet, digits):
  model, variables = bn_convnet
  images = digits[0][:64]
  stats_before = variables["batch_stats"]

  @functools.partial(jax.jit, static_argnums=2)
  def run(variables, images, train):
    return model.apply(variables, images, train=train, mutable=["batch_stats", "intermediates"])

  _, train_state = run(variables, images, True)
  _, eval_state = run(variables, images, False)
  chex.assert_trees_all_equal(eval_state["batch_stats"], stats_before)
  # PyTorch momentum 0.1: running = 0.9 * running + 0.1 * batch statistic (flax: biased var).
  stem_out = train_state["intermediates"][BLOCK_OUTPUTS]["stem"]  # raw conv output
  updated = train_state["batch_stats"]["stem_norm"]
  np.testing.assert_allclose(updated["mean"], 0.1 * stem_out.mean(axis=(0, 1, 2)),
                             rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(updated["var"], 0.9 + 0.1 * stem_out.var(axis=(0, 1, 2)),
                             rtol=1e-4)
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), train_state["batch_stats"],
                         stats_before)
  assert all(jax.tree.leaves(changed))


def test_eval_mode_is_per_example_and_sows_every_block(bn_convnet, digits):
  model, variables = bn_convnet
  outputs_of = jax.jit(functools.partial(block_outputs, model))
  images = digits[0][:16]
  outputs, half = outputs_of(variables, images), outputs_of(variables, images[:8])
  assert set(outputs) == set(model.block_names)  # jit sorts keys; order: test_naming_convention
  assert outputs["block1"].shape == (16, 2, 2, 8)  # 8 -> 4 (stem pool) -> 2 (block1 pool)
  np.testing.assert_allclose(outputs["head"][:8], half["head"], rtol=1e-5, atol=1e-6)


def test_bf16_logits_track_fp32(bn_convnet, digits):
  model, variables = bn_convnet
  bf16_model = model.clone(dtype=jnp.bfloat16)
  images = digits[0][:32]
  fp32 = jax.jit(lambda v, x: model.apply(v, x))(variables, images)
  bf16 = jax.jit(lambda v, x: bf16_model.apply(v, x))(variables, images)
  assert bf16.dtype == jnp.float32
  scale = float(jnp.abs(fp32).max())
  np.testing.assert_allclose(bf16, fp32, atol=0.05 * scale)


def test_training_steps_fit_digits(bn_convnet, digits):
  model, variables = bn_convnet
  images, labels = digits

  def loss_fn(params, batch_stats):
    logits, state = model.apply({"params": params, "batch_stats": batch_stats}, images,
                                train=True, mutable=["batch_stats"])
    loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))
    return loss, state["batch_stats"]

  @jax.jit
  def step(params, batch_stats):
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats)
    return jax.tree.map(lambda p, g: p - 0.5 * g, params, grads), batch_stats, loss

  params, batch_stats = variables["params"], variables["batch_stats"]
  losses = []
  for _ in range(30):
    params, batch_stats, loss = step(params, batch_stats)
    losses.append(float(loss))
  assert losses[0] == pytest.approx(math.log(10), rel=0.1)
  assert losses[-1] < 0.4 * losses[0]


def test_kernel_init_option_reaches_the_params(bn_convnet):
  params = bn_convnet[1]["params"]
  convs = {"stem": (params["stem"], 3 * 3 * 1), "block1": (params["block1"]["conv"], 3 * 3 * 8)}
  for conv_params, conv_fan_in in convs.values():
    magnitude = math.sqrt(2 / conv_fan_in)
    np.testing.assert_allclose(np.unique(conv_params["kernel"]), [-magnitude, magnitude],
                               rtol=1e-6)
    assert float(jnp.abs(conv_params["bias"]).max()) <= 1 / math.sqrt(conv_fan_in)
  head = params["head"]
  head_fan_in = 8 * 1 * 1  # 8x8 digits -> 1x1x8 after three pools
  assert len(np.unique(head["kernel"])) == head["kernel"].size  # head_init stays "pytorch"
  for leaf in (head["kernel"], head["bias"]):
    assert float(jnp.abs(leaf).max()) <= 1 / math.sqrt(head_fan_in)


# -------------------------------------------------------------------------------- initializers

KERNEL_SHAPE = (3, 3, 64, 128)  # fan_in 576, fan_out 1152
FAN_IN, FAN_OUT = 576, 1152


def sample(name, shape=KERNEL_SHAPE, **kwargs):
  return np.asarray(get_initializer(name, **kwargs)(jax.random.key(3), shape, jnp.float32))


def test_fan_in_uses_flax_kernel_layout():
  assert fan_in(KERNEL_SHAPE) == FAN_IN
  assert fan_in((512, 10)) == 512
  assert fan_in((3, 3, 1, 144)) == 9  # depthwise: one input channel per group
  with pytest.raises(UserError):
    fan_in((5,))


@pytest.mark.parametrize("name,bound", [("pytorch", 1 / math.sqrt(FAN_IN)),
                                        ("kaiming_uniform", math.sqrt(6 / FAN_IN))])
def test_uniform_initializers(name, bound):
  values = sample(name)
  assert np.abs(values).max() <= bound and np.abs(values).max() > 0.99 * bound
  assert values.std() == pytest.approx(bound / math.sqrt(3), rel=0.02)
  assert abs(values.mean()) < 0.02 * bound


@pytest.mark.parametrize("name,std", [("kaiming_normal", math.sqrt(2 / FAN_IN)),
                                      ("kaiming_normal_fan_out", math.sqrt(2 / FAN_OUT)),
                                      ("xavier_normal", math.sqrt(2 / (FAN_IN + FAN_OUT)))])
def test_normal_initializers(name, std):
  values = sample(name)
  assert values.std() == pytest.approx(std, rel=0.02)
  # Untruncated like PyTorch: some draws lie beyond 3 std (expected ~0.27% of 73,728).
  assert 100 < np.sum(np.abs(values) > 3 * std) < 300


def test_stem_init_initializes_the_stem_only():
  model = get_model("convnet3", num_classes=10, width=64, kernel_init="kaiming_normal_fan_out",
                    stem_init="pytorch")
  params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  stem = np.asarray(params["stem"]["kernel"])  # 3x3x3 -> 64: PyTorch's U(+-1/sqrt(27))
  assert np.abs(stem).max() <= 1 / math.sqrt(27) and stem.std() == pytest.approx(
      1 / math.sqrt(27) / math.sqrt(3), rel=0.05)
  block = np.asarray(params["block1"]["conv"]["kernel"])  # 3x3x64 -> 64: fan-out 576
  assert block.std() == pytest.approx(math.sqrt(2 / 576), rel=0.03)
  assert np.abs(block).max() > 3 * math.sqrt(2 / 576)  # Normal, not uniform.
  assert_one_line_user_error(lambda: get_model("convnet3", num_classes=10, stem_init="he"),
                             "unknown stem_init 'he'")


def test_signed_kaiming_constant_has_two_values():
  values = sample("signed_kaiming_constant")
  magnitude = math.sqrt(2 / FAN_IN)
  np.testing.assert_allclose(np.unique(values), [-magnitude, magnitude], rtol=1e-6)
  assert np.mean(values > 0) == pytest.approx(0.5, abs=0.01)


def test_fan_scale_scales_the_fan():
  values = sample("signed_kaiming_constant", fan_scale=0.3)
  np.testing.assert_allclose(np.abs(values), math.sqrt(2 / (FAN_IN * 0.3)), rtol=1e-6)
  assert sample("kaiming_normal", fan_scale=0.5).std() == pytest.approx(
      math.sqrt(2 / (FAN_IN * 0.5)), rel=0.02)


def test_pytorch_bias_init_bound():
  values = np.asarray(pytorch_bias_init(FAN_IN)(jax.random.key(4), (100_000,)))
  bound = 1 / math.sqrt(FAN_IN)
  assert np.abs(values).max() <= bound and np.abs(values).max() > 0.99 * bound
  assert values.std() == pytest.approx(bound / math.sqrt(3), rel=0.02)


# -------------------------------------------------------------------------------------- errors


def test_bad_input_raises_one_line_user_error():
  assert_one_line_user_error(lambda: get_model("resnet99", num_classes=10), "resnet99",
                             "resnet18", "mobilenetv2")
  assert_one_line_user_error(lambda: get_model("resnet18", num_classes=10, depht=3), "depht",
                             "norm")
  assert_one_line_user_error(lambda: get_model("vgg16", num_classes=10, norm="layer"), "layer",
                             "batch_noaffine")
  assert_one_line_user_error(lambda: get_model("vgg16", num_classes=10, dtype="float16"),
                             "float16")
  assert_one_line_user_error(lambda: get_model("vgg16", num_classes=10, dtype=jnp.int8), "int8")
  assert_one_line_user_error(lambda: get_model("vgg16", num_classes=10, dtype=3), "3")
  assert_one_line_user_error(lambda: get_model("vgg16", num_classes=10, kernel_init="he"), "he")
  assert_one_line_user_error(lambda: get_model("vgg16", num_classes=10, head_init="ones"),
                             "head_init", "ones")
  assert_one_line_user_error(lambda: get_initializer("orthogonal"), "orthogonal", "pytorch")
  assert_one_line_user_error(lambda: trace("wrn34_10", depth=33), "33")
  assert_one_line_user_error(lambda: trace("resnet20", shortcut="identity"), "identity")


def test_model_options_lists_what_get_model_takes():
  assert {"norm", "dtype", "use_bias", "head_bias", "kernel_init", "head_init",
          "width"} <= set(model_options("resnet18"))
  assert "width_multiplier" in model_options("mobilenetv2")
  assert "num_classes" not in model_options("resnet18")
  assert isinstance(get_model("cbr_tiny", num_classes=3), flax.linen.Module)
