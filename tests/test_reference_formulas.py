"""One step of a rule against a NumPy implementation of its authors' formulas, in float64: node
perturbation (NP, INP, ANP) with decorrelation after Dalm et al. (SanderDalm/DANP_open_source),
and target propagation of an Elman RNN after Roulet and Harchaoui (vroulet/tpri, docs/rules/target_propagation.rst;
the displacement guard, which the reference lacks, off). The NumPy side is written from the
equations, not from altgrad's code."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from altgrad import losses, nn, rules

SIZES = (6, 16, 12, 3)
BATCH = 8
SIGMA = 1e-2
DECORRELATION_LR = 1e-1


def _cross_entropy(z, y):
  m = z.max(axis=1, keepdims=True)
  return (m[:, 0] + np.log(np.exp(z - m).sum(axis=1))) - z[np.arange(len(y)), y]


def _forward(weights, biases, decorrelations, x, noise):
  """Per layer: the decorrelated input ``x R``, the pre-activation ``x R W + b + noise``; tanh
  hidden layers, identity output. Returns the inputs, the pre-activations and the outputs."""
  inputs, preacts, a = [], [], x
  for i, (w, b, r, e) in enumerate(zip(weights, biases, decorrelations, noise, strict=True)):
    xs = a @ r
    z = xs @ w + b + e
    inputs.append(xs)
    preacts.append(z)
    a = z if i == len(weights) - 1 else np.tanh(z)
  return inputs, preacts, a


def _numpy_step(variant, weights, biases, decorrelations, x, y, noise):
  """The authors' update of every layer and the next decorrelation matrices."""
  zeros = [np.zeros_like(e) for e in noise]
  inputs, clean_z, out = _forward(weights, biases, decorrelations, x, zeros)
  clean = _cross_entropy(out, y)
  if variant == "np":
    delta = _cross_entropy(_forward(weights, biases, decorrelations, x, noise)[2], y) - clean
    errors = [delta[:, None] * e / SIGMA**2 for e in noise]
  elif variant == "inp":  # one pass per layer, noise in that layer only
    errors = []
    for i, e in enumerate(noise):
      only = [e if j == i else z for j, z in enumerate(zeros)]
      delta = _cross_entropy(_forward(weights, biases, decorrelations, x, only)[2], y) - clean
      errors.append(e.shape[1] * delta[:, None] * e / np.sum(e * e, axis=1, keepdims=True))
  else:  # anp: measured pre-activation changes, noise from below included
    _, noisy_z, noisy_out = _forward(weights, biases, decorrelations, x, noise)
    delta = _cross_entropy(noisy_out, y) - clean
    changes = [n - c for n, c in zip(noisy_z, clean_z, strict=True)]
    total = sum(c.shape[1] for c in changes)
    norm = sum(np.sum(c * c, axis=1) for c in changes)
    errors = [total * (delta / norm)[:, None] * c for c in changes]
  updates = [(xs.T @ e / len(x), e.mean(axis=0)) for xs, e in zip(inputs, errors, strict=True)]
  next_r = []
  for xs, r in zip(inputs, decorrelations, strict=True):
    moment = xs.T @ xs / len(x)
    next_r.append(r - DECORRELATION_LR * r @ (moment - np.diag(np.diag(moment))))
  return updates, next_r


