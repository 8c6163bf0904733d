"""Tests run on the CPU, whatever the machine has, with XLA's backend optimizations off: the
tests' programs are small and compiled once each, so compiling is most of their cost (a sixth
less of it this way); nothing here is timed."""

import os

os.environ["JAX_PLATFORMS"] = "cpu"
#: The XLA flags of every test process (a subprocess adds its device count to them).
XLA_FLAGS = "--xla_backend_optimization_level=0"
if XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {XLA_FLAGS}".strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from altgrad import losses, nn  # noqa: E402
from altgrad._bench import _experiment  # noqa: E402

#: The training-set size told to a rule that streams statistics over the data set (ER).
DATA_SIZE = 1024


def make_rule(name, model, loss_fn=losses.softmax_cross_entropy, **options):
  """``rules.RULES[name](model, loss_fn, **options)``, told ``data_size`` if it needs it (key 0 if
  it draws noise, its default)."""
  return _experiment.make_rule(name, model, loss_fn, 0, options.pop("data_size", DATA_SIZE), **options)


# Small models of every family the rules must handle, with a matching batch:
# name -> (make_model(seed), make_batch(seed)) for a 3-class classification problem.
CLASSES = 3


def _mlp(seed):
  return nn.MLP((6, 16, 12, CLASSES), rngs=nnx.Rngs(seed))


def _conv(seed):
  rngs = nnx.Rngs(seed)
  return nn.Sequential(
    nn.Conv(2, 4, 3, activation="tanh", rngs=rngs),
    nn.Conv(4, 5, 3, strides=2, activation="tanh", rngs=rngs),
    nn.Flatten(),
    nn.Dense(5 * 3 * 3, CLASSES, activation="identity", rngs=rngs),
  )


def _rnn(seed):
  return nn.SimpleRNN(3, 8, CLASSES, rngs=nnx.Rngs(seed))


INPUT_SHAPES = {"mlp": (6,), "conv": (6, 6, 2), "rnn": (7, 3)}
MODELS = {"mlp": _mlp, "conv": _conv, "rnn": _rnn}


def make_batch(kind, batch_size=16, seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(batch_size, *INPUT_SHAPES[kind])).astype(dtype)
  y = rng.integers(0, CLASSES, size=batch_size).astype(np.int32)
  return jnp.asarray(x), jnp.asarray(y)


@pytest.fixture(params=sorted(MODELS))
def model_kind(request):
  return request.param


def tree_allclose(a, b, rtol, atol):
  return all(jax.tree.leaves(jax.tree.map(lambda u, v: bool(np.allclose(u, v, rtol=rtol, atol=atol)), a, b)))


def flat(tree):
  """All leaves of a pytree as one vector."""
  return jnp.concatenate([jnp.ravel(a) for a in jax.tree.leaves(tree)])


def cosine(a, b):
  """Cosine between two pytrees of the same structure, as one vector each."""
  a, b = flat(a), flat(b)
  return float(a @ b / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))


def tapped(model, x, perturbations=None, params=None):
  """``(outputs, taps)`` of a tapped pass of ``model``, at ``params`` (default: the model's own)."""
  params = nnx.state(model, nnx.Param) if params is None else params
  forward = nn.PureModel(model).tapped(params, x, perturbations)
  return forward.outputs, forward.taps


def pytest_collection_modifyitems(items):
  """Slow tests first (a stable sort): the workers of ``-n 2`` share them from the start instead
  of finishing on them one at a time."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)
