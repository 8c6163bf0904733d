"""A scikit-learn style classifier for single-layer Expectation Reflection on tabular data.

Which reference it follows: the authors' 2019 least-squares code (Hoang et al., Phys. Rev. E 99,
023311; the refit is ridge least squares, matched to 1e-12 in float64). The published package
``expectation-reflection`` (0.0.7-0.0.10) refits by penalized least absolute deviation instead;
that refit is not implemented here, so iterates and accuracies can differ from the package's.
"""

from __future__ import annotations

import functools
from typing import Literal, get_args

import jax
import jax.numpy as jnp
import numpy as np

from altgrad import _linalg
from altgrad.rules._common import check_choice
from altgrad.rules._expectation_reflection import (
  EXPECTATIONS,
  MULTICLASS,
  Expectation,
  InputFactor,
  Multiclass,
  reflect,
  rises,
  spins,
)

Stopping = Literal["per_class", "joint"]
STOPPING = get_args(Stopping)


@functools.partial(
  jax.jit, static_argnames=("max_iter", "expectation", "multiclass", "keep_best", "per_class")
)
def _fit(x, s, kernel, reg, *, max_iter, expectation, multiclass, keep_best, per_class):
  """Reflect and refit until the training discrepancy stops falling (the reference's rule; a rise
  within rounding does not count, see :func:`rises`): of each output on its own (``per_class``,
  one-vs-rest), or of their mean (``joint``)."""
  count = jnp.asarray(x.shape[0], x.dtype)
  factor = InputFactor.of(count, jnp.sum(x, axis=0), _linalg.gram(x.T), reg)  # the inputs never change
  bias = jnp.zeros(kernel.shape[1], x.dtype)

  def costs(kernel, bias):
    """The discrepancy of each output (per_class), or their mean broadcast to every output."""
    field = x @ kernel + bias
    if per_class:  # one-vs-rest reflects each output on its own
      per_output = jax.vmap(
        lambda h, t: reflect(h[:, None], t[:, None], expectation=expectation)[1], in_axes=1, out_axes=1
      )(field, s)
      return reflect(field, s, expectation=expectation)[0], jnp.mean(per_output, axis=0)
    target, discrepancy = reflect(field, s, expectation=expectation, multiclass=multiclass)
    return target, jnp.full(kernel.shape[1], jnp.mean(discrepancy))

  def body(carry):
    k, kernel, bias, best, active = carry
    target, cost = costs(kernel, bias)
    improved = active & ((k == 0) | (cost < best[2]))  # per output
    going = active & ((k == 0) | ~rises(cost, best[2]))  # a rise within rounding does not stop
    best = jax.tree.map(lambda new, old: jnp.where(improved, new, old), (kernel, bias, cost), best)
    new = factor.solve(count, jnp.sum(target, 0), x.T @ target, center_outputs=multiclass == "softmax")
    kernel, bias = jax.tree.map(lambda n, o: jnp.where(going, n, o), new, (kernel, bias))
    return k + 1, kernel, bias, best, going  # an output that stopped stays stopped

  def cond(carry):
    return (carry[0] < max_iter) & jnp.any(carry[4])

  outputs = kernel.shape[1]
  init = (0, kernel, bias, (kernel, bias, jnp.full(outputs, jnp.inf, x.dtype)), jnp.ones(outputs, bool))
  iterations, kernel, bias, best, active = jax.lax.while_loop(cond, body, init)
  if not keep_best:
    return kernel, bias, iterations
  # Outputs still active when max_iter ended the loop hold a refit that was never scored.
  last_is_best = active & (costs(kernel, bias)[1] < best[2])
  best_kernel, best_bias = jax.tree.map(lambda n, o: jnp.where(last_is_best, n, o), (kernel, bias), best[:2])
  return best_kernel, best_bias, iterations


