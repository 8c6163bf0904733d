"""What every rule shares beyond the pure model view."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from altgrad.nn._pure import LossFn
from altgrad.nn._sites import is_site_module, original_class

__all__ = ["LossFn", "check_loss_fn", "check_precision", "not_a_chain"]


def check_loss_fn(loss_fn: object) -> None:
  if not callable(loss_fn):
    raise TypeError(
      "loss_fn must be a function (outputs, targets) -> per-example losses, such as "
      f"altgrad.losses.softmax_cross_entropy; got {type(loss_fn).__name__}"
    )


def check_precision(model: nnx.Module, rule: str, needs: str) -> None:
  """Refuses params below float32 for a rule that ``needs`` it (loss differences, linear solves).

  bfloat16 or float16 inputs are fine: they meet float32 params and compute in float32.
  """
  low = sorted(
    {
      str(a.dtype)
      for a in jax.tree.leaves(nnx.state(model, nnx.Param))
      if jnp.issubdtype(a.dtype, jnp.floating) and jnp.finfo(a.dtype).bits < 32
    }
  )
  if low:
    raise TypeError(
      f"{rule} {needs}, which {', '.join(low)} params cannot resolve: keep the params float32 "
      "(bfloat16 inputs are fine, they are computed in float32)"
    )


def not_a_chain(model: nnx.Module, rule: str, chains: str) -> TypeError:
  """The error for a rule that needs layer inverses, naming a layer of ``model`` that has none."""
  culprit = next(
    (
      f"{'/'.join(map(str, path))} ({original_class(m).__module__.split('.')[0]}.{original_class(m).__name__})"
      for path, m in nnx.iter_modules(model)
      if is_site_module(m) and not hasattr(m, "inverse")
    ),
    None,
  )
  detail = f"layer {culprit} has no regularized inverse" if culprit else "its structure is not such a chain"
  return TypeError(
    f"{rule} propagates targets through layer inverses, so it needs {chains}; in "
    f"{type(model).__name__}, {detail}. Use backprop, consequentialism or node_perturbation on this model"
  )
