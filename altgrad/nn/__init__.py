"""Flax NNX layers that expose their linear part, activation and regularized inverse.

Rules reach a model only through its *sites* (where a pre-activation is computed) and the
tapped forward pass; :class:`PureModel` is the pure ``(graphdef, params)`` view they use.
"""

from altgrad.nn._activations import ACTIVATIONS, Activation, get_activation
from altgrad.nn._base import Decorrelation, Layer, SingleSite, Tap
from altgrad.nn._conv import Conv
from altgrad.nn._dense import Dense
from altgrad.nn._pure import PureModel
from altgrad.nn._recurrent import RNNCell, SimpleRNN
from altgrad.nn._sequential import MLP, Flatten, Sequential

__all__ = [
  "ACTIVATIONS",
  "Activation",
  "Conv",
  "Decorrelation",
  "Dense",
  "Flatten",
  "Layer",
  "MLP",
  "PureModel",
  "RNNCell",
  "Sequential",
  "SimpleRNN",
  "SingleSite",
  "Tap",
  "get_activation",
]
