"""CCA, SVCCA and PWCCA against float64 NumPy/SciPy references and known exact cases."""

import jax
import numpy as np
import pytest
import scipy.linalg

from jaxtickets import similarity
from jaxtickets.data import load_dataset

METHODS = {"svcca": similarity.svcca, "pwcca": similarity.pwcca}


def _inverse_sqrt(cov: np.ndarray) -> np.ndarray:
  eigenvalues, eigenvectors = scipy.linalg.eigh(cov)
  return eigenvectors @ np.diag(eigenvalues ** -0.5) @ eigenvectors.T


def reference_cca(x: np.ndarray, y: np.ndarray):
  """Textbook CCA in float64: whiten each covariance, SVD the whitened cross-covariance."""
  x, y = x - x.mean(0), y - y.mean(0)
  whiten_x, whiten_y = _inverse_sqrt(x.T @ x), _inverse_sqrt(y.T @ y)
  left, rho, right_t = np.linalg.svd(whiten_x @ (x.T @ y) @ whiten_y, full_matrices=False)
  return rho, x @ whiten_x @ left, y @ whiten_y @ right_t.T


def reference_pwcca(x: np.ndarray, y: np.ndarray) -> float:
  """Morcos et al.'s weighting on the side with fewer neurons, each side with its own neurons."""
  rho, x_variables, y_variables = reference_cca(x, y)
  variables, neurons = (x_variables, x) if x.shape[1] <= y.shape[1] else (y_variables, y)
  weights = np.abs(variables.T @ (neurons - neurons.mean(0))).sum(1)
  return float(weights @ rho / weights.sum())


def reference_svcca(x: np.ndarray, y: np.ndarray, keep_variance: float) -> float:
  def reduce(rep):
    u, s, _ = np.linalg.svd(rep - rep.mean(0), full_matrices=False)
    kept = np.searchsorted(np.cumsum(s**2) / np.sum(s**2), keep_variance) + 1
    return u[:, :kept] * s[:kept]
  return float(np.mean(reference_cca(reduce(x), reduce(y))[0]))


def correlated_pair(seed: int, num_datapoints: int, x_neurons: int, y_neurons: int):
  """Two noisy linear views of a shared 6-dim latent: canonical correlations spread over (0, 1)."""
  rng = np.random.default_rng(seed)
  latent = rng.normal(size=(num_datapoints, 6))
  x = latent @ rng.normal(size=(6, x_neurons)) + rng.normal(size=(num_datapoints, x_neurons))
  y = latent @ rng.normal(size=(6, y_neurons)) + 2 * rng.normal(size=(num_datapoints, y_neurons))
  return x.astype(np.float32), y.astype(np.float32)


@pytest.fixture(scope="module")
def gaussian():
  rng = np.random.default_rng(0)
  return rng.normal(size=(5000, 20)).astype(np.float32), rng


@pytest.fixture(scope="module")
def digit_pixels():
  """Real, rank-deficient activations: digits as f32[N, 64] pixels, several always zero."""
  images = load_dataset("digits").train.images
  return images.reshape(len(images), -1).astype(np.float32) / 255


@pytest.mark.parametrize("method", METHODS)
def test_invertible_linear_transform_gives_one(gaussian, method):
  x, rng = gaussian
  transform = rng.normal(size=(20, 20))
  assert float(METHODS[method](x, x @ transform)) == pytest.approx(1.0, abs=1e-4)


def _scaled_rotation(rng: np.random.Generator, num_in: int, num_out: int) -> np.ndarray:
  """f64[num_in, num_out] with orthonormal rows times 3: keeps the variance spectrum's shape."""
  return 3 * np.linalg.qr(rng.normal(size=(num_out, num_in)))[0].T


@pytest.mark.parametrize("method", METHODS)
def test_rank_deficient_real_data_with_its_transform_gives_one(digit_pixels, method):
  # Constant pixels leave round-off directions that an unregularized CCA would correlate at random.
  assert np.linalg.matrix_rank(digit_pixels - digit_pixels.mean(0)) < digit_pixels.shape[1]
  rng = np.random.default_rng(1)
  # SVCCA keeps each side's top-variance directions, so only maps that preserve the spectrum's
  # shape leave it at one; PWCCA, like CCA, is invariant to any invertible map.
  transform = _scaled_rotation(rng, 64, 64) if method == "svcca" else rng.normal(size=(64, 64))
  score = float(METHODS[method](digit_pixels, digit_pixels @ transform))
  assert score == pytest.approx(1.0, abs=1e-4)


