"""Node perturbation (NP), iterative NP (INP) and activity-based NP (ANP), with decorrelation.

Dalm, van Gerven and Ahmad, "Effective Learning with Node Perturbation in Multi-Layer Neural
Networks", arXiv:2310.00965 (v4). The equations and defaults follow the authors' public code
(SanderDalm/DANP_open_source), as docs/rules/node_perturbation.rst records; the bias analysis of ANP and the extension
to convolutional and recurrent sites are reconstructions.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from altgrad import _mesh
from altgrad.nn import Forward
from altgrad.nn._base import at_step, check_number
from altgrad.rules._common import (
  ApplyFn,
  Common,
  FreeParams,
  LossFn,
  Rule,
  Step,
  UnpackFn,
  check_choice,
  check_precision,
  check_static_int,
  free_params_or_frozen,
)
from altgrad.rules._noise import NoiseFn, noise_like

Array = jax.Array

Variant = Literal["np", "inp", "anp"]
VARIANTS = get_args(Variant)


class NodePerturbationState(NamedTuple):
  """The state of :func:`node_perturbation`."""

  common: Common
  zero_norm_credits: Array  # int32: credits of the last step left at 0 because their noise had zero norm


def _per_example(values: Array) -> Array:
  """Sum over all but the batch axis: ``(B, ...) -> (B,)``."""
  return jnp.sum(values.reshape(values.shape[0], -1), axis=1)


def _broadcast(per_example: Array, like: Array) -> Array:
  return per_example.reshape(per_example.shape + (1,) * (like.ndim - 1))


def _safe_ratio(numerator: Array, denominator: Array) -> tuple[Array, Array]:
  """``numerator / denominator`` where the denominator is positive, 0 where it is 0 (no noise),
  and how many entries were left at 0."""
  positive = denominator > 0
  ratio = jnp.where(positive, numerator / jnp.where(positive, denominator, 1.0), 0.0)
  return ratio, jnp.sum(~positive).astype(jnp.int32)


def np_errors(noise: tuple[Array, ...], credit: Array, sigma: Array) -> tuple[Array, ...]:
  """NP: ``e_l = dL eps_l / sigma^2`` at every site, ``credit`` the per-example ``dL``."""
  return tuple(_broadcast(credit, e) * e / sigma**2 for e in noise)


def inp_errors(noise: tuple[Array, ...], credits: list[Array]) -> tuple[tuple[Array, ...], Array]:
  """INP: ``e_l = N_l dL_l eps_l / ||eps_l||^2``, ``dL_l`` the loss difference of the pass with
  noise at site ``l`` only and ``N_l`` its node count; also the count of zero-norm credits."""
  scales = [
    _safe_ratio(math.prod(e.shape[1:]) * c, _per_example(e * e)) for e, c in zip(noise, credits, strict=True)
  ]
  errors = tuple(_broadcast(scale, e) * e for (scale, _), e in zip(scales, noise, strict=True))
  return errors, sum(z for _, z in scales)


def anp_errors(changes: list[Array], credit: Array) -> tuple[tuple[Array, ...], Array]:
  """ANP: ``e_l = N dL da_l / sum_k ||da_k||^2`` from the measured activity changes ``da``
  (``N`` all nodes); also the count of zero-norm credits."""
  nodes = sum(math.prod(d.shape[1:]) for d in changes)
  scale, zeros = _safe_ratio(nodes * credit, sum(_per_example(d * d) for d in changes))
  return tuple(_broadcast(scale, d) * d for d in changes), zeros


def _check_batch_first(taps, rows: int) -> None:
  """Credit is per example: every site's output must keep the batch axis first."""
  for tap in taps:
    if tap.preact.shape[:1] != (rows,):
      site = "/".join(map(str, tap.path)) or "the top"
      raise ValueError(
        f"node_perturbation credits each example with its own loss difference, so every site's output "
        f"needs the batch axis first; site {site} outputs {tuple(tap.preact.shape)} for a batch of "
        f"{rows} (the model reshapes the batch, e.g. folds tokens into rows, before calling it)"
      )


