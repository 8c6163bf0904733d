"""What a site is as a map of its params: its linear map replayed from a recorded input, and
its kernel as a matrix over features (dense rows or a convolution's patches) for the rules that
solve per site (CW, ER, decorrelation)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from altgrad.nn._intercept import original_class, user_class
from altgrad.nn._sites import batch_first

Array = jax.Array

def linear_map(module: nnx.Module, inputs: Any, *, stacked: bool = False, steps: bool = False) -> Array:
  """The site's pre-activation from recorded ``inputs`` with the module's current params; for a
  ``stacked`` tap (batch first, then the stack) each layer of the stack on its own inputs; for a
  tap of ``steps`` (batch first, then time) every step with the same params, as one batch."""
  if stacked:
    per_layer = nnx.vmap(lambda m, x: linear_map(m, x), in_axes=(0, 0), out_axes=0)
    return batch_first(per_layer(module, batch_first(inputs, True)), True)
  if steps:
    leading = jax.tree.leaves(inputs)[0].shape[:2]
    merged = jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), inputs)
    out = linear_map(module, merged)
    return out.reshape(*leading, *out.shape[1:])
  if getattr(type(module), "_altgrad_tapped", False):
    return original_class(module).__call__(module, inputs)
  return module.linear(inputs)


def _conv_padding(padding: Any, dims: int) -> Any:
  if isinstance(padding, str):
    return padding if padding in ("SAME", "VALID") else None
  if isinstance(padding, int):
    return ((padding, padding),) * dims
  pads = tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)
  return pads if len(pads) == dims else None


def _as_tuple(value: Any, dims: int) -> tuple[int, ...]:
  value = 1 if value is None else value
  return (value,) * dims if isinstance(value, int) else tuple(value)


def design_rows(features: Array, bias: bool) -> Array:
  """``features`` as rows ``(n, d)``, with a column of ones appended when the site has a bias."""
  rows = features.reshape(-1, features.shape[-1])
  return jnp.concatenate([rows, jnp.ones((rows.shape[0], 1), rows.dtype)], axis=1) if bias else rows


def stacked_matrix(kernel: Array, bias: Array | None) -> Array:
  """``[kernel; bias]``: a site's parameters as the one matrix its design rows multiply."""
  return kernel if bias is None else jnp.concatenate([kernel, bias.reshape(1, -1)], axis=0)


class KernelLayout(NamedTuple):
  """A linear site as a matrix product: ``features(x) @ to_matrix(kernel) (+ bias)`` is its
  output as rows ``(n, out)``; ``from_matrix`` puts a ``(d, out)`` matrix back in the kernel's
  shape. ``fused``: the features are not the input itself (a convolution's patches), so a
  decorrelating matrix is applied to the kernel, not to the input."""

  features: Callable[[Any], Array]
  to_matrix: Callable[[Array], Array]
  from_matrix: Callable[[Array], Array]
  fused: bool


#: A dense layer: the input vectors are the features and the kernel is the matrix.
DENSE_LAYOUT = KernelLayout(lambda x: x.reshape(-1, x.shape[-1]), lambda k: k, lambda m: m, False)


def kernel_layout(module: nnx.Module) -> KernelLayout | None:
  """The :class:`KernelLayout` of an NNX linear layer, or ``None`` where it is not such a
  product (grouped or masked convs, batch axes, Einsum, ConvTranspose, subclasses such as LoRA).
  altgrad's own layers give theirs (``module.kernel_layout()``)."""
  own = getattr(module, "kernel_layout", None)
  if callable(own):
    return own()
  cls = user_class(module)
  if cls is nnx.Linear:
    return DENSE_LAYOUT
  if cls is nnx.LinearGeneral:
    axes = tuple(sorted(module.axis))
    width = math.prod(module.in_features)
    if module.batch_axis or axes != tuple(range(-len(axes), 0)):  # contracted axes must be the last
      return None
    shape = (*module.in_features, *module.out_features)
    return KernelLayout(
      lambda x: x.reshape(-1, width), lambda k: k.reshape(width, -1), lambda m: m.reshape(shape), False
    )
  if cls is nnx.Conv:
    return _conv_layout(module)
  return None


def _conv_layout(module: nnx.Conv) -> KernelLayout | None:
  dims = len(module.kernel_size)
  padding = _conv_padding(module.padding, dims)
  if padding is None or module.feature_group_count != 1 or module.mask is not None or dims > 3:
    return None
  if _as_tuple(module.input_dilation, dims) != (1,) * dims:
    return None
  return patch_layout(
    module.kernel[...],
    tuple(module.kernel_size),
    _as_tuple(module.strides, dims),
    padding,
    _as_tuple(module.kernel_dilation, dims),
  )