def test_svcca_keeping_all_variance_ignores_null_directions():
  # 8 neurons spanning 4 dimensions around a large mean (as ReLU activations can sit): centering
  # leaves the null space round-off singular values that keeping all variance must not count
  # as uncorrelated directions (before the fix this scored 0.51).
  rng = np.random.default_rng(0)
  latent = rng.normal(size=(500, 4)).astype(np.float32)
  x = (100 + latent @ rng.normal(size=(4, 8))).astype(np.float32)
  assert float(similarity.svcca(x, x, keep_variance=1.0)) == pytest.approx(1.0, abs=1e-4)


def test_independent_data_is_near_zero_and_methods_agree(gaussian):
  x, rng = gaussian
  y = rng.normal(size=x.shape).astype(np.float32)
  svcca, pwcca = float(similarity.svcca(x, y)), float(similarity.pwcca(x, y))
  assert 0 <= svcca < 0.1 and 0 <= pwcca < 0.1
  assert pwcca == pytest.approx(svcca, abs=0.02)
  # Same distribution, different draw: the ordering by similarity must be stark.
  assert float(similarity.svcca(x, x @ rng.normal(size=(20, 20)))) > 10 * svcca


@pytest.mark.parametrize("method", METHODS)
def test_different_neuron_counts_with_a_shared_subspace_give_one(gaussian, method):
  x, rng = gaussian
  x = x[:2000, :8]
  y = x @ rng.normal(size=(8, 12))  # 12 neurons spanning x's 8-dim space.
  assert float(METHODS[method](x, y)) == pytest.approx(1.0, abs=1e-4)
  assert float(METHODS[method](y, x)) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("x_neurons,y_neurons", [(8, 12), (12, 8)])
def test_canonical_correlations_match_whitening_reference(x_neurons, y_neurons):
  x, y = correlated_pair(3, 2000, x_neurons, y_neurons)
  result = similarity.cca(x, y)
  rho, _, _ = reference_cca(x.astype(np.float64), y.astype(np.float64))
  assert result.rho.shape == (8,)
  assert rho[0] > 0.8 and rho[-1] < 0.2  # The data exercises the whole range.
  np.testing.assert_allclose(result.rho, rho, atol=1e-4)
  # The variables are what the directions make of the centered data, unit variance, and pair
  # up with the stated correlations.
  # NumPy products: a jax.Array operand would make this a (possibly TF32) device matmul.
  x_variables, y_variables = np.asarray(result.x_variables), np.asarray(result.y_variables)
  x_directions = np.asarray(result.x_directions, np.float64)
  np.testing.assert_allclose((x - x.mean(0)) @ x_directions, x_variables, atol=1e-4)
  np.testing.assert_allclose(x_variables.std(0), 1.0, atol=1e-4)
  paired = np.corrcoef(x_variables.T, y_variables.T)[:8, 8:]
  np.testing.assert_allclose(paired, np.diag(rho), atol=1e-4)


@pytest.mark.parametrize("x_neurons,y_neurons", [(8, 12), (12, 8)])
def test_pwcca_matches_reference_for_either_neuron_order(x_neurons, y_neurons):
  # The (12, 8) order weighs y's canonical variables by y's own neurons, where google/svcca's
  # pwcca projects x's activations instead.
  x, y = correlated_pair(4, 2000, x_neurons, y_neurons)
  expected = reference_pwcca(x.astype(np.float64), y.astype(np.float64))
  assert float(similarity.pwcca(x, y)) == pytest.approx(expected, abs=1e-4)
  assert float(similarity.pwcca(y, x)) == pytest.approx(expected, abs=1e-4)
  # Weighting matters on this data: the plain mean differs.
  assert abs(expected - float(np.mean(reference_cca(x, y)[0]))) > 0.02


@pytest.mark.parametrize("keep_variance", [0.6, 0.9, 0.99])
def test_svcca_matches_truncated_reference(keep_variance):
  x, y = correlated_pair(5, 2000, 8, 12)
  expected = reference_svcca(x.astype(np.float64), y.astype(np.float64), keep_variance)
  assert float(similarity.svcca(x, y, keep_variance=keep_variance)) == pytest.approx(
      expected, abs=1e-4)