class ERClassifier:
  """Single-layer Expectation Reflection with the reference package's interface (fit, predict,
  predict_proba, score) and the authors' least-squares refit (see the module docstring).

  ``fit(X, y)`` reflects the fields and refits by ridge least squares (``reg`` added to the input
  covariance) until the training discrepancy ``mean((E[s] - s)^2 / 4)`` stops falling, or
  ``max_iter``; it keeps the best weights (``keep_best=False`` returns the last, as the reference).
  With one-vs-rest outputs each class stops on its own discrepancy, as the reference does
  (``stopping="per_class"``, the default; one output's refit does not depend on the others), or
  all at once on their mean (``stopping="joint"``, the only choice for ``"softmax"``). A rise
  within float rounding is not a rise (:func:`~altgrad.rules.rises`): near
  convergence the discrepancy falls by less than float32 resolves, and an exact comparison
  stopped float32 fits on rounding noise where float64 ones go on.
  Two classes use one output (labels' logit); more use one-vs-rest outputs normalized at
  prediction (``multiclass="ovr"``, the package's way) or a joint softmax (``"softmax"``).
  Inputs are used as given: standardize them first, as the reference's users do.

  Attributes after ``fit``: ``classes_``, ``coef_`` (features, outputs), ``intercept_``,
  ``n_iter_``.
  """

  def __init__(
    self,
    *,
    reg: float = 0.01,
    max_iter: int = 100,
    expectation: Expectation = "tanh_half",
    multiclass: Multiclass = "ovr",
    keep_best: bool = True,
    stopping: Stopping | None = None,
    random_state: int = 1,
  ):
    check_choice(expectation, "expectation", EXPECTATIONS)
    check_choice(multiclass, "multiclass", MULTICLASS)
    stopping = stopping or ("per_class" if multiclass == "ovr" else "joint")
    if stopping not in STOPPING or (stopping == "per_class" and multiclass == "softmax"):
      raise ValueError(
        f"stopping must be one of {STOPPING} ('joint' with multiclass='softmax'), got {stopping!r}"
      )
    if not (0 <= reg < float("inf")) or max_iter < 1:
      raise ValueError(f"need reg >= 0 (finite) and max_iter >= 1, got reg={reg!r}, max_iter={max_iter!r}")
    self.reg, self.max_iter, self.expectation = reg, max_iter, expectation
    self.multiclass, self.keep_best, self.random_state = multiclass, keep_best, random_state
    self.stopping = stopping

  def fit(self, X, y) -> ERClassifier:
    """Fits the classifier to inputs ``X`` (examples, features) and labels ``y``; returns it."""
    x = jnp.asarray(np.asarray(X, np.float32))
    if x.ndim != 2 or not bool(jnp.all(jnp.isfinite(x))):
      raise ValueError("X must be a finite 2-D array (examples, features)")
    self.classes_, labels = np.unique(np.asarray(y), return_inverse=True)
    if len(self.classes_) < 2 or len(labels) != x.shape[0]:
      raise ValueError("y needs one label per row of X and at least two classes")
    outputs = 1 if len(self.classes_) == 2 and self.multiclass == "ovr" else len(self.classes_)
    rng = np.random.default_rng(self.random_state)
    kernel = jnp.asarray(rng.normal(0.0, 1.0 / np.sqrt(x.shape[1]), (x.shape[1], outputs)), jnp.float32)
    kernel, bias, iterations = _fit(
      x,
      spins(jnp.asarray(labels), outputs),
      kernel,
      self.reg,
      max_iter=self.max_iter,
      expectation=self.expectation,
      multiclass=self.multiclass,
      keep_best=self.keep_best,
      per_class=self.stopping == "per_class",
    )
    self.coef_, self.intercept_, self.n_iter_ = np.asarray(kernel), np.asarray(bias), int(iterations)
    return self

  def decision_function(self, X) -> np.ndarray:
    """The local fields ``X coef_ + intercept_``, one column per class (per output unit)."""
    return np.asarray(X, np.float32) @ self.coef_ + self.intercept_

  def predict_proba(self, X) -> np.ndarray:
    """Class probabilities, ``(examples, classes)``, from the fitted fields."""
    field = self.decision_function(X)
    if self.multiclass == "softmax":
      return np.asarray(jax.nn.softmax(field, axis=-1))
    scale = 2.0 if self.expectation == "tanh" else 1.0  # tanh(h) = 2 sigmoid(2h) - 1
    p = 1.0 / (1.0 + np.exp(-scale * field))
    if p.shape[1] == 1:
      return np.concatenate([1.0 - p, p], axis=1)
    return p / p.sum(axis=1, keepdims=True)

  def predict(self, X) -> np.ndarray:
    """The most probable class of each example."""
    return self.classes_[np.argmax(self.predict_proba(X), axis=1)]

  def score(self, X, y) -> float:
    """Mean accuracy on ``(X, y)``."""
    return float(np.mean(self.predict(X) == np.asarray(y)))