def patch_layout(
  kernel: Array, kernel_size: tuple[int, ...], strides: tuple[int, ...], padding: Any, dilation: tuple[int, ...]
) -> KernelLayout:
  """A channels-last convolution (kernel ``spatial..., in, out``) as a product of its input
  patches, features ordered ``(in, spatial...)``, with the kernel in that order."""
  dims = len(kernel_size)
  spatial = "DHW"[-dims:]
  numbers = (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")

  def patches(x):
    x = x.reshape(-1, *x.shape[-dims - 1 :])
    x = x.astype(jnp.result_type(x, kernel))
    rows = jax.lax.conv_general_dilated_patches(
      x, kernel_size, strides, padding, rhs_dilation=dilation, dimension_numbers=numbers
    )
    return rows.reshape(-1, rows.shape[-1])

  def to_matrix(k):
    k = jnp.moveaxis(k, -2, 0)  # spatial..., in, out -> in, spatial..., out
    return k.reshape(-1, k.shape[-1])

  def from_matrix(matrix):
    return jnp.moveaxis(matrix.reshape(kernel.shape[-2], *kernel_size, -1), 0, -2)

  return KernelLayout(patches, to_matrix, from_matrix, True)


def matrix_form(module: nnx.Module) -> tuple[Callable[[Any], Array], Callable[[], Array]] | None:
  """``(design, matrix)`` with ``linear_map(module, x).reshape(-1, out) == design(x) @ matrix()``,
  or ``None`` where the site is not such a product (see :func:`kernel_layout`). CW and ER solve
  per-site least squares on this form; a decorrelated site's design rows are decorrelated."""
  if not getattr(type(module), "_altgrad_tapped", False):
    design, matrix = getattr(module, "design", None), getattr(module, "matrix", None)
    return (design, matrix) if callable(design) and callable(matrix) else None
  layout = kernel_layout(module)
  if layout is None:
    return None
  bias = getattr(module, "bias", None)
  decorrelated = getattr(module, "decorrelated", None)

  def design(x):
    rows = layout.features(x)
    return design_rows(rows if decorrelated is None else decorrelated(rows), bias is not None)

  def matrix():
    return stacked_matrix(layout.to_matrix(module.kernel[...]), None if bias is None else bias[...])

  return design, matrix


class Part(NamedTuple):
  """One linear map of a site's params in matrix form, as CW emends it: a change ``dM`` of
  ``matrix()`` moves the part's output by ``design(x) @ dM``. A part with ``error=None`` adds
  to the site's output; one below another map (LoRA's down-projection ``x A`` under ``B``) gets
  ``error(d)`` (``d B^T``) from the site's error ``d``. ``params``: the paths, below the site's
  module, of the params it holds."""

  design: Callable[[Any], Array]
  matrix: Callable[[], Array]
  params: tuple[tuple[str, ...], ...]
  error: Callable[[Array], Array] | None = None


def linear_parts(module: nnx.Module) -> tuple[Part, ...] | None:
  """The site's params as :class:`Part` s: its :func:`matrix_form`, or for a LoRA layer
  (``nnx.LoRALinear``, ``nnx.LoRA``) the base layer's matrix form beside the low-rank path's two
  factors, ``x A`` then ``B``; ``None`` where the site is neither."""
  own = matrix_form(module)
  if own is not None:
    return (Part(*own, (("kernel",), ("bias",))),)
  cls = user_class(module)
  if cls is nnx.LoRALinear:
    return (_dense_part(module), *_lora_parts(module.lora, ("lora",)))
  if cls is nnx.LoRA:
    base = () if module.base_module is None else linear_parts(module.base_module)
    if base is None or any(part.error is not None for part in base):
      return None
    prefix = lambda part: part._replace(params=tuple(("base_module", *p) for p in part.params))  # noqa: E731
    return (*map(prefix, base), *_lora_parts(module, ()))
  return None


def _dense_part(module: nnx.Linear) -> Part:
  """An ``nnx.Linear`` subclass's own ``x W + b``."""
  bias = module.bias

  def matrix():
    return stacked_matrix(module.kernel[...], None if bias is None else bias[...])

  return Part(lambda x: design_rows(DENSE_LAYOUT.features(x), bias is not None), matrix, (("kernel",), ("bias",)))


def _lora_parts(lora: nnx.LoRA, prefix: tuple[str, ...]) -> tuple[Part, Part]:
  """LoRA's low-rank path ``x A B`` as two maps in a row: ``B`` on rows ``x A`` (adding to the
  site's output) and ``A`` on rows ``x``, whose error is the site's through ``B``, ``d B^T``."""
  rows = DENSE_LAYOUT.features
  down = lambda x: rows(x) @ lora.lora_a[...]  # noqa: E731
  up = Part(down, lambda: lora.lora_b[...], ((*prefix, "lora_b"),))
  return up, Part(rows, lambda: lora.lora_a[...], ((*prefix, "lora_a"),), lambda d: d @ lora.lora_b[...].T)