def test_svcca_drops_low_variance_noise_that_lowers_plain_cca(gaussian):
  x, rng = gaussian
  signal = x[:2000, :4]
  def with_quiet_noise(rep, num_noise):
    noise = 1e-3 * rng.normal(size=(len(rep), num_noise))
    return np.concatenate([rep, noise], 1).astype(np.float32)
  x_noisy = with_quiet_noise(signal, 4)
  y_noisy = with_quiet_noise(signal @ rng.normal(size=(4, 4)), 8)
  # 4 perfect correlations and 4 chance ones.
  assert float(np.mean(similarity.cca(x_noisy, y_noisy).rho)) < 0.6
  assert float(similarity.svcca(x_noisy, y_noisy)) == pytest.approx(1.0, abs=1e-4)


def test_svcca_and_pwcca_trace_under_jit():
  x, y = correlated_pair(6, 2000, 8, 12)
  np.testing.assert_allclose(jax.jit(similarity.svcca)(x, y), similarity.svcca(x, y), atol=1e-5)
  np.testing.assert_allclose(jax.jit(similarity.pwcca)(x, y), similarity.pwcca(x, y), atol=1e-5)


def test_flatten_conv_makes_positions_datapoints():
  acts = np.arange(2 * 5 * 7 * 3, dtype=np.float32).reshape(2, 5, 7, 3)
  flat = similarity.flatten_conv(acts)
  assert flat.shape == (70, 3)
  np.testing.assert_array_equal(flat[1 * 35 + 2 * 7 + 4], acts[1, 2, 4])


def test_flatten_conv_subsamples_to_the_datapoint_budget():
  acts = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
  # Stride 1 gives 128 points, stride 2 gives 2 * 4 * 4 = 32 <= 40.
  flat = similarity.flatten_conv(acts, max_datapoints=40)
  np.testing.assert_array_equal(flat, acts[:, ::2, ::2].reshape(-1, 3))
  assert similarity.flatten_conv(acts, max_datapoints=2).shape == (2, 3)


def test_layerwise_similarity_flattens_conv_layers_and_keeps_order(digit_pixels):
  rng = np.random.default_rng(2)
  images = digit_pixels[:125].reshape(125, 8, 8, 1)
  conv = np.maximum(images * rng.normal(size=(1, 1, 1, 8)) + rng.normal(size=8), 0)
  acts_a = {"conv": conv, "pooled": conv.mean((1, 2))}
  acts_b = {"pooled": rng.normal(size=(125, 8)), "conv": conv @ _scaled_rotation(rng, 8, 12)}
  for method in METHODS:
    # 125 images x 16 positions at spatial stride 2.
    scores = similarity.layerwise_similarity(acts_a, acts_b, method, max_datapoints=2000)
    assert list(scores) == ["conv", "pooled"]
    assert scores["conv"] == pytest.approx(1.0, abs=1e-4)
    # 125 datapoints for 8 neurons: chance correlations are sizeable, but far from one.
    assert scores["pooled"] < 0.5


@pytest.mark.parametrize("method", METHODS)
def test_a_constant_representation_has_no_similarity(gaussian, method):
  # A layer of dead ReLUs has no variance: no canonical correlation is defined, and a number
  # in [0, 1] would be read as a finding.
  x = gaussian[0][:500, :4]
  assert np.isnan(float(METHODS[method](np.zeros_like(x), x)))
  assert np.isnan(similarity.layerwise_similarity({"a": x}, {"a": np.zeros_like(x)},
                                                  method)["a"])


@pytest.mark.parametrize("call,match", [
    # With fewer datapoints than neurons, CCA would find correlations near 1 in any data.
    (lambda: similarity.svcca(np.ones((10, 4)), np.ones((10, 12))),
     r"y has shape \(10, 12\); expected f32\[datapoints, neurons\]"),
    (lambda: similarity.pwcca(np.ones((10, 4, 2)), np.ones((10, 4))), r"x has shape \(10, 4, 2\)"),
    (lambda: similarity.flatten_conv(np.ones((3, 4, 4, 2)), max_datapoints=2), "max_datapoints=2"),
    (lambda: similarity.layerwise_similarity({"a": np.ones((5, 2))}, {"a": np.ones((5, 2))}, "cka"),
     "unknown similarity method 'cka'; known: svcca, pwcca"),
    (lambda: similarity.layerwise_similarity({"a": np.ones((2, 2, 2, 9))}, {"a": np.ones((8, 2))}),
     r"acts_a\['a'\] has shape \(8, 9\)"),
])
def test_inputs_it_would_misread_raise_value_error(call, match):
  with pytest.raises(ValueError, match=match) as error:
    call()
  assert "\n" not in str(error.value)
