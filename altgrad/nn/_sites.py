"""Sites on any Flax NNX model: where a rule reads and perturbs a network.

A *site* is one call of a linear layer: ``nnx.Linear``, ``nnx.LinearGeneral``, ``nnx.Conv``,
``nnx.ConvTranspose``, ``nnx.Einsum`` (and their subclasses, e.g. LoRA), or an ``altgrad.nn``
layer's linear part. Its input and its output (the pre-activation) are what every rule works
with. A layer called twice (shared weights) is two sites whose updates add up.

NNX has no method interception, so :func:`make_tappable` takes a *clone* of the user's model
and gives each linear layer of it a generated subclass of its own class (cached, so the graphdef
is stable and nothing retraces) whose ``__call__`` goes through :func:`site`. Outside a
:func:`tapping` pass that subclass behaves exactly as the original; inside one it adds the pass's
perturbation to the output and records a :class:`Tap`. Param paths are unchanged, so the user's
optimizer state, ``nnx.Optimizer`` and checkpoints still fit. This relies on NNX internals that
are stable in flax 0.12 (modules have no ``__slots__``; the graphdef stores the class and static
attributes); ``tests/test_any_model.py`` fails loudly if a Flax upgrade breaks them. Why not Flax's own
``nnx.capture``/``Module.perturb``, and the whole path of a step from batch to update:
altgrad/nn/README.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array
Path = tuple[Any, ...]

#: The layer classes whose calls are sites (subclasses included).
SITE_CLASSES: tuple[type[nnx.Module], ...] = (
  nnx.Linear,
  nnx.LinearGeneral,
  nnx.Conv,
  nnx.ConvTranspose,
  nnx.Einsum,
)
_PATH_ATTRIBUTE = "altgrad_site_path"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Tap:
  """What a forward pass recorded at one site.

  Attributes:
    inputs: what entered the site's linear map (an array; for a recurrent cell the pair
      ``(h_prev, x)`` stacked over time).
    preact: the site's output, the pre-activation, including any injected perturbation.
    path: the path of the site's module in the model (static): taps of one module share it.
    nested: (static) the site ran inside an NNX transform of the model's own code (``nnx.scan``,
      ``nnx.vmap``, ``nnx.remat``).
    stacked: (static) that transform ran over a stack of layers (``nnx.scan``, ``nnx.vmap``):
      ``inputs`` and ``preact`` have the stack's axis second, ``(batch, layers, ...)``, and the
      module's params have it first.
  """

  inputs: Any
  preact: Array
  path: Path = dataclasses.field(default=(), metadata={"static": True})
  nested: bool = dataclasses.field(default=False, metadata={"static": True})
  stacked: bool = dataclasses.field(default=False, metadata={"static": True})


class SiteError(ValueError):
  """A site that the rules cannot tap, or a model with none."""


class SiteWarning(UserWarning):
  """A linear layer that a rule cannot tap where it runs, and treats as params outside sites."""


@dataclasses.dataclass
class _Pass:
  perturbations: tuple[Any, ...] | None
  stop_site_params: bool
  trace_state: Any
  taps: list[Any] = dataclasses.field(default_factory=list)
  replaced: tuple[int, Array] | None = None
  stop_at: int | None = None


class Reached(Exception):  # noqa: N818  (control flow, not an error)
  """Raised inside a :func:`tapping` pass with ``stop_at`` when that site call is reached: it
  carries the call's input, and nothing after it runs."""

  def __init__(self, inputs: Any):
    super().__init__("the pass reached its stopping site")
    self.inputs = inputs


@dataclasses.dataclass(frozen=True)
class Nested:
  """The place of a tap that a site call inside an NNX transform left on its module (as an
  :class:`_Record` Variable, which the transform carries out); ``shape`` is its pre-activation's
  shape inside the transform."""

  path: Path
  shape: tuple[int, ...]


class _Record(nnx.Variable):
  """``(inputs, preact)`` of a site call inside an NNX transform of the model's own code."""


class _Delta(nnx.Variable):
  """The perturbation of a site call inside an NNX transform, set on its module before the pass."""


_ACTIVE = threading.local()


def _trace_state() -> Any:
  return jax.extend.core.get_opaque_trace_state(convention="nnx")


