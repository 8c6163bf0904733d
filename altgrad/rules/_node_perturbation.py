"""Node perturbation (NP), iterative NP (INP) and activity-based NP (ANP), with decorrelation.

Dalm, van Gerven and Ahmad, "Effective Learning with Node Perturbation in Multi-Layer Neural
Networks", arXiv:2310.00965 (v4). The equations and defaults follow the authors' public code
(SanderDalm/DANP_open_source), as spec/np.md records; the bias analysis of ANP and the extension
to convolutional and recurrent sites are reconstructions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from altgrad.nn import PureModel
from altgrad.nn._base import check_number
from altgrad.rules._common import LossFn, check_loss_fn, check_precision

Array = jax.Array
NoiseFn = Callable[[Array, tuple[int, ...], Any], Array]

VARIANTS = ("np", "inp", "anp")


class NodePerturbationState(NamedTuple):
  key: Array  # the PRNG key of the next step's noise
  model_variables: Any  # the model's non-param variables (decorrelation, BatchNorm statistics, RNG counts)
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


FREE_PARAMS = ("perturb", "frozen")


def _check_batch_first(taps, batch_size: int) -> None:
  """Credit is per example: every site's output must keep the batch axis first."""
  for tap in taps:
    if tap.preact.shape[:1] != (batch_size,):
      site = "/".join(map(str, tap.path)) or "the top"
      raise ValueError(
        f"node_perturbation credits each example with its own loss difference, so every site's output "
        f"needs the batch axis first; site {site} outputs {tuple(tap.preact.shape)} for a batch of "
        f"{batch_size} (the model reshapes the batch, e.g. folds tokens into rows, before calling it)"
      )


def _noise(noise_fn: NoiseFn | None, sigma: float, key: Array, like: list[Array], batched: bool = False) -> tuple[Array, ...]:
  """Noise shaped like each array of ``like``: ``noise_fn`` called per array with a key of its
  own, or by default ``sigma`` times :func:`gaussian` in a single draw split among them (one
  hash computation however many sites: XLA compiles each one separately, and they made node
  perturbation's step compile 5x slower than backprop's). ``batched``: the arrays share their
  first (batch) axis, which the single draw keeps, so a batch sharded over devices draws its
  noise where it lives."""
  if noise_fn is not None:
    keys = jax.random.split(key, len(like))
    return tuple(noise_fn(k, a.shape, a.dtype) for k, a in zip(keys, like, strict=True))
  lead = like[0].shape[:1] if batched else ()
  widths = [math.prod(a.shape[len(lead) :]) for a in like]
  flat = sigma * gaussian(key, (*lead, sum(widths)), jnp.float32)
  pieces = jnp.split(flat, np.cumsum(widths)[:-1].tolist(), axis=-1)
  return tuple(p.reshape(a.shape).astype(a.dtype) for p, a in zip(pieces, like, strict=True))


def _rotate_left(word: Array, bits: int) -> Array:
  return (word << np.uint32(bits)) | (word >> np.uint32(32 - bits))


def threefry2x32(key: tuple[Array, Array], counters: tuple[Array, Array]) -> tuple[Array, Array]:
  """The Threefry-2x32 hash of 20 rounds (Salmon et al., SC 2011), JAX's default PRNG, word for
  word as ``jax.random`` computes it, written out as elementwise ops.

  On CPU, JAX lowers its hash primitive as a loop over the rounds: a draw at node-perturbation
  shapes compiled in 0.19-0.94 s with it and in 0.11 s written out, where the rounds fuse into
  one elementwise kernel.
  """
  k0, k1 = key
  schedule = (k0, k1, k0 ^ k1 ^ np.uint32(0x1BD11BDA))
  x0, x1 = counters[0] + k0, counters[1] + k1
  for block in range(5):
    for bits in ((13, 15, 26, 6), (17, 29, 16, 24))[block % 2]:
      x0 = x0 + x1
      x1 = _rotate_left(x1, bits) ^ x0
    x0 = x0 + schedule[(block + 1) % 3]
    x1 = x1 + schedule[(block + 2) % 3] + np.uint32(block + 1)
  return x0, x1


