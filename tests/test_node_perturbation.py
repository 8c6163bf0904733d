"""Oracles for node perturbation (NP, INP, ANP) and decorrelation."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import MODELS, cosine, flat, make_batch, tapped
from flax import nnx

from altgrad import losses, nn, rules

CE = losses.softmax_cross_entropy


def _problem(seed=0, batch=32, sizes=(10, 16, 16, 4)):
  """A small float64 MLP on correlated inputs (call inside jax.enable_x64)."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(batch, sizes[0])) @ rng.normal(size=(sizes[0], sizes[0])) / 3)
  y = jnp.asarray(rng.integers(0, sizes[-1], batch))
  model = jax.tree.map(lambda p: p.astype(jnp.float64), nn.MLP(sizes, rngs=nnx.Rngs(seed)))
  return model, nnx.state(model, nnx.Param), (x, y)


def _update(model, params, batch, **kw):
  tx = rules.node_perturbation(model, CE, **kw)
  return tx.update(None, tx.init(params), params, batch=batch)[0]


def _grad(model, params, batch):
  tx = rules.backprop(model, CE)
  return tx.update(None, tx.init(params), params, batch=batch)[0]


@pytest.mark.parametrize("variant, samples", [("np", 4000), ("inp", 1000)])
def test_np_and_inp_are_unbiased(variant, samples):
  with jax.enable_x64(True):
    model, params, batch = _problem()
    mean = _update(model, params, batch, variant=variant, sigma=1e-4, samples=samples)
    assert cosine(mean, _grad(model, params, batch)) > 0.99


def test_error_shrinks_as_one_over_sqrt_samples():
  with jax.enable_x64(True):
    model, params, batch = _problem()
    grad = flat(_grad(model, params, batch))

    def rms_error(samples):
      errors = [
        jnp.linalg.norm(flat(_update(model, params, batch, variant="inp", samples=samples, key=k)) - grad)
        for k in range(6)
      ]
      return float(jnp.sqrt(jnp.mean(jnp.square(jnp.array(errors)))))

    ratio = rms_error(32) / rms_error(512)  # 16x the samples: 4x smaller error
    assert 2.8 < ratio < 5.7


def _site_jacobians(model, x):
  """Per-example Jacobians M[l][k] = d z_l / d z_k of the clean pass, for k < l."""
  _, taps = tapped(model, x)
  zeros = [jnp.zeros_like(t.preact) for t in taps]
  jac = {}
  for k in range(len(taps)):

    def preacts(delta, k=k):
      perturbation = [delta if i == k else z for i, z in enumerate(zeros)]
      return [t.preact for t in tapped(model, x, perturbation)[1]]

    full = jax.jacfwd(preacts)(zeros[k])  # each (B, n_l, B, n_k); examples are independent
    for i in range(k + 1, len(taps)):
      jac[i, k] = jnp.einsum("bibj->bij", full[i])
  return jac


def test_anp_mean_follows_the_predicted_biased_descent_direction():
  with jax.enable_x64(True):
    model, params, batch = _problem()
    x, _ = batch
    pure = nn.PureModel(model)
    _, _, taps, errors, *_ = pure.errors(params, *batch, CE)
    jac = _site_jacobians(model, x)
    # docs/rules/node_perturbation.rst, Bias and variance: E[e_l] is proportional to (I + sum_{k<l} M_lk M_lk^T) g_l.
    predicted = []
    for i, g in enumerate(errors):
      p = g
      for k in range(i):
        p = p + jnp.einsum("bij,bkj,bk->bi", jac[i, k], jac[i, k], g)
      predicted.append(p)
    predicted = pure.updates_from_errors(params, taps, predicted)
    grad = _grad(model, params, batch)
    anp = _update(model, params, batch, variant="anp", sigma=1e-4, samples=2000)
    assert cosine(anp, predicted) > 0.95
    assert cosine(anp, predicted) > cosine(anp, grad) > 0.7  # biased, yet a clear descent direction
    assert 1.0 < float(jnp.linalg.norm(flat(anp)) / jnp.linalg.norm(flat(grad))) < 3.0


