"""What `altgrad compare` and `altgrad bench` share: named optimizers, the model for a data set,
and its loss."""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence

import numpy as np
import optax
from flax import nnx

from altgrad import data as data_lib
from altgrad import losses, nn, rules
from altgrad._bench import _zoo

OPTIMIZERS = {
  "sgd": optax.sgd,
  "momentum": lambda learning_rate: optax.sgd(learning_rate, momentum=0.9),
  "nesterov": lambda learning_rate: optax.sgd(learning_rate, momentum=0.9, nesterov=True),
  "rmsprop": optax.rmsprop,
  "adam": optax.adam,
}
MODELS = ("auto", "mlp", "conv", "cnn", "rnn", "gru", *_zoo.FLAX_CELLS, "resnet", "transformer")
KERNEL_INITS = {
  "lecun_normal": nnx.initializers.lecun_normal,
  "he_normal": nnx.initializers.he_normal,
  "glorot_uniform": nnx.initializers.glorot_uniform,
}


def optimizer_for(rule: str, optimizer: str, lr: float, *, tuned: bool = False) -> optax.GradientTransformation:
  """The optimizer after ``rule``: ``optimizer(lr)``, or ``sgd`` at the rule's own step (ER);
  ``tuned``: its learning rate, alone, in its state (``optax.inject_hyperparams``), to set per
  run (its other settings static: Adam's ``eps`` is not consequentialism's)."""
  if rule in rules.OWN_STEP:
    return optax.sgd(rules.OWN_STEP[rule])
  factory = OPTIMIZERS[optimizer]
  if not tuned:
    return factory(lr)
  static = tuple(p for p in inspect.signature(factory).parameters if p != "learning_rate")
  return optax.inject_hyperparams(factory, static_args=static)(learning_rate=lr)


def make_rule(
  name: str,
  model,
  loss_fn,
  seed: int,
  data_size: int,
  *,
  registry: Mapping = rules.RULES,
  tuned: Sequence[str] = (),
  **options,
) -> optax.GradientTransformationExtraArgs:
  """The rule ``registry[name]`` on ``model``; a rule that draws noise gets ``key=seed``, so runs
  of different seeds draw different noise, and one that streams statistics over the data set (ER)
  gets ``data_size``, the number of training examples. ``options`` override both. The ``tuned``
  options live in the rule's state (``optax.inject_hyperparams``, every other argument static),
  to set per run."""
  factory = registry[name]
  parameters = inspect.signature(factory).parameters
  if tuned:
    factory = optax.inject_hyperparams(factory, static_args=tuple(p for p in parameters if p not in tuned))
  given = {k: v for k, v in {"key": seed, "data_size": data_size}.items() if k in parameters}
  return factory(model, loss_fn, **(given | options))


def loss_for(dataset: data_lib.Dataset):
  """Cross-entropy for classification, squared error for regression."""
  return losses.squared_error if dataset.num_classes is None else losses.softmax_cross_entropy