@dataclasses.dataclass(frozen=True)
class _Passes:
  """One step's passes: the clean one done, noisy ones run on demand."""

  rule: Rule
  step: Step
  params: Any
  sigma: Array
  noise_fn: NoiseFn | None
  coupled: bool
  clean: Any  # the clean pass's Forward
  clean_loss: Array
  free: Any  # params-shaped bools: True outside every site

  def run(self, perturbations, weight_noise=None) -> tuple[Array, Any]:
    """Per-example losses and taps of a pass with ``perturbations`` at the sites (and
    ``weight_noise`` added to the params)."""
    params = self.params if weight_noise is None else optax.tree.add(self.params, weight_noise)
    forward = self.step.model.tapped(params, self.step.inputs, perturbations)
    return self.rule.losses(forward.outputs, self.step.targets, self.step.rows), forward.taps

  def credit(self, loss: Array) -> Array:
    """Each example's share of a pass's loss difference: its own, or the batch's when coupled."""
    difference = loss - self.clean_loss
    if not self.coupled:
      return difference
    return jnp.broadcast_to(_mesh.batch_sum(jnp.sum(difference)), difference.shape)

  def node_noise(self, key: Array) -> tuple[Array, ...]:
    return noise_like(self.noise_fn, self.sigma, key, [t.preact for t in self.clean.taps], batched=True)

  def weight_noise(self, key: Array) -> Any:
    """Noise on the free params (zeros elsewhere), the same on every device."""
    leaves, tree = jax.tree.flatten(self.params)
    is_free = jax.tree.leaves(self.free)
    noise = iter(noise_like(self.noise_fn, self.sigma, key, [a for a, f in zip(leaves, is_free, strict=True) if f]))
    return jax.tree.unflatten(tree, [next(noise) if f else jnp.zeros_like(a) for a, f in zip(leaves, is_free, strict=True)])

  def weight_update(self, loss: Array, weight_noise: Any) -> Any:
    """Weight perturbation's estimate for the free params: ``mean(dL) xi / sigma^2``."""
    mean_difference = self.rule.mean(loss - self.clean_loss)
    return jax.tree.map(lambda xi: mean_difference * xi / self.sigma**2, weight_noise)


def _sample(passes: _Passes, variant: Variant, perturb_free: bool, node_key: Array, weight_key: Array):
  """One noisy sample's per-site errors, free-param update (or None) and zero-norm count."""
  noise = passes.node_noise(node_key)
  weights = passes.weight_noise(weight_key) if perturb_free else None
  if variant == "inp":  # one pass per site (and one for the free params), vmapped over masks
    masks = jnp.eye(len(noise) + perturb_free, dtype=jnp.float32)

    def masked(m):
      # only free params get the mask: site params stay unbatched under the vmap (batched
      # conv kernels made INP's step on a ResNet several times slower)
      w = None if not perturb_free else jax.tree.map(lambda v, f: m[-1] * v if f else v, weights, passes.free)
      return passes.run(tuple(mi * e for mi, e in zip(m[: len(noise)], noise, strict=True)), w)[0]

    losses = jax.vmap(masked)(masks)
    errors, zeros = inp_errors(noise, [passes.credit(losses[i]) for i in range(len(noise))])
    return errors, passes.weight_update(losses[-1], weights) if perturb_free else None, zeros
  loss, taps = passes.run(noise)
  if variant == "np":
    errors, zeros = np_errors(noise, passes.credit(loss), passes.sigma), jnp.zeros((), jnp.int32)
  else:
    changes = [a.preact - b.preact for a, b in zip(taps, passes.clean.taps, strict=True)]
    errors, zeros = anp_errors(changes, passes.credit(loss))
  # the free params' noise in a pass of its own: in the nodes' pass its loss change would be
  # credited to every node (on a small ViT, NP's update 720x the gradient's norm, against 45x)
  return errors, passes.weight_update(passes.run(None, weights)[0], weights) if perturb_free else None, zeros


