"""Sites on any Flax NNX model: where a rule reads and perturbs a network.

A *site* is one call of a linear layer: ``nnx.Linear``, ``nnx.LinearGeneral``, ``nnx.Conv``,
``nnx.ConvTranspose``, ``nnx.Einsum`` (and their subclasses, e.g. ``nnx.LoRALinear``),
``nnx.LoRA``, or an ``altgrad.nn`` layer's linear part. Its input and its output (the
pre-activation) are what every rule works with. A layer called twice (shared weights) is two
sites whose updates add up; a layer called within another's call (``nnx.LoRA``'s
``base_module``, ``nnx.LoRALinear``'s ``lora``) is part of that site.

NNX has no method interception, so ``make_tappable`` (``altgrad.nn._intercept``) takes a *clone* of the user's model
and gives each linear layer of it a generated subclass of its own class (cached, so the graphdef
is stable and nothing retraces) whose ``__call__`` goes through :func:`site`. Outside a
:func:`tapping` pass that subclass behaves exactly as the original; inside one it adds the pass's
perturbation to the output and records a :class:`Tap`. Param paths are unchanged, so the user's
optimizer state, ``nnx.Optimizer`` and checkpoints still fit. This relies on NNX internals that
are stable in flax 0.12 (modules have no ``__slots__``; the graphdef stores the class and static
attributes); ``tests/test_any_model.py`` fails loudly if a Flax upgrade breaks them. Why not Flax's own
``nnx.capture``/``Module.perturb``, and the whole path of a step from batch to update:
altgrad/nn/README.md. This module holds the tapping; ``altgrad.nn._matrix_form`` what a site
is as a map of its params (its replay, its kernel as a matrix).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

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
  nnx.LoRA,
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
    steps: (static) that transform ran the site at every step of a recurrence (``nnx.RNN``'s
      scan over time): ``inputs`` and ``preact`` have the time axis second,
      ``(batch, time, ...)``, and every step uses the same params.
  """

  inputs: Any
  preact: Array
  path: Path = dataclasses.field(default=(), metadata={"static": True})
  nested: bool = dataclasses.field(default=False, metadata={"static": True})
  stacked: bool = dataclasses.field(default=False, metadata={"static": True})
  steps: bool = dataclasses.field(default=False, metadata={"static": True})


class SiteError(ValueError):
  """A site that the rules cannot tap, or a model with none."""


class SiteWarning(UserWarning):
  """A linear layer that a rule cannot tap where it runs, and treats as params outside sites."""


#: ``backward(module, inputs, cotangent) -> cotangent at inputs``: how an error crosses a site's
#: linear map in the backward pass of a tapped pass (its own transpose is backprop). ``module``
#: is the site's module with the params it had in the forward pass.
Backward = Callable[[nnx.Module, Array, Array], Array]