@contextlib.contextmanager
def tapping(
  perturbations: Sequence[Any] | None = None,
  *,
  stop_site_params: bool = False,
  replaced: tuple[int, Array] | None = None,
  stop_at: int | None = None,
) -> Iterator[list[Tap]]:
  """Within this context every site call adds ``perturbations[i]`` (``None``: nothing) to the
  output of the ``i``-th site call and appends a :class:`Tap` to the yielded list.

  With ``stop_site_params`` each site reads its own params through ``stop_gradient``: the
  gradient of the pass with respect to the params is then the *residual*, the part that comes
  from uses of params outside any site call (a tied embedding head, a norm scale, a free param).
  ``replaced=(i, z)`` makes ``z`` the output of the ``i``-th site call, whatever its input;
  with ``stop_at=j`` the ``j``-th site call raises :class:`Reached` with its input. Together they
  give what lies between two sites as a function of the first one's output (see
  ``PureModel.between``).
  """
  if getattr(_ACTIVE, "current", None) is not None:
    raise RuntimeError("a tapped pass is already running in this thread")
  current = _Pass(
    None if perturbations is None else tuple(perturbations),
    stop_site_params,
    _trace_state(),
    replaced=replaced,
    stop_at=stop_at,
  )
  _ACTIVE.current = current
  try:
    yield current.taps
  finally:
    _ACTIVE.current = None
  if current.perturbations is not None and len(current.perturbations) != len(current.taps):
    raise ValueError(
      f"expected {len(current.taps)} perturbations (one per site call), got {len(current.perturbations)}"
    )


def site_path(module: nnx.Module) -> Path:
  """The path of a site module in the model it was made tappable in."""
  return getattr(module, _PATH_ATTRIBUTE, ())


def site(module: nnx.Module, compute: Callable[[Array | None], tuple[Any, Array]]) -> Array:
  """One site call. ``compute(delta)`` returns ``(inputs, preact)`` with ``delta`` (or nothing,
  for ``None``) added to the pre-activation; the site's output is that pre-activation.

  Outside a :func:`tapping` pass this is ``compute(None)[1]``.
  """
  current = getattr(_ACTIVE, "current", None)
  if current is None:
    return compute(None)[1]
  nested = _trace_state() != current.trace_state
  if nested and not module._pytree__state.trace_state.is_valid():
    _warn_untapped(module)
    return compute(None)[1]
  index = len(current.taps)
  if nested:
    delta = module.altgrad_delta.get_value() if hasattr(module, "altgrad_delta") else None
  elif current.perturbations is not None and index < len(current.perturbations):
    delta = current.perturbations[index]
  else:
    delta = None
  with _params_stopped(module) if current.stop_site_params else contextlib.nullcontext():
    inputs, preact = compute(delta)
  if index == current.stop_at:
    raise Reached(inputs)
  if current.replaced is not None and current.replaced[0] == index:
    preact = current.replaced[1].astype(preact.dtype)
  if not nested:
    current.taps.append(Tap(inputs, preact, site_path(module)))
    return preact
  if hasattr(module, "altgrad_record"):
    _ACTIVE.current = None
    raise SiteError(
      f"site {type(module).__name__} at {'/'.join(map(str, site_path(module)))} is called twice inside "
      "one step of an NNX transform; altgrad taps one call per layer there"
    )
  module.altgrad_record = _Record((inputs, preact))
  current.taps.append(Nested(site_path(module), tuple(preact.shape)))
  return preact


def _warn_untapped(module: nnx.Module) -> None:
  """A layer inside a raw JAX transform of the model's own code is not a site (its taps could
  not leave the transform): its params are then params outside sites, which every rule still
  updates. Said once per place, as Python's warnings are."""
  warnings.warn(
    f"altgrad: {type(module).__name__} at {'/'.join(map(str, site_path(module))) or 'the top'} runs inside "
    "a JAX transform of the model's own code (jax.checkpoint, jax.lax.scan, jax.vmap), so it is not "
    "a site: its params are treated as params outside sites (their exact gradient in backprop and "
    "consequentialism, weight perturbation in node perturbation). The NNX transforms (nnx.remat, "
    "nnx.scan, nnx.vmap) keep it a site",
    SiteWarning,
    stacklevel=4,
  )


def _batch_first(value: Any, stacked: bool) -> Any:
  return jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1), value) if stacked else value


def prepare_nested(modules: dict[Path, nnx.Module], layout: Sequence[Any], perturbations: Sequence[Any]) -> None:
  """Sets the perturbations of the site calls that run inside NNX transforms on their modules,
  stack axis first, before the pass (``layout``: the taps of an earlier pass of the same shapes)."""
  for tap, delta in zip(layout, perturbations, strict=True):
    if tap.nested and delta is not None:
      modules[tap.path].altgrad_delta = _Delta(_batch_first(delta, tap.stacked))