def test_one_site_network_anp_equals_inp_exactly():
  with jax.enable_x64(True):  # float32 rounds a~ - a, the measured change, away from eps
    model, params, batch = _problem(sizes=(10, 4))
    anp = _update(model, params, batch, variant="anp", key=3)
    inp = _update(model, params, batch, variant="inp", key=3)
    chex.assert_trees_all_close(anp, inp, rtol=1e-9)


def test_measured_noise_anp_aligns_without_reading_the_noise():
  with jax.enable_x64(True):
    model, params, batch = _problem()
    seen = []

    def device_noise(key, shape, dtype):  # centred Bernoulli: +-sigma, as a noisy device might give
      seen.append(shape)
      return 1e-4 * (2.0 * jax.random.bernoulli(key, 0.5, shape).astype(dtype) - 1.0)

    update = _update(model, params, batch, variant="anp", measured=True, noise_fn=device_noise, samples=2000)
    assert seen and cosine(update, _grad(model, params, batch)) > 0.8


@pytest.mark.parametrize("variant", ["np", "inp", "anp"])
def test_float32_stays_finite_and_aligned_across_sigma(variant):
  model = nn.MLP((10, 16, 16, 4), rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  x, y = make_batch("mlp", batch_size=32)
  x = jnp.concatenate([x, x[:, :4]], axis=1)
  y = y % 4
  grad = _grad(model, params, (x, y))
  cosines = []
  for sigma in (1e-1, 1e-3, 1e-5):
    update = _update(model, params, (x, y), variant=variant, sigma=sigma, samples=256)
    chex.assert_tree_all_finite(update)
    cosines.append(cosine(update, grad))
  assert min(cosines) > 0.5 and max(cosines) - min(cosines) < 0.2, cosines


def test_decorrelation_removes_input_correlations_and_stays_finite():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(64, 8)) @ rng.normal(size=(8, 8)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, 64))
  model = nn.MLP((8, 12, 3), decorrelation_lr=1e-2, rngs=nnx.Rngs(0))
  first = model.layers[0]

  def off_diagonal(r):
    xs = x @ r
    moment = xs.T @ xs / x.shape[0]
    return float(jnp.mean(jnp.abs(moment - jnp.diag(jnp.diag(moment)))))

  tx = optax.chain(rules.node_perturbation(model, CE, variant="anp"), optax.sgd(0.0))  # R alone
  params = nnx.state(model, nnx.Param)
  state = tx.init(params)
  step = jax.jit(lambda p, s: tx.update(None, s, p, batch=(x, y)))
  before = off_diagonal(first.decorrelation[...])
  for _ in range(300):
    _, state = step(params, state)
  r = state[0].common.model_variables["layers"][0]["decorrelation"][...]
  chex.assert_tree_all_finite(r)
  assert off_diagonal(r) < before / 100


def test_decorrelated_backprop_trains_r_through_the_same_update():
  model = nn.MLP((6, 8, 3), decorrelation_lr=1e-2, rngs=nnx.Rngs(0))
  x, y = make_batch("mlp")
  params = nnx.state(model, nnx.Param)
  tx = rules.backprop(model, CE)
  _, state = tx.update(None, tx.init(params), params, batch=(x, y))
  assert not np.allclose(state.common.model_variables["layers"][0]["decorrelation"][...], np.eye(6))
  # and the gradient is still jax.grad at the current R
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)
  want = jax.grad(lambda p: jnp.mean(CE(nnx.merge(graphdef, p, rest)(x), y)))(params)
  chex.assert_trees_all_close(_grad(model, params, (x, y)), want, rtol=1e-5, atol=1e-7)


def test_same_key_same_update_and_the_key_advances():
  model = MODELS["mlp"](0)
  params = nnx.state(model, nnx.Param)
  batch = make_batch("mlp")
  tx = rules.node_perturbation(model, CE, key=7)
  state = tx.init(params)
  a, next_state = tx.update(None, state, params, batch=batch)
  b, _ = tx.update(None, state, params, batch=batch)
  c, _ = tx.update(None, next_state, params, batch=batch)
  other_tx = rules.node_perturbation(model, CE, key=8)
  other, _ = other_tx.update(None, other_tx.init(params), params, batch=batch)
  chex.assert_trees_all_equal(a, b)
  assert not np.allclose(flat(a), flat(c)) and not np.allclose(flat(a), flat(other))