@dataclasses.dataclass
class _Pass:
  perturbations: tuple[Any, ...] | None
  stop_site_params: bool
  trace_state: Any
  taps: list[Any] = dataclasses.field(default_factory=list)
  replaced: tuple[int, Array] | None = None
  stop_at: int | None = None
  inside: bool = False  # a site call is computing: a site called within it is part of it
  rnn_outputs: bool = False  # each nnx.RNN's output is tapped too (target propagation's states)
  backward: Backward | None = None  # how an error crosses each site (None: its own transpose)


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
  shape inside the transform, ``param_shapes`` its module's param shapes there (a stack's layer
  has one axis fewer than the stack; a recurrent step has the same)."""

  path: Path
  shape: tuple[int, ...]
  param_shapes: tuple[tuple[int, ...], ...]


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
  rnn_outputs: bool = False,
  backward: Backward | None = None,
) -> Iterator[list[Tap]]:
  """Within this context every site call adds ``perturbations[i]`` (``None``: nothing) to the
  output of the ``i``-th site call and appends a :class:`Tap` to the yielded list.

  With ``stop_site_params`` each site reads its own params through ``stop_gradient``: the
  gradient of the pass with respect to the params is then the *residual*, the part that comes
  from uses of params outside any site call (a tied embedding head, a norm scale, a free param).
  ``replaced=(i, z)`` makes ``z`` the output of the ``i``-th site call, whatever its input;
  with ``stop_at=j`` the ``j``-th site call raises :class:`Reached` with its input. Together they
  give what lies between two sites as a function of the first one's output (see
  ``PureModel.between``). With ``rnn_outputs`` each ``nnx.RNN``'s output sequence is a tap too,
  after its cell's (not a linear site: target propagation's states, see ``altgrad.nn._cells``).
  With ``backward``, an error crosses each site in the pass's backward pass by
  ``backward(module, inputs, cotangent)`` instead of the site's transpose (the site's params get
  no gradient through the pass then; rules take their updates from the errors).
  """
  if getattr(_ACTIVE, "current", None) is not None:
    raise RuntimeError("a tapped pass is already running in this thread")
  current = _Pass(
    None if perturbations is None else tuple(perturbations),
    stop_site_params,
    _trace_state(),
    replaced=replaced,
    stop_at=stop_at,
    rnn_outputs=rnn_outputs,
    backward=backward,
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


def rnn_outputs_tapped() -> bool:
  """Whether the running pass taps ``nnx.RNN`` outputs (see :func:`tapping`)."""
  current = getattr(_ACTIVE, "current", None)
  return current is not None and current.rnn_outputs and not current.inside


def site_path(module: nnx.Module) -> Path:
  """The path of a site module in the model it was made tappable in."""
  return getattr(module, _PATH_ATTRIBUTE, ())


def site(module: nnx.Module, compute: Callable[[Array | None], tuple[Any, Array]]) -> Array:
  """One site call. ``compute(delta)`` returns ``(inputs, preact)`` with ``delta`` (or nothing,
  for ``None``) added to the pre-activation; the site's output is that pre-activation.

  Outside a :func:`tapping` pass this is ``compute(None)[1]``.
  """
  current = getattr(_ACTIVE, "current", None)
  if current is None or current.inside:
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
  hooked = current.backward is not None and not isinstance(module, nnx.RNN)  # an RNN's output is no linear map
  current.inside = True
  try:
    with _params_stopped(module) if current.stop_site_params else contextlib.nullcontext():
      inputs, preact = compute(None if hooked else delta)
  finally:
    current.inside = False
  if hooked:
    preact = _crossed(module, current.backward)(inputs, jax.lax.stop_gradient(preact))
    preact = preact if delta is None else preact + delta
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
  current.taps.append(Nested(site_path(module), tuple(preact.shape), _param_shapes(module)))
  return preact


def _crossed(module: nnx.Module, backward: Backward) -> Callable[[Array, Array], Array]:
  """``(x, y) -> y`` whose VJP sends a cotangent ``g`` of ``y`` to ``x`` as
  ``backward(module, x, g)``: the site's output ``y`` (computed, stopped) crossed backwards by
  the hook. The module's state goes in explicitly, to reach the backward pass as residuals."""
  graphdef, state = nnx.split(module)

  @jax.custom_vjp
  def crossed(x, y, state):
    return y

  def forward(x, y, state):
    return y, (x, state)

  def back(residuals, cotangent):
    x, state = residuals
    if isinstance(x, tuple):
      raise SiteError(
        f"{type(module).__name__} at {'/'.join(map(str, site_path(module)))} computes a whole recurrence in one site "
        "(altgrad's SimpleRNN), which a backward hook cannot cross step by step: use nnx.RNN(nnx.SimpleCell(...))"
      )
    crossing = backward(nnx.merge(graphdef, state), x, cotangent)
    return crossing, jnp.zeros_like(cotangent), jax.tree.map(jnp.zeros_like, state)

  crossed.defvjp(forward, back)
  return lambda x, y: crossed(x, y, state)


def _param_shapes(module: nnx.Module) -> tuple[tuple[int, ...], ...]:
  return tuple(tuple(v.shape) for _, v in nnx.iter_graph(module) if isinstance(v, nnx.Param))


def _warn_untapped(module: nnx.Module) -> None:
  """A layer inside a raw JAX transform of the model's own code is not a site (its taps could
  not leave the transform): its params are then params outside sites, which every rule still
  updates. Said once per place, as Python's warnings are."""
  warnings.warn(
    f"altgrad: {type(module).__name__} at {'/'.join(map(str, site_path(module))) or 'the top'} is called "
    "inside a JAX transformation in the model's own code, where a rule cannot tap it; NNX's transforms "
    "(nnx.remat, nnx.scan, nnx.vmap) keep a layer a site. Until then its params are params outside "
    "sites: backprop and consequentialism give them their gradient, node perturbation perturbs them",
    SiteWarning,
    stacklevel=4,
  )


def batch_first(value: Any, swap: bool) -> Any:
  """``value`` with its first two axes swapped where ``swap``: a transform's axis (a stack of
  layers, time steps) comes out first and a tap keeps the batch first."""
  return jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1), value) if swap else value


def prepare_nested(modules: dict[Path, nnx.Module], layout: Sequence[Any], perturbations: Sequence[Any]) -> None:
  """Sets the perturbations of the site calls that run inside NNX transforms on their modules,
  the transform's axis first, before the pass (``layout``: the taps of an earlier pass of the
  same shapes)."""
  for tap, delta in zip(layout, perturbations, strict=True):
    if tap.nested and delta is not None:
      modules[tap.path].altgrad_delta = _Delta(batch_first(delta, tap.stacked or tap.steps))


def collect_nested(modules: dict[Path, nnx.Module], taps: Sequence[Any]) -> tuple[Tap, ...]:
  """The taps of a pass, with those left on modules inside NNX transforms collected (batch axis
  first), and the modules cleared of what the pass set on them. A tap with an axis more than its
  call had is a stack's (the module's params have that axis too) or a recurrence's (they do not)."""
  collected = []
  for tap in taps:
    if isinstance(tap, Nested):
      module = modules[tap.path]
      inputs, preact = module.altgrad_record.get_value()
      repeated = preact.ndim == len(tap.shape) + 1
      stacked = repeated and _param_shapes(module) != tap.param_shapes
      tap = Tap(batch_first(inputs, repeated), batch_first(preact, repeated), tap.path, True, stacked, repeated and not stacked)
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