def gaussian(key: Array, shape: tuple[int, ...], dtype: Any) -> Array:
  """Standard normal noise, as ``jax.random.normal`` draws it but with half the hashing.

  ``jax.random.normal`` (partitionable threefry, JAX's default) hashes a counter per number and
  keeps one of the two words each hash yields; on CPU that costs about as much as one layer's
  matmul at node-perturbation shapes. Here each hash of a counter ``(i, 0)`` gives two numbers:
  its two words fill the two halves of the last axis. Counters are iotas of the array's own
  shape, so the noise of a batch sharded over devices is drawn where it lives. Keys of other
  implementations (``rbg``) use ``jax.random.normal``.
  """
  if str(jax.random.key_impl(key)) != "threefry2x32" or not shape or 0 in shape:
    return jax.random.normal(key, shape, dtype)
  *lead, width = shape
  half = (shape[-1] + 1) // 2
  strides = np.cumprod([1, half, *lead[::-1]])[:-1][::-1]
  counters = sum(
    jax.lax.broadcasted_iota(jnp.uint32, (*lead, half), axis) * jnp.uint32(stride)
    for axis, stride in enumerate(strides)
  )
  k0, k1 = jax.random.key_data(key)
  words = jnp.concatenate(threefry2x32((k0, k1), (counters, jnp.zeros_like(counters))), axis=-1)[..., :width]
  # 23 random mantissa bits -> [1, 2) -> (-1, 1) (never -1, where erf_inv is infinite)
  unit = jax.lax.bitcast_convert_type((words >> 9) | jnp.uint32(0x3F800000), jnp.float32)
  low = np.nextafter(np.float32(-1), np.float32(0))
  return (np.sqrt(2, dtype=np.float32) * jax.lax.erf_inv(jnp.maximum(low, 2 * unit - 3))).astype(dtype)


