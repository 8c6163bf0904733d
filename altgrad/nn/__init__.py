"""Sites on any Flax NNX model, and layers that add inverses for TP and ER.

Rules reach a model only through its *sites* (every call of a linear layer: nnx.Linear,
nnx.LinearGeneral, nnx.Conv, nnx.ConvTranspose, nnx.Einsum, or an altgrad layer's linear part)
and the tapped forward pass; :class:`PureModel` is the pure ``(graphdef, params, variables)``
view they use. The altgrad layers (Dense, Conv, SimpleRNN, GRU, MLP) are conveniences on the same
mechanism that expose their activations and regularized inverses.
"""

from altgrad.nn._activations import ACTIVATIONS, Activation, get_activation
from altgrad.nn._base import Layer, SingleSite
from altgrad.nn._conv import Conv
from altgrad.nn._crossing import stopped, through
from altgrad.nn._decorrelation import Decorrelation, decorrelate, fold_decorrelation
from altgrad.nn._dense import Dense
from altgrad.nn._pure import Errors, Forward, PureModel
from altgrad.nn._recurrent import GRU, GRUCell, GRUGates, RNNCell, SimpleRNN
from altgrad.nn._sequential import MLP, Flatten, Sequential
from altgrad.nn._sites import SITE_CLASSES, Backward, SiteError, SiteWarning, Tap

__all__ = [
  "ACTIVATIONS",
  "Activation",
  "Backward",
  "Conv",
  "Decorrelation",
  "Dense",
  "Errors",
  "Flatten",
  "Forward",
  "GRU",
  "GRUCell",
  "GRUGates",
  "Layer",
  "MLP",
  "PureModel",
  "RNNCell",
  "SITE_CLASSES",
  "Sequential",
  "SimpleRNN",
  "SingleSite",
  "SiteError",
  "SiteWarning",
  "Tap",
  "decorrelate",
  "fold_decorrelation",
  "get_activation",
  "stopped",
  "through",
]
