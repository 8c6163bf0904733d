"""Backward hooks: how an error crosses a site in a tapped pass's backward pass
(``PureModel.errors(..., backward=...)``, ``altgrad.nn._sites.tapping``).

A hook is ``backward(module, inputs, cotangent) -> cotangent at inputs``. Backprop crosses a
site by the transpose of its own linear map; :func:`through` crosses it by the transpose of the
same map at other params (feedback alignment's ``B`` in place of ``W``, on any site kind: a
dense layer's ``g B^T``, a convolution's transposed convolution with ``B``'s kernel);
:func:`stopped` lets no error cross (direct feedback alignment, where errors are delivered to
each site from outside the chain instead).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from altgrad.nn._matrix_form import linear_map
from altgrad.nn._pure import by_path
from altgrad.nn._sites import Backward, SiteError, site_path

Array = jax.Array


def through(feedback: Any) -> Backward:
  """The hook that crosses each site by the transpose of its linear map at ``feedback``'s params:
  a tree shaped like (part of) the model's params, over site modules; a site whose params it does
  not hold crosses by its own (exactly, as backprop)."""
  held = by_path(feedback)

  def backward(module: nnx.Module, inputs: Array, cotangent: Array) -> Array:
    path = site_path(module)
    graphdef, state = nnx.split(module)
    swapped = []
    for where, variable in nnx.to_flat_state(state):
      value = held.get((*path, *where))
      if value is not None and tuple(value.shape) != tuple(variable.shape):
        raise SiteError(
          f"the feedback of {'/'.join(map(str, (*path, *where)))} is shaped {tuple(value.shape)}, the param "
          f"{tuple(variable.shape)} where the site runs (a layer of a stack made by nnx.scan or nnx.vmap takes "
          "no feedback: call the layers one after another)"
        )
      swapped.append((where, variable if value is None else variable.replace(value.astype(variable.dtype))))
    crossing = nnx.merge(graphdef, nnx.from_flat_state(swapped))
    _, pull_back = jax.vjp(lambda x: linear_map(crossing, x), inputs)
    return pull_back(cotangent.astype(jax.eval_shape(lambda x: linear_map(crossing, x), inputs).dtype))[0]

  return backward


def stopped(module: nnx.Module, inputs: Array, cotangent: Array) -> Array:
  """The hook that lets no error cross a site (its input gets zero)."""
  del module, cotangent
  return jax.tree.map(jnp.zeros_like, inputs)


def site_params(params: Any, sites: Any) -> nnx.State:
  """The part of ``params`` (an ``nnx.State`` of params) under the site modules at ``sites``."""
  return nnx.from_flat_state([(p, v) for p, v in nnx.to_flat_state(params) if any(p[: len(s)] == tuple(s) for s in sites)])