def node_perturbation(
  model: nnx.Module,
  loss_fn: LossFn,
  *,
  variant: str = "anp",
  sigma: float = 1e-3,
  samples: int = 1,
  measured: bool = False,
  noise_fn: NoiseFn | None = None,
  free_params: str = "perturb",
  batch_coupled: bool | None = None,
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
    ``N`` all nodes. Biased toward a descent direction that is not the gradient (spec/np.md 2.4).

  The update is ``e_l`` through the site's linear map at its clean input, averaged over the batch
  (for a dense layer ``X^T E / B``), as backprop's would be. With a decorrelating model
  (``decorrelation_lr`` on its layers) this is DNP / DINP / DANP: the pseudo-gradient is taken at
  the current ``R``, then ``R`` moves by its own rule.

  On any NNX model every call of a linear layer is a site (a layer called twice gets noise at
  both calls). Params outside every site module (norm scales, embeddings, free params) are
  handled by ``free_params``: ``"perturb"`` (default) adds weight noise of the same scale to them
  in the same noisy pass and credits them with the batch-mean loss difference,
  ``mean(dL) xi / sigma^2`` (weight perturbation; for ``"inp"`` in one more pass of its own, for
  measured noise not at all: see below); ``"frozen"`` leaves them unchanged (a zero update). A
  site param that is also used outside its site is credited through its site only. Dropout
  masks and all other model state are the same in the clean and noisy passes of a step; the
  clean pass alone advances BatchNorm statistics and RNG counts.

  When a layer mixes the examples of a batch (``nnx.BatchNorm`` in training mode), per-example
  credit is biased: an example's noise changes every example's loss. Then the batch-coupled form
  credits every example with the whole batch's loss difference ``sum_j dL_j``, which is unbiased
  (with more variance). It is chosen automatically (``batch_coupled=None``); pass ``True`` for a
  mixing layer altgrad does not recognise.

  Args:
    model: any Flax NNX model (it is cloned, never modified).
    loss_fn: ``loss_fn(outputs, targets) -> (batch,)``; the per-example values matter here.
    variant: ``"np"``, ``"inp"`` or ``"anp"``.
    sigma: noise scale (standard deviation of the default Gaussian noise).
    samples: independent noisy passes per step (K), vmapped and averaged; one clean pass.
    measured: the inaccessible-noise mode (ANP only): two noisy passes, credit from their
      differences in activity and loss, and the update at the first pass's (noisy) inputs; the
      rule never reads the noise, so params outside sites stay frozen.
    noise_fn: ``noise_fn(key, shape, dtype) -> noise`` replaces the Gaussian, e.g. a model of
      a noisy device. ``"np"`` divides by ``sigma^2``, so there it must have variance ``sigma^2``.
    free_params: ``"perturb"`` or ``"frozen"``, for params outside every site (above).
    batch_coupled: the batch-coupled credit (above); ``None`` detects it.
    key: seed or PRNG key of the noise; it lives in the rule's state.

  Guard: INP and ANP divide by the squared norm of an example's noise (or measured activity
  change); where it is exactly zero (a noise model that can emit zeros, a dead layer) that
  example's credit is 0, and the state's ``zero_norm_credits`` counts such credits in the last
  step (per sample, example and, for INP, site). With measured noise, the decorrelation matrices
  advance on the first sample's first noisy pass (the rule sees no clean inputs), while BatchNorm
  statistics and RNG counts come from a clean pass, as in the other modes.
  """
  pure = PureModel(model)
  check_loss_fn(loss_fn)
  check_precision(model, "node_perturbation", "divides loss differences of order sigma")
  if variant not in VARIANTS:
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
  if free_params not in FREE_PARAMS:
    raise ValueError(f"free_params must be one of {FREE_PARAMS}, got {free_params!r}")
  check_number(sigma, "sigma", positive=True)
  if not (isinstance(samples, int) and samples >= 1):
    raise ValueError(f"samples must be an int >= 1, got {samples!r}")
  if measured and variant != "anp":
    raise ValueError(
      "measured (inaccessible) noise needs variant='anp': NP and INP read the noise they inject"
    )
  coupled = pure.batch_coupled if batch_coupled is None else bool(batch_coupled)
  if noise_fn is not None and not callable(noise_fn):
    raise TypeError(
      f"noise_fn must be a function (key, shape, dtype) -> noise, got {type(noise_fn).__name__}"
    )

  def credit(loss_difference: Array) -> Array:
    """Each example's share of the loss difference: its own, or the batch's when coupled."""
    if not coupled:
      return loss_difference
    return jnp.broadcast_to(jnp.sum(loss_difference), loss_difference.shape)

  def init_fn(params):
    del params
    seed = jax.random.key(key) if isinstance(key, int) else key
    return NodePerturbationState(seed, pure.variables, jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None, *, batch=None, **extra_args):
    del updates, extra_args
    model = pure.with_variables(state.model_variables)
    x, targets = model.check_batch(params, batch, rule="node_perturbation")
    keys = jax.random.split(state.key, samples + 1)  # one split: each compiles to a hash
    next_key, keys = keys[0], keys[1:]

    def run(perturbations, weight_noise=None):
      noisy = params if weight_noise is None else optax.tree.add(params, weight_noise)
      forward = model.tapped(noisy, x, perturbations)
      return loss_fn(forward.outputs, targets), forward.taps

    clean = model.tapped(params, x)
    clean_loss, clean_taps = loss_fn(clean.outputs, targets), clean.taps
    _check_batch_first(clean_taps, x.shape[0])
    widths = [math.prod(t.preact.shape[1:]) for t in clean_taps]
    free = model.free_params(params, clean_taps)
    perturb_free = free_params == "perturb" and not measured and any(jax.tree.leaves(free))

    def draw(noise_key):
      return _noise(noise_fn, sigma, noise_key, [t.preact for t in clean_taps], batched=True)

    def draw_weights(noise_key):
      leaves, tree = jax.tree.flatten(params)
      is_free = jax.tree.leaves(free)
      noise = iter(_noise(noise_fn, sigma, noise_key, [a for a, f in zip(leaves, is_free, strict=True) if f]))
      return jax.tree.unflatten(tree, [next(noise) if f else jnp.zeros_like(a) for a, f in zip(leaves, is_free, strict=True)])

    def weight_update(loss, weight_noise):
      return jax.tree.map(lambda xi: jnp.mean(loss - clean_loss) * xi / sigma**2, weight_noise)

    def anp_errors(loss_a, taps_a, loss_b, taps_b):
      diffs = [a.preact - b.preact for a, b in zip(taps_a, taps_b, strict=True)]
      scale, zeros = _safe_ratio(sum(widths) * credit(loss_a - loss_b), sum(_per_example(d * d) for d in diffs))
      return tuple(_broadcast(scale, d) * d for d in diffs), zeros

    def one_sample(noise_key):
      node_key, weight_key = jax.random.split(noise_key) if perturb_free else (noise_key, None)
      noise = draw(node_key)
      weight_noise = draw_weights(weight_key) if perturb_free else None
      if variant == "inp":  # one pass per site (and one for the free params), vmapped over masks
        count = len(noise) + perturb_free
        masks = jnp.eye(count, dtype=noise[0].dtype)

        def masked(m):
          # only free params get the mask: site params stay unbatched under the vmap (batched
          # conv kernels made INP's step on a ResNet 4x slower)
          w = None if not perturb_free else jax.tree.map(lambda v, f: m[-1] * v if f else v, weight_noise, free)
          return run(tuple(mi * e for mi, e in zip(m[: len(noise)], noise, strict=True)), w)[0]

        losses = jax.vmap(masked)(masks)
        scales = [
          _safe_ratio(n * credit(losses[i] - clean_loss), _per_example(e * e))
          for i, (n, e) in enumerate(zip(widths, noise, strict=True))
        ]
        errors = tuple(_broadcast(scale, e) * e for (scale, _), e in zip(scales, noise, strict=True))
        zeros = sum(z for _, z in scales)
        return errors, weight_update(losses[-1], weight_noise) if perturb_free else None, zeros
      loss, taps = run(noise, weight_noise)
      if variant == "np":
        errors = tuple(_broadcast(credit(loss - clean_loss), e) * e / sigma**2 for e in noise)
        zeros = jnp.zeros((), jnp.int32)
      else:
        errors, zeros = anp_errors(loss, taps, clean_loss, clean_taps)
      return errors, weight_update(loss, weight_noise) if perturb_free else None, zeros

    def measured_sample(noise_key):
      first, second = jax.random.split(noise_key)
      loss_1, taps_1 = run(draw(first))
      return *anp_errors(loss_1, taps_1, *run(draw(second))), taps_1

    batch_size = x.shape[0]
    if measured:
      errors, zeros, taps = jax.vmap(measured_sample)(keys)
      # Each noisy pass has its own inputs: one update per sample, then the mean.
      per_sample = jax.vmap(
        lambda t, e: model.updates_from_errors(params, t, jax.tree.map(lambda v: v / batch_size, e))
      )
      updates = jax.tree.map(lambda u: jnp.mean(u, axis=0), per_sample(taps, errors))
      variables_taps = jax.tree.map(lambda v: v[0], taps)
    else:
      errors, weight_updates, zeros = jax.vmap(one_sample)(keys)
      errors = jax.tree.map(lambda e: jnp.mean(e, axis=0) / batch_size, errors)
      updates = model.updates_from_errors(params, clean_taps, errors)
      if perturb_free:
        updates = optax.tree.add(updates, jax.tree.map(lambda u: jnp.mean(u, axis=0), weight_updates))
      variables_taps = clean_taps
    variables = model.next_variables(params, clean.variables, variables_taps)
    return updates, NodePerturbationState(next_key, variables, jnp.sum(zeros))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