def test_zero_noise_gives_a_zero_update_not_nan_and_is_counted():
  model = MODELS["mlp"](0)  # three sites
  params = nnx.state(model, nnx.Param)
  batch = make_batch("mlp", batch_size=16)
  for variant, count in (("inp", 2 * 16 * 3), ("anp", 2 * 16)):  # samples x examples (x sites)
    tx = rules.node_perturbation(model, CE, variant=variant, samples=2, noise_fn=lambda k, s, d: jnp.zeros(s, d))
    update, state = tx.update(None, tx.init(params), params, batch=batch)
    chex.assert_trees_all_equal(update, jax.tree.map(jnp.zeros_like, update))
    assert int(state.zero_norm_credits) == count
    tx = rules.node_perturbation(model, CE, variant=variant)
    assert int(tx.update(None, tx.init(params), params, batch=batch)[1].zero_norm_credits) == 0


@pytest.mark.parametrize(
  "kwargs, message",
  [
    ({"sigma": 0.0}, "sigma must be"),
    ({"sigma": float("inf")}, "sigma must be"),
    ({"samples": 0}, "samples must be"),
    ({"variant": "danp"}, "variant must be one of"),
    ({"variant": "np", "measured": True}, "needs variant='anp'"),
    ({"noise_fn": 3}, "noise_fn must be a function"),
  ],
)
def test_bad_hyperparameters_are_clear_errors(kwargs, message):
  with pytest.raises((ValueError, TypeError), match=message):
    rules.node_perturbation(MODELS["mlp"](0), CE, **kwargs)