def _over_samples(fn, *args):
  """``jax.vmap(fn)(*args)`` over the samples' axis; one sample is a plain call with that axis
  added (vmap would trace every pass again at batched shapes: a third of NP's trace time)."""
  if jax.tree.leaves(args)[0].shape[0] != 1:
    return jax.vmap(fn)(*args)
  return jax.tree.map(lambda v: v[None], fn(*jax.tree.map(lambda v: v[0], args)))


def _measured_sample(passes: _Passes, key: Array):
  """ANP with inaccessible noise: credit from the differences of two noisy passes."""
  first, second = jax.random.split(key)
  loss_1, taps_1 = passes.run(passes.node_noise(first))
  loss_2, taps_2 = passes.run(passes.node_noise(second))
  difference = loss_1 - loss_2
  credit = jnp.broadcast_to(_mesh.batch_sum(jnp.sum(difference)), difference.shape) if passes.coupled else difference
  errors, zeros = anp_errors([a.preact - b.preact for a, b in zip(taps_1, taps_2, strict=True)], credit)
  return errors, zeros, taps_1


def _measured_update(passes: _Passes) -> tuple[Any, Array, Any]:
  """The update with inaccessible noise (:func:`_measured_sample` per sample), the zero-norm
  count and the taps of the first sample's first pass (what decorrelation advances on). Each
  noisy pass has its own inputs: one update per sample, then the mean."""
  step, params = passes.step, passes.params
  errors, zeros, taps = _over_samples(lambda k: _measured_sample(passes, k), step.keys)
  per_sample = _over_samples(
    lambda t, e: step.model.updates_from_errors(params, t, jax.tree.map(lambda v: v / step.batch_size, e)), taps, errors
  )
  updates = _mesh.gradient_sum(jax.tree.map(lambda u: jnp.mean(u, axis=0), per_sample))
  return updates, zeros, jax.tree.map(lambda v: v[0], taps)