def collect_nested(modules: dict[Path, nnx.Module], taps: Sequence[Any]) -> tuple[Tap, ...]:
  """The taps of a pass, with those left on modules inside NNX transforms collected (batch axis
  first), and the modules cleared of what the pass set on them."""
  collected = []
  for tap in taps:
    if isinstance(tap, Nested):
      module = modules[tap.path]
      inputs, preact = module.altgrad_record.get_value()
      stacked = preact.ndim == len(tap.shape) + 1
      tap = Tap(_batch_first(inputs, stacked), _batch_first(preact, stacked), tap.path, True, stacked)
    collected.append(tap)
  for module in modules.values():
    for name in ("altgrad_record", "altgrad_delta"):
      if hasattr(module, name):
        delattr(module, name)
  return tuple(collected)


@contextlib.contextmanager
def _params_stopped(module: nnx.Module) -> Iterator[None]:
  params = [v for _, v in nnx.iter_graph(module) if isinstance(v, nnx.Param)]
  saved = [v[...] for v in params]
  for v, value in zip(params, saved, strict=True):
    v[...] = jax.lax.stop_gradient(value)
  try:
    yield
  finally:
    for v, value in zip(params, saved, strict=True):
      v[...] = value


# --- Interception of the user's linear layers ------------------------------------------------

_TAPPED_CLASSES: dict[type, type] = {}


def original_class(module: nnx.Module) -> type:
  """The user's class of a module made tappable (the class itself otherwise)."""
  cls = type(module)
  return cls.__mro__[1] if getattr(cls, "_altgrad_tapped", False) else cls


def _tapped_class(cls: type) -> type:
  """A cached subclass of ``cls`` whose calls are sites; identical outside a tapped pass."""
  if cls not in _TAPPED_CLASSES:

    def __call__(self, inputs, *args, **kwargs):
      if args or any(v is not None for v in kwargs.values()):  # out_sharding=None is the default
        raise SiteError(
          f"{cls.__name__} at {'/'.join(map(str, site_path(self)))} is called with arguments beyond "
          "its input; altgrad replays a site from its input alone: call it as layer(x)"
        )
      call = super(tapped, self).__call__
      return site(self, lambda delta: (inputs, call(inputs) if delta is None else call(inputs) + delta))

    tapped = type(
      cls.__name__, (cls,), {"__call__": __call__, "_altgrad_tapped": True, "__module__": cls.__module__}
    )
    tapped.__qualname__ = cls.__qualname__
    _TAPPED_CLASSES[cls] = tapped
  return _TAPPED_CLASSES[cls]


def is_site_module(module: nnx.Module) -> bool:
  """Whether calls of ``module`` are sites: an NNX linear layer or an altgrad site layer."""
  return isinstance(module, SITE_CLASSES) or getattr(type(module), "is_altgrad_site", False)


def make_tappable(model: nnx.Module) -> nnx.Module:
  """A clone of ``model`` whose site calls :func:`tapping` can record; ``model`` is untouched."""
  if not isinstance(model, nnx.Module):
    raise TypeError(f"altgrad rules take a Flax NNX model (an nnx.Module), got {type(model).__name__}")
  clone = nnx.clone(model)
  found = False
  for path, module in nnx.iter_modules(clone):
    if not is_site_module(module):
      continue
    found = True
    setattr(module, _PATH_ATTRIBUTE, tuple(path))
    if isinstance(module, SITE_CLASSES) and not getattr(type(module), "_altgrad_tapped", False):
      module.__class__ = _tapped_class(type(module))
  if not found:
    raise SiteError(
      f"{type(model).__name__} has no linear layer (nnx.Linear, nnx.LinearGeneral, nnx.Conv, "
      "nnx.ConvTranspose, nnx.Einsum or an altgrad.nn layer): the rules assign credit at linear layers"
    )
  return clone


# --- What a site is as a map of its params ---------------------------------------------------


def linear_map(module: nnx.Module, inputs: Any, *, stacked: bool = False) -> Array:
  """The site's pre-activation from recorded ``inputs`` with the module's current params; for a
  ``stacked`` tap (batch first, then the stack) each layer of the stack on its own inputs."""
  if stacked:
    per_layer = nnx.vmap(lambda m, x: linear_map(m, x), in_axes=(0, 0), out_axes=0)
    return _batch_first(per_layer(module, _batch_first(inputs, True)), True)
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


def user_class(module: nnx.Module) -> type:
  """The user's own class of a module that altgrad made tappable or decorrelated."""
  cls = original_class(module)
  return getattr(cls, "_altgrad_decorrelated_base", cls)


def describe_site(path: Sequence[Any], module: nnx.Module) -> str:
  """``path (package.Class)`` of a site module, for error messages."""
  cls = user_class(module)
  return f"{'/'.join(map(str, path)) or 'the model'} ({cls.__module__.split('.')[0]}.{cls.__name__})"


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