def test_decorrelation_lr_must_be_a_finite_nonnegative_number():
  with pytest.raises(ValueError, match="decorrelation_lr must be"):
    nn.Dense(3, 3, decorrelation_lr=-1.0, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("sample, rows", [(1.0, slice(None)), (0.25, slice(0, 20, 4)), (0.1, slice(0, 20, 10))])
def test_decorrelation_step_is_the_spec_update_on_its_sample_of_the_batch(sample, rows):
  layer = nn.Dense(5, 3, decorrelation_lr=0.1, decorrelation_sample=sample, rngs=nnx.Rngs(0))
  layer.decorrelation[...] = jnp.eye(5) + 0.1 * jax.random.normal(jax.random.key(0), (5, 5))
  x = jax.random.normal(jax.random.key(1), (20, 5))
  r = layer.decorrelation[...]
  xs = x[rows] @ r
  moment = xs.T @ xs / len(xs)
  expected = r - 0.1 * r @ (moment * (1 - jnp.eye(5)))
  chex.assert_trees_all_close(layer.decorrelation_step(x), expected, rtol=1e-5, atol=1e-6)


def _decorbp_rule(r, features, lr, kappa):
  """artcogsys/decorbp's update in row layout, float64: R - lr R ((1 - k) offdiag(M) + k diag(diag(M) - 1))."""
  y = features @ r
  moment = y.T @ y / len(y)
  return r - lr * r @ ((1 - kappa) * (moment - np.diag(np.diag(moment))) + kappa * np.diag(np.diag(moment) - 1))


@pytest.mark.parametrize("layer", ["dense", "conv"])
def test_decorrelation_kappa_is_decorbps_rule_over_several_steps(layer):
  """With ``decorrelation_kappa`` the update also pulls each unit's second moment toward 1: five
  steps against a float64 transcription, on a dense layer's input rows and on a convolution's
  patches (taken by ``lax.conv_general_dilated_patches``, channel-major as decorbp's)."""
  options = dict(decorrelation_lr=0.05, decorrelation_kappa=0.3, rngs=nnx.Rngs(0))
  site = nn.Dense(5, 3, **options) if layer == "dense" else nn.Conv(2, 3, 3, strides=2, **options)
  shape = (16, 5) if layer == "dense" else (4, 6, 6, 2)
  mixing = jnp.eye(shape[-1]) + 0.5 * jax.random.normal(jax.random.key(9), (shape[-1], shape[-1]))
  r = np.eye(site.decorrelation[...].shape[0])
  for step in range(5):
    x = 2.0 * jax.random.normal(jax.random.key(step), shape) @ mixing  # correlated, variance far from 1
    if layer == "dense":
      features = np.asarray(x, np.float64)
    else:
      patches = jax.lax.conv_general_dilated_patches(x, (3, 3), (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
      features = np.asarray(patches, np.float64).reshape(-1, patches.shape[-1])
    r = _decorbp_rule(r, features, 0.05, 0.3)
    site.decorrelation[...] = site.decorrelation_step(x)
  np.testing.assert_allclose(site.decorrelation[...], r, rtol=2e-5, atol=2e-6)
  assert np.max(np.abs(r - _decorbp_rule(r, features, 0.05, 0.0))) > 1e-3  # the variance term acts


def test_decorrelation_kappa_reaches_every_site_and_is_checked():
  model = nn.decorrelate(nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.Linear(4, 2, rngs=nnx.Rngs(1))), 0.1, kappa=0.01)
  assert [m.decorrelation_kappa for m in model.layers] == [0.01, 0.01]
  assert not hasattr(nn.fold_decorrelation(model).layers[0], "decorrelation_kappa")
  with pytest.raises(ValueError, match="decorrelation_kappa weighs the unit-variance term"):
    nn.Dense(3, 3, decorrelation_lr=0.1, decorrelation_kappa=1.5, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("sample", [0.0, 1.5, -0.1])
def test_decorrelation_sample_must_be_a_fraction(sample):
  with pytest.raises(ValueError, match="decorrelation_sample is a fraction"):
    nn.MLP((4, 3, 2), decorrelation_lr=0.1, decorrelation_sample=sample, rngs=nnx.Rngs(0))


def test_default_noise_is_standard_normal_with_independent_halves():
  from scipy import stats

  from altgrad.rules._noise import gaussian

  z = np.asarray(gaussian(jax.random.key(0), (400, 501), jnp.float32))
  halves = z[:, :250].ravel(), z[:, 251:501].ravel()  # the two words of the same hashes
  assert abs(z.mean()) < 0.01 and abs(z.var() - 1) < 0.01 and np.isfinite(z).all()
  assert stats.kstest(z.ravel(), "norm").pvalue > 1e-3
  assert abs(np.corrcoef(*halves)[0, 1]) < 0.01
  other = np.asarray(gaussian(jax.random.key(1), (400, 501), jnp.float32))
  assert abs(np.corrcoef(z.ravel(), other.ravel())[0, 1]) < 0.01
  samples = jax.vmap(lambda k: gaussian(k, (3, 4), jnp.float32))(jax.random.split(jax.random.key(0), 2))
  assert not np.allclose(samples[0], samples[1])
  assert gaussian(jax.random.key(0, impl="rbg"), (3,), jnp.bfloat16).dtype == jnp.bfloat16


@pytest.mark.parametrize("shape", [(7,), (5, 13), (4, 3, 10)])
def test_default_noise_loop_assembles_one_hash_per_pair_of_numbers(shape):
  """The loop's chunks give what one draw gives: the hash of counter ``i`` (row-major over the
  array's rows and half its last axis) fills entry ``i`` of the first half and of the second
  (to a float32 rounding: XLA may contract the inverse CDF's products differently in another
  kernel)."""
  from jax.extend.random import threefry2x32_p

  from altgrad.rules._noise import _standard_normal, gaussian

  *lead, width = shape
  half = (width + 1) // 2
  counters = jnp.arange(int(np.prod(lead)) * half, dtype=jnp.uint32).reshape(*lead, half)
  key = jax.random.key(3)
  words = threefry2x32_p.bind(*jax.random.key_data(key), counters, jnp.zeros_like(counters))
  expected = _standard_normal(jnp.concatenate(words, axis=-1)[..., :width])
  np.testing.assert_allclose(np.asarray(gaussian(key, shape, jnp.float32)), np.asarray(expected), rtol=1e-6)


def test_default_noise_is_computed_once_however_many_readers():
  """XLA fuses the inverse CDF into every reader of the noise unless it is stored (it was
  compiled and evaluated 8 to 69 times per step: results/noise_once.md): the compiled step
  holds it as often as a lone draw does, and the draw holds the hash's 20 rounds (an ``xor``
  each) once, not once per word."""
  from altgrad._bench._perf import inverse_cdf_copies
  from altgrad.rules._noise import gaussian

  model = nn.MLP((4, 8, 8, 8, 3), rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  tx = rules.node_perturbation(model, CE, samples=2)
  batch = (jnp.ones((5, 4)), jnp.zeros((5,), jnp.int32))
  step = jax.jit(lambda p, s, b: tx.update(None, s, p, batch=b)).lower(params, tx.init(params), batch).compile()
  lone = jax.jit(gaussian, static_argnums=(1, 2)).lower(jax.random.key(0), (10, 27), jnp.float32).compile()
  assert 1 <= inverse_cdf_copies(lone.as_text()) == inverse_cdf_copies(step.as_text())
  assert 20 <= lone.as_text().count(" xor(") < 40


def _count_primitives(jaxpr, names: set[str]) -> int:
  count = 0
  for eqn in jaxpr.eqns:
    count += eqn.primitive.name in names
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else [value]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          count += _count_primitives(inner, names)
  return count


def test_written_out_threefry_is_jax_threefry_bit_for_bit():
  from jax.extend.random import threefry2x32_p

  from altgrad.rules._noise import threefry2x32

  words = jax.random.bits(jax.random.key(7), (4, 257), jnp.uint32)
  words = words.at[:, 0].set(jnp.array([0, 1, 2**31, 2**32 - 1], jnp.uint32))
  for k0, k1 in ((0, 0), (12345, 2**32 - 1), (2**31, 7)):
    key = (jnp.uint32(k0), jnp.uint32(k1))
    mine = jax.jit(threefry2x32)(key, (words[0], words[1]))
    reference = threefry2x32_p.bind(*key, words[0], words[1])
    np.testing.assert_array_equal(np.asarray(mine), np.asarray(reference))


@pytest.mark.parametrize("depth", [2, 6])
def test_default_noise_is_one_hash_per_step_however_many_sites(depth, monkeypatch):
  """Every hash is compiled code of its own: one split of the key and one draw for all sites,
  whatever the depth."""
  from altgrad.rules import _noise

  draws = []
  hash_fn = _noise.threefry2x32
  monkeypatch.setattr(_noise, "threefry2x32", lambda *args: draws.append(1) or hash_fn(*args))
  model = nn.MLP((4, *[8] * depth, 3), rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  tx = rules.node_perturbation(model, CE, samples=2)
  batch = (jnp.ones((5, 4)), jnp.zeros((5,), jnp.int32))
  jaxpr = jax.make_jaxpr(lambda p, s: tx.update(None, s, p, batch=batch))(params, tx.init(params))
  hashes = {"threefry2x32", "random_split", "random_bits", "random_fold_in"}
  assert _count_primitives(jaxpr.jaxpr, hashes) == 1 and len(draws) == 1


def test_a_site_on_a_reshaped_batch_is_a_clear_error():
  class Tokens(nnx.Module):
    def __init__(self, rngs):
      self.embed = nnx.Linear(3, 4, rngs=rngs)
      self.head = nnx.Linear(4 * 5, 2, rngs=rngs)

    def __call__(self, x):  # (batch, 5, 3) -> one row per token -> back to examples
      h = jnp.tanh(self.embed(x.reshape(-1, 3)))
      return self.head(h.reshape(x.shape[0], -1))

  model = Tokens(nnx.Rngs(0))
  batch = (jnp.ones((6, 5, 3)), jnp.arange(6) % 2)
  with pytest.raises(ValueError, match=r"site embed outputs \(30, 4\) for a batch of 6"):
    _update(model, nnx.state(model, nnx.Param), batch, variant="anp")