@pytest.mark.parametrize("variant", ["np", "inp", "anp"])
def test_one_decorrelated_step_matches_the_authors_formulas(variant):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(BATCH, SIZES[0])) @ rng.normal(size=(SIZES[0], SIZES[0]))
  y = rng.integers(0, SIZES[-1], BATCH)
  noise = {(BATCH, n): SIGMA * rng.normal(size=(BATCH, n)) for n in SIZES[1:]}
  with jax.enable_x64(True):
    model = nn.MLP(SIZES, decorrelation_lr=DECORRELATION_LR, rngs=nnx.Rngs(0))
    model = jax.tree.map(lambda a: a.astype(jnp.float64), model)
    for layer in model.layers:  # decorrelation matrices away from the identity
      layer.decorrelation[...] = jnp.eye(layer.in_features) + 0.1 * rng.normal(size=(layer.in_features,) * 2)
    tx = rules.node_perturbation(
      model,
      losses.softmax_cross_entropy,
      variant=variant,
      sigma=SIGMA,
      free_params="frozen",
      noise_fn=lambda key, shape, dtype: jnp.asarray(noise[tuple(shape)], dtype),
    )
    params = nnx.state(model, nnx.Param)
    updates, state = tx.update(None, tx.init(params), params, batch=(jnp.asarray(x), jnp.asarray(y)))
    layers = model.layers
    want, want_r = _numpy_step(
      variant,
      [np.asarray(layer.kernel[...]) for layer in layers],
      [np.asarray(layer.bias[...]) for layer in layers],
      [np.asarray(layer.decorrelation[...]) for layer in layers],
      x,
      y,
      [noise[(BATCH, n)] for n in SIZES[1:]],
    )
    got_r = jax.tree.leaves(state.common.model_variables)
  for i, (kernel, bias) in enumerate(want):
    np.testing.assert_allclose(updates["layers"][i]["kernel"][...], kernel, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(updates["layers"][i]["bias"][...], bias, rtol=1e-10, atol=1e-12)
  for got, r in zip(got_r, want_r, strict=True):
    np.testing.assert_allclose(got, r, rtol=1e-10, atol=1e-12)


def _numpy_tp_step(kernel_x, kernel_h, bias, readout, readout_bias, x, y, reg, lr_target):
  """Linearized TP, through-time update: targets back in time by the regularized inverse's
  Jacobian, then BPTT of sum_t 0.5 ||h_t - v_t||^2 with the targets fixed; the readout gets its
  loss gradient (mean over the batch)."""
  batch, steps, _ = x.shape
  hidden = [np.zeros((batch, kernel_h.shape[0]))]
  for t in range(steps):
    hidden.append(np.tanh(hidden[-1] @ kernel_h + x[:, t] @ kernel_x + bias))
  logits = hidden[-1] @ readout + readout_bias
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  dlogits = (p - np.eye(readout.shape[1])[y]) / batch  # of the mean loss
  inverse = kernel_h.T @ np.linalg.inv(kernel_h @ kernel_h.T + reg * np.eye(len(kernel_h)))
  displacement = {steps: -lr_target * dlogits @ readout.T}
  for t in range(steps, 1, -1):
    clipped = np.clip(hidden[t], -1 + 1e-3, 1 - 1e-3)
    displacement[t - 1] = (displacement[t] / (1 - clipped**2)) @ inverse
  grads = [np.zeros_like(kernel_x), np.zeros_like(kernel_h), np.zeros_like(bias)]
  adjoint = np.zeros_like(hidden[0])
  for t in range(steps, 0, -1):  # BPTT of the surrogate: dL/dh_t = h_t - v_t = -d_t, plus later steps
    adjoint = adjoint - displacement[t]
    dz = adjoint * (1 - hidden[t] ** 2)
    grads[0] += x[:, t - 1].T @ dz
    grads[1] += hidden[t - 1].T @ dz
    grads[2] += dz.sum(0)
    adjoint = dz @ kernel_h.T
  return grads, (hidden[-1].T @ dlogits, dlogits.sum(0))


@pytest.mark.parametrize("reg", [0.5, 5.0])
def test_one_tp_step_of_an_rnn_matches_the_reference_update(reg):
  rng = np.random.default_rng(1)
  x, y = rng.normal(size=(5, 7, 3)), rng.integers(0, 4, 5)
  with jax.enable_x64(True):
    model = jax.tree.map(lambda a: a.astype(jnp.float64), nn.SimpleRNN(3, 6, 4, rngs=nnx.Rngs(0)))
    tx = rules.target_propagation(
      model, losses.softmax_cross_entropy, reg=reg, lr_target=0.1, max_displacement=None
    )
    params = nnx.state(model, nnx.Param)
    updates, _ = tx.update(None, tx.init(params), params, batch=(jnp.asarray(x), jnp.asarray(y)))
  cell, out = params["cell"], params["readout"]
  (gx, gh, gb), (gv, gc) = _numpy_tp_step(
    *(np.asarray(cell[k][...]) for k in ("input_kernel", "recurrent_kernel", "bias")),
    np.asarray(out["kernel"][...]),
    np.asarray(out["bias"][...]),
    x,
    y,
    reg,
    0.1,
  )
  for got, want in (
    (updates["cell"]["input_kernel"], gx),
    (updates["cell"]["recurrent_kernel"], gh),
    (updates["cell"]["bias"], gb),
    (updates["readout"]["kernel"], gv),
    (updates["readout"]["bias"], gc),
  ):
    np.testing.assert_allclose(got[...], want, rtol=1e-10, atol=1e-13)