def node_perturbation(
  model: nnx.Module,
  loss_fn: LossFn,
  *,
  variant: Variant = "anp",
  sigma: float | Array | optax.Schedule = 1e-3,
  samples: int = 1,
  measured: bool = False,
  noise_fn: NoiseFn | None = None,
  free_params: FreeParams | None = None,
  batch_coupled: bool | None = None,
  apply: ApplyFn | None = None,
  unpack: UnpackFn | None = None,
  key: int | Array = 0,
) -> optax.GradientTransformationExtraArgs:
  """Node perturbation: credit from the change in loss that noise at the pre-activations causes.

  Every site's pre-activation ``a_l`` gets noise ``eps_l`` (per example and node) in a noisy
  forward pass; with ``dL`` the per-example loss difference to the clean pass, the error is

  - ``"np"``: ``e_l = dL eps_l / sigma^2`` (all sites noisy in one pass; unbiased, high variance);
  - ``"inp"``: one noisy pass per site, noise in that site only,
    ``e_l = N_l dL_l eps_l / ||eps_l||^2`` with ``N_l`` the site's node count (unbiased);
  - ``"anp"``: one pass, all sites noisy, only *measured* activity changes
    ``da_l = a~_l - a_l`` (noise from below included): ``e_l = N dL da_l / sum_k ||da_k||^2``,
    ``N`` all nodes. Biased toward a descent direction that is not the gradient (docs/rules/node_perturbation.rst, Bias and variance).

  The update is ``e_l`` through the site's linear map at its clean input, averaged over the batch
  (for a dense layer ``X^T E / B``), as backprop's would be. With a decorrelating model
  (``decorrelation_lr`` on its layers) this is DNP / DINP / DANP: the pseudo-gradient is taken at
  the current ``R``, then ``R`` moves by its own rule.

  On any NNX model every call of a linear layer is a site (a layer called twice gets noise at
  both calls). Params outside every site module (norm scales, embeddings, a CLS token, free
  params) are handled by ``free_params``: ``"frozen"`` (the default, with a warning naming them
  unless passed) leaves them unchanged; ``"gradient"`` gives them the gradient of the loss from
  the clean pass's backward pass (the rest of the update stays node perturbation's);
  ``"perturb"`` adds weight noise of scale ``sigma`` to them in a noisy pass of their own and
  credits them with the batch-mean loss difference, ``mean(dL) xi / sigma^2`` (weight
  perturbation; not with measured noise). A site param that is also used outside its site is
  credited through its site only. Why frozen by default, measured on small versions of the JAX
  AI stack's ViT (free params: a CLS token and position embeddings with gradient norm 32 each,
  LayerNorms) and miniGPT (embeddings, LayerNorms), sigma 1e-3, batch 32: weight perturbation's
  estimate is ~16x (ViT) and ~41x (miniGPT) the gradient's norm at cosine 0.03-0.05 whatever
  the pass, and in the nodes' own pass (altgrad's default before) its loss change was credited
  to every node, making NP's update 721x the gradient's on the ViT against 45x frozen. At the
  tutorial's optimizer (SGD, Nesterov 0.8, lr 1e-3 decaying over 1404 steps) NP reached a loss of
  1.56 with weight perturbation, 0.67 frozen, 0.57 with the gradient (backprop 0.03); at 10x the
  learning rate weight perturbation diverged in 2 of 3 seeds (loss 3e7), frozen and gradient did
  not. Dropout masks and all other model state are the same in the clean and noisy passes of a
  step; the clean pass alone advances BatchNorm statistics and RNG counts.

  When a layer mixes the examples of a batch (``nnx.BatchNorm`` in training mode), per-example
  credit is biased: an example's noise changes every example's loss. Then the batch-coupled form
  credits every example with the whole batch's loss difference ``sum_j dL_j``, which is unbiased
  (with more variance). It is chosen automatically (``batch_coupled=None``); pass ``True`` for a
  mixing layer altgrad does not recognise.

  Args:
    model: any Flax NNX model (it is cloned, never modified).
    loss_fn: ``loss_fn(outputs, targets)``: one loss per example, ``(batch,)`` or ``(batch, ...)``
      (a per-token loss); an example is credited with the mean of its losses, so the objective
      is the mean over all of them. One number for the batch (a mean) is refused: the
      per-example values are what the credit is made of.
    variant: ``"np"``, ``"inp"`` or ``"anp"``.
    sigma: noise scale (standard deviation of the default Gaussian noise): a number, an array
      or an optax schedule of the step count.
    samples: independent noisy passes per step (K), vmapped and averaged; one clean pass
      (structural: with ``optax.inject_hyperparams``, name it in ``static_args``).
    measured: the inaccessible-noise mode (ANP only): two noisy passes, credit from their
      differences in activity and loss, and the update at the first pass's (noisy) inputs; the
      rule never reads the noise, so ``free_params="perturb"`` leaves params outside sites frozen.
    noise_fn: ``noise_fn(key, shape, dtype) -> noise`` replaces the Gaussian, e.g. a model of
      a noisy device. ``"np"`` divides by ``sigma^2``, so there it must have variance ``sigma^2``.
    free_params: ``"frozen"`` (default), ``"gradient"`` or ``"perturb"``, for params outside every
      site (above); it means the same for every rule that takes it.
    batch_coupled: the batch-coupled credit (above); ``None`` detects it.
    key: seed or PRNG key of the noise (and of call-time rngs); it lives in the rule's state,
      mixed at ``init`` with a hash of the params (so that ``jax.vmap(tx.init)`` over runs of
      different seeds draws different noise) and, inside ``shard_map``, with each device's
      index (each draws its own rows' noise; weight noise is the same on every device).
    apply, unpack: see :func:`altgrad.rules.backprop`.

  Precision: the passes compute in float32 whatever the layers' ``dtype`` (a ``bfloat16``
  pre-activation cannot hold noise of order ``sigma`` against activity of order 1: the loss
  differences would be rounding), so a mixed-precision model gets the float32 rule's update.

  Guard: INP and ANP divide by the squared norm of an example's noise (or measured activity
  change); where it is exactly zero (a noise model that can emit zeros, a dead layer) that
  example's credit is 0, and the state's ``zero_norm_credits`` counts such credits in the last
  step (per sample, example and, for INP, site). With measured noise, the decorrelation matrices
  advance on the first sample's first noisy pass (the rule sees no clean inputs), while BatchNorm
  statistics and RNG counts come from a clean pass, as in the other modes.
  """
  rule = Rule(
    "node_perturbation", model, loss_fn, apply=apply, unpack=unpack, key=key, float32=True, per_example=True
  )
  check_precision(model, "node_perturbation", "divides loss differences of order sigma")
  check_choice(variant, "variant", VARIANTS)
  free_params = free_params_or_frozen(free_params, model, "node_perturbation")
  check_number(sigma, "sigma", positive=True, schedule=True)
  samples = check_static_int(samples, "samples", minimum=1)
  if measured and variant != "anp":
    raise ValueError(
      "measured (inaccessible) noise needs variant='anp': NP and INP read the noise they inject"
    )
  coupled = rule.pure.batch_coupled if batch_coupled is None else bool(batch_coupled)
  if noise_fn is not None and not callable(noise_fn):
    raise TypeError(
      f"noise_fn must be a function (key, shape, dtype) -> noise, got {type(noise_fn).__name__}"
    )

  def init_fn(params):
    return NodePerturbationState(rule.common(params), jnp.zeros((), jnp.int32))

  def step_fn(state, params, inputs, targets):
    step = rule.begin(state.common, inputs, targets, noise_keys=samples)
    if free_params == "gradient":  # the clean pass's backward pass gives the free params' gradient
      back = step.model.errors(params, inputs, targets, lambda out, t: rule.losses(out, t, step.rows))
      clean, free_gradient = Forward(back.outputs, back.taps, back.variables), back.residual
    else:
      clean = step.model.tapped(params, inputs)
    _check_batch_first(clean.taps, step.rows)
    clean_loss = rule.losses(clean.outputs, targets, step.rows)
    free = step.model.free_params(params, clean.taps)
    passes = _Passes(rule, step, params, at_step(sigma, step.count), noise_fn, coupled, clean, clean_loss, free)
    if measured:
      updates, zeros, variables_taps = _measured_update(passes)
    else:
      perturb_free = free_params == "perturb" and any(jax.tree.leaves(free))
      errors, weight_updates, zeros = _over_samples(
        lambda k, w: _sample(passes, variant, perturb_free, k, w), step.keys, step.shared_keys
      )
      errors = jax.tree.map(lambda e: jnp.mean(e, axis=0) / step.batch_size, errors)
      updates = _mesh.gradient_sum(step.model.updates_from_errors(params, clean.taps, errors))
      if perturb_free:
        updates = optax.tree.add(updates, jax.tree.map(lambda u: jnp.mean(u, axis=0), weight_updates))
      variables_taps = clean.taps
    if free_params == "gradient":
      updates = optax.tree.add(updates, _mesh.gradient_sum(free_gradient))
    variables = step.model.next_variables(params, clean.variables, variables_taps)
    common = rule.finish(step, rule.mean(clean_loss), variables)
    return updates, NodePerturbationState(common, _mesh.batch_sum(jnp.sum(zeros)))

  return rule.transformation(init_fn, step_fn)
