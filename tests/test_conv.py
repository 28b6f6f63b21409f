"""models.conv: both of the models' convolutions equal lax's to second order; XLA's keeps loop
bodies on XLA:CPU's Eigen path (compiled.noncanonical_convolutions), im2col keeps vmapped
kernels out of grouped convolutions."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtickets import compiled
from jaxtickets import train as train_lib
from jaxtickets.models import conv, get_model

from assertions import assert_fast_in_a_loop, assert_one_line_user_error, program_of

CANONICAL = ("NHWC", "HWIO", "NHWC")


def _functions(conv_fn, stride, padding):
  """The conv, a scalar loss of it, and the loss's kernel gradient's norm (second order)."""
  apply = functools.partial(conv_fn, window_strides=(stride, stride), padding=padding,
                            dimension_numbers=CANONICAL)

  def loss(x, kernel):
    return jnp.sum(jnp.sin(apply(x, kernel)))

  def kernel_gradient_norm(x, kernel):
    return jnp.sum(jax.grad(loss, argnums=1)(x, kernel) ** 2)

  return apply, loss, kernel_gradient_norm


@pytest.mark.parametrize("impl", conv.CONV_IMPLS)
@pytest.mark.parametrize("size,window,stride,padding", [
    (8, 3, 1, "SAME"), (9, 3, 2, ((1, 1), (1, 1))), (8, 1, 2, "VALID"),
    (8, 3, 2, ((1, 1), (1, 1))),  # ResNet's downsampling: the stride leaves a remainder
    (10, 5, 1, ((2, 2), (2, 2))), (7, 7, 2, ((3, 3), (3, 3))), (8, 3, 1, ((0, 2), (1, 0)))])
def test_conv_equals_lax_to_second_order(size, window, stride, padding, impl):
  x = jax.random.normal(jax.random.key(0), (2, size, size, 3))
  kernel = jax.random.normal(jax.random.key(1), (window, window, 3, 4))
  ours = _functions(conv.CONV_IMPLS[impl], stride, padding)
  lax_ = _functions(jax.lax.conv_general_dilated, stride, padding)
  np.testing.assert_allclose(ours[0](x, kernel), lax_[0](x, kernel), rtol=1e-5, atol=1e-5)
  for ours_grad, lax_grad in zip(jax.grad(ours[1], (0, 1))(x, kernel),
                                 jax.grad(lax_[1], (0, 1))(x, kernel)):
    np.testing.assert_allclose(ours_grad, lax_grad, rtol=1e-5, atol=1e-4)
  second, second_lax = jax.grad(ours[2])(x, kernel), jax.grad(lax_[2])(x, kernel)
  np.testing.assert_allclose(second, second_lax, rtol=1e-4,
                             atol=1e-5 * float(jnp.max(jnp.abs(second_lax))))


@pytest.mark.parametrize("shapes,options", [
    (((2, 9, 3), (3, 3, 4)), {"dimension_numbers": ("NWC", "WIO", "NWC")}),  # 1-D
    (((2, 8, 8, 6), (3, 3, 2, 6)), {"dimension_numbers": CANONICAL, "feature_group_count": 3}),
    (((2, 8, 8, 3), (3, 3, 3, 4)), {"dimension_numbers": CANONICAL, "rhs_dilation": (2, 2)}),
    (((2, 3, 8, 8), (4, 3, 3, 3)), {"dimension_numbers": None}),  # NCHW / OIHW
])
@pytest.mark.parametrize("impl", conv.CONV_IMPLS)
def test_other_convolutions_are_lax_itself(shapes, options, impl):
  x, kernel = (jax.random.normal(jax.random.key(i), shape) for i, shape in enumerate(shapes))
  spatial = len(shapes[0]) - 2

  def loss(conv_fn, x, kernel):
    return jnp.sum(jnp.sin(conv_fn(x, kernel, (1,) * spatial, "SAME", **options)))

  for ours, theirs in zip(jax.grad(functools.partial(loss, conv.CONV_IMPLS[impl]), (0, 1))(
      x, kernel), jax.grad(functools.partial(loss, jax.lax.conv_general_dilated), (0, 1))(
          x, kernel)):
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("impl", conv.CONV_IMPLS)
def test_conv_keeps_bfloat16(impl):
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3), jnp.bfloat16)
  kernel = jax.random.normal(jax.random.key(1), (3, 3, 3, 4), jnp.bfloat16)
  ours, loss, _ = _functions(conv.CONV_IMPLS[impl], 1, "SAME")
  assert ours(x, kernel).dtype == jnp.bfloat16
  dx, dkernel = jax.grad(loss, (0, 1))(x, kernel)
  assert dx.dtype == dkernel.dtype == jnp.bfloat16
  dx_lax, dkernel_lax = jax.grad(_functions(jax.lax.conv_general_dilated, 1, "SAME")[1],
                                 (0, 1))(x, kernel)
  np.testing.assert_allclose(np.float32(dx), np.float32(dx_lax), rtol=0.05, atol=0.05)
  np.testing.assert_allclose(np.float32(dkernel), np.float32(dkernel_lax), rtol=0.05, atol=0.2)


def _in_a_loop(fn, *args) -> list[str]:
  """``noncanonical_convolutions`` of ``fn`` run twice in a loop (``lax.map``)."""
  looped = lambda *a: jax.lax.map(lambda _: fn(*a), jnp.arange(2))
  return compiled.noncanonical_convolutions(program_of(looped, *args))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="an XLA:CPU property")
@pytest.mark.parametrize("stride", [1, 2])
def test_gradients_in_a_loop_stay_canonical_where_lax_gradients_do_not(stride):
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  kernel = jax.random.normal(jax.random.key(1), (3, 3, 3, 4))
  for conv_fn, expect_canonical in ((jax.lax.conv_general_dilated, False),
                                    (conv.conv_general_dilated, True)):
    loss = _functions(conv_fn, stride, "SAME")[1]
    noncanonical = _in_a_loop(jax.grad(loss, (0, 1)), x, kernel)
    assert (noncanonical == []) == expect_canonical, conv_fn


@pytest.mark.parametrize("name,options", [("convnet3", {"width": 8}), ("resnet20", {})])
def test_training_loop_runs_every_convolution_on_eigen(digits, name, options):
  model = get_model(name, num_classes=digits.num_classes, **options)
  apply_fn = train_lib.model_apply_fn(model, digits.mean, digits.std)
  optimizer = train_lib.sgd(0.01)
  params, batch_stats = train_lib.init_variables(jax.random.key(0), model, digits.image_shape)
  state = train_lib.create_train_state(jax.random.key(1), params, batch_stats, optimizer)
  step = train_lib.make_train_step(apply_fn, optimizer, batch_size=8)
  assert_fast_in_a_loop(step, state, train_lib.device_data(digits.train))


def _population_loss(model, x):
  """f32[] of a population's params f32[N, ...]: the sum of every member's loss on x."""

  def loss(params):
    return jnp.sum(jnp.sin(model.apply({"params": params}, x)))

  return lambda population: jnp.sum(jax.vmap(loss)(population))


def test_im2col_model_is_the_xla_model_and_keeps_a_population_out_of_grouped_convolutions():
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
  models = {impl: get_model("convnet3", num_classes=5, width=4, conv_impl=impl)
            for impl in ("xla", "im2col")}
  population = jax.vmap(lambda key: models["xla"].init(key, x)["params"])(jax.random.split(
      jax.random.key(1), 3))
  np.testing.assert_allclose(
      *(jax.vmap(lambda params, m=m: m.apply({"params": params}, x))(population)
        for m in models.values()), rtol=1e-5, atol=1e-5)
  programs = {impl: program_of(jax.grad(_population_loss(m, x)), population)
              for impl, m in models.items()}
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-5),
               *(program(population) for program in programs.values()))
  assert "feature_group_count=3" in programs["xla"].as_text()
  assert "convolution(" not in programs["im2col"].as_text()


def test_unknown_conv_impl_is_a_user_error():
  assert_one_line_user_error(
      lambda: get_model("convnet3", num_classes=10, conv_impl="winograd"),
      "unknown conv_impl 'winograd'", "im2col")