def build_model(
  dataset: data_lib.Dataset,
  kind: str,
  hidden: Sequence[int],
  activation: str,
  seed: int,
  decorrelation_lr: float | None = None,
  decorrelation_sample: float = 1.0,
  kernel_init: str | None = None,
  decorrelation_kappa: float = 0.0,
):
  """The model `compare` trains: an MLP for flat inputs, a SimpleRNN (or, as ``gru``, a GRU)
  for sequences, a small conv net for images; or an ordinary NNX model of the user's kind (no altgrad layers): a
  ``cnn`` (altgrad's conv net in plain NNX), Flax's ``nnx.RNN`` over its ``SimpleCell``,
  ``GRUCell`` or ``LSTMCell`` (``flax_rnn``, ``flax_gru``, ``flax_lstm``) with a readout of the
  last output, a
  ``resnet`` (width ``hidden[0]``, ``len(hidden)`` residual blocks) for images, a
  ``transformer`` (width ``hidden[0]``, ``len(hidden)`` blocks, a head tied to the token
  embedding) for token sequences whose classes are tokens. ``kernel_init`` names the
  initializer of the MLP's and conv net's kernels (a key of ``KERNEL_INITS``; LeCun normal if
  None). ``decorrelation_lr`` decorrelates the inputs of every linear layer (``nn.decorrelate``,
  with ``decorrelation_sample`` and ``decorrelation_kappa``)."""
  rngs = nnx.Rngs(seed)
  shape = dataset.input_shape
  if kind == "auto":
    kind = {1: "mlp", 2: "rnn", 3: "conv"}.get(len(shape), "mlp")
  given = [f"--decorrelation-{name}" for name, on in (("sample", decorrelation_sample != 1.0), ("kappa", decorrelation_kappa)) if on]
  if decorrelation_lr is None and given:
    raise ValueError(f"{' and '.join(given)} shape the decorrelation update, which needs --decorrelation-lr")
  if decorrelation_lr is not None and kind in ("rnn", "gru", *_zoo.FLAX_CELLS):
    raise ValueError(
      f"--decorrelation-lr decorrelates the inputs of linear layers; the {kind} model's recurrent cells "
      "have no decorrelating matrix (use --model mlp, conv, resnet or transformer)"
    )
  if kernel_init is not None and kind not in ("mlp", "conv"):
    raise ValueError(f"--kernel-init sets the kernels of altgrad's MLP and conv net; the {kind} model keeps its own")
  if kernel_init is not None and kernel_init not in KERNEL_INITS:
    raise ValueError(f"unknown kernel init {kernel_init!r}; expected one of {sorted(KERNEL_INITS)}")
  init = dict(kernel_init=KERNEL_INITS[kernel_init or "lecun_normal"]())
  model = _undecorrelated_model(dataset, kind, hidden, activation, rngs, init)
  if decorrelation_lr is None:
    return model
  return nn.decorrelate(model, decorrelation_lr, sample=decorrelation_sample, kappa=decorrelation_kappa)


def _undecorrelated_model(dataset, kind, hidden, activation, rngs, init):
  shape, out = dataset.input_shape, dataset.output_size
  if kind == "cnn":
    if len(shape) != 3:
      raise ValueError(f"--model cnn needs images (height, width, channels); {dataset.name} has {shape}")
    return _zoo.CNN(shape, out, hidden=hidden, activation=nn.get_activation(activation).fn, rngs=rngs)
  if kind == "resnet":
    if len(shape) != 3:
      raise ValueError(f"--model resnet needs images (height, width, channels); {dataset.name} has {shape}")
    return _zoo.ResNet(shape[-1], out, width=hidden[0], blocks=len(hidden), rngs=rngs)
  if kind == "transformer":
    if len(shape) != 1 or not np.issubdtype(dataset.x_train.dtype, np.integer):
      raise ValueError(f"--model transformer needs token sequences (int ids); {dataset.name} has {shape}")
    return _zoo.Transformer(out, shape[0], width=hidden[0], depth=len(hidden), rngs=rngs)
  if kind in _zoo.FLAX_CELLS:
    if len(shape) != 2:
      raise ValueError(f"--model {kind} needs sequences (time, features); {dataset.name} has inputs {shape}")
    return _zoo.FlaxRNN(kind, shape[1], hidden[0], out, rngs=rngs)
  if kind in ("rnn", "gru"):
    if len(shape) != 2:
      raise ValueError(f"--model {kind} needs sequences (time, features); {dataset.name} has inputs {shape}")
    if kind == "gru":
      return nn.GRU(shape[1], hidden[0], out, rngs=rngs)
    return nn.SimpleRNN(shape[1], hidden[0], out, activation=activation, rngs=rngs)
  if kind == "conv":
    if len(shape) != 3:
      raise ValueError(f"--model conv needs images (height, width, channels); {dataset.name} has {shape}")
    return nn.Sequential(
      nn.Conv(shape[-1], 16, 3, strides=2, activation=activation, rngs=rngs, **init),
      nn.Conv(16, 32, 3, strides=2, activation=activation, rngs=rngs, **init),
      nn.Flatten(),
      nn.MLP(
        (32 * -(-shape[0] // 4) * -(-shape[1] // 4), *hidden, out),
        activation=activation,
        rngs=rngs,
        **init,
      ),
    )
  if len(shape) != 1:
    return nn.Sequential(nn.Flatten(), nn.MLP((math.prod(shape), *hidden, out), activation=activation, rngs=rngs, **init))
  return nn.MLP((shape[0], *hidden, out), activation=activation, rngs=rngs, **init)
