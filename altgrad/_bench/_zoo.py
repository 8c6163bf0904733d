"""Ordinary Flax NNX models, written as a user would (no altgrad layers): what the tests and the
``models`` bench suite train with every rule to show that a rule takes the user's own model."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


class ResidualMLP(nnx.Module):
  """A residual MLP with a LayerNorm, one layer applied twice and a free scalar param."""

  def __init__(self, features: int, hidden: int, classes: int, *, rngs: nnx.Rngs):
    self.embed = nnx.Linear(features, hidden, rngs=rngs)
    self.norm = nnx.LayerNorm(hidden, rngs=rngs)
    self.block = nnx.Linear(hidden, hidden, rngs=rngs)
    self.head = nnx.Linear(hidden, classes, rngs=rngs)
    self.temperature = nnx.Param(jnp.ones(()))

  def __call__(self, x):
    h = jnp.tanh(self.embed(x))
    h = h + jnp.tanh(self.block(self.norm(h)))
    h = h + jnp.tanh(self.block(h))  # the same layer again: shared weights
    return self.head(h) * self.temperature


class CNN(nnx.Module):
  """A chain of ``nnx.Conv`` and ``nnx.Linear`` with elementwise activations, as a user writes one:
  two 3x3 convolutions of stride 2 (16 and 32 channels; strides rather than pooling, so that
  Expectation Reflection can carry targets through it), a reshape, then dense layers of widths
  ``hidden`` and the classifier. altgrad's conv net, written in plain NNX."""

  def __init__(
    self, image: Sequence[int], classes: int, *, hidden: Sequence[int] = (128,), activation=jnp.tanh, rngs: nnx.Rngs
  ):
    height, width, channels = image
    self.conv1 = nnx.Conv(channels, 16, (3, 3), strides=(2, 2), rngs=rngs)
    self.conv2 = nnx.Conv(16, 32, (3, 3), strides=(2, 2), rngs=rngs)
    widths = (32 * -(-height // 4) * -(-width // 4), *hidden, classes)
    self.dense = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in itertools.pairwise(widths)])
    self.activation = activation

  def __call__(self, x):
    h = self.activation(self.conv2(self.activation(self.conv1(x))))
    h = h.reshape(h.shape[0], -1)
    for layer in self.dense[:-1]:
      h = self.activation(layer(h))
    return self.dense[-1](h)


#: Flax's recurrent cells by the name of the model kind that scans them (``--model flax_gru``).
FLAX_CELLS = {"flax_rnn": nnx.SimpleCell, "flax_gru": nnx.GRUCell, "flax_lstm": nnx.LSTMCell}


class FlaxRNN(nnx.Module):
  """Flax's own recurrent API as a user writes it: ``nnx.RNN`` over one of Flax's cells on
  sequences ``(batch, time, features)``, and a linear readout of the last output."""

  def __init__(self, cell: str, features: int, hidden: int, classes: int, *, rngs: nnx.Rngs):
    self.rnn = nnx.RNN(FLAX_CELLS[cell](features, hidden, rngs=rngs))
    self.head = nnx.Linear(hidden, classes, rngs=rngs)

  def __call__(self, x):
    return self.head(self.rnn(x)[:, -1])


class ResidualBlock(nnx.Module):
  """conv-BN-relu-conv-BN plus the identity, then relu."""

  def __init__(self, channels: int, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(channels, channels, (3, 3), use_bias=False, rngs=rngs)
    self.norm1 = nnx.BatchNorm(channels, rngs=rngs)
    self.conv2 = nnx.Conv(channels, channels, (3, 3), use_bias=False, rngs=rngs)
    self.norm2 = nnx.BatchNorm(channels, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.norm1(self.conv1(x)))
    return nnx.relu(x + self.norm2(self.conv2(h)))


class ResNet(nnx.Module):
  """A small ResNet for NHWC images: a stem, residual blocks with BatchNorm, average pooling,
  dropout and a linear head."""

  def __init__(
    self, channels_in: int, classes: int, *, width: int = 16, blocks: int = 2, dropout: float = 0.1, rngs: nnx.Rngs
  ):
    self.stem = nnx.Conv(channels_in, width, (3, 3), strides=(2, 2), rngs=rngs)
    self.stem_norm = nnx.BatchNorm(width, rngs=rngs)
    self.blocks = nnx.List([ResidualBlock(width, rngs=rngs) for _ in range(blocks)])
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.head = nnx.Linear(width, classes, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.stem_norm(self.stem(x)))
    for block in self.blocks:
      h = block(h)
    h = nnx.avg_pool(h, (2, 2), strides=(2, 2))
    h = self.dropout(jnp.mean(h, axis=(1, 2)))
    return self.head(h)


class TransformerBlock(nnx.Module):
  """Pre-LN: ``x + attention(norm(x))``, then ``x + mlp(norm(x))``."""

  def __init__(self, width: int, heads: int, *, rngs: nnx.Rngs):
    self.norm1 = nnx.LayerNorm(width, rngs=rngs)
    self.attention = nnx.MultiHeadAttention(heads, width, decode=False, rngs=rngs)
    self.norm2 = nnx.LayerNorm(width, rngs=rngs)
    self.up = nnx.Linear(width, 2 * width, rngs=rngs)
    self.down = nnx.Linear(2 * width, width, rngs=rngs)

  def __call__(self, x):
    x = x + self.attention(self.norm1(x))
    return x + self.down(nnx.gelu(self.up(self.norm2(x))))


class Transformer(nnx.Module):
  """A pre-LN transformer classifier over token sequences: ``nnx.Embed``, learned positions (a
  free param), blocks of ``nnx.MultiHeadAttention`` and MLP, a final LayerNorm, mean pooling and
  an output head tied to the embedding (``Embed.attend``): one logit per vocabulary entry."""

  def __init__(self, vocab: int, length: int, *, width: int = 32, heads: int = 4, depth: int = 2, rngs: nnx.Rngs):
    self.embed = nnx.Embed(vocab, width, rngs=rngs)
    self.positions = nnx.Param(0.02 * jax.random.normal(rngs.params(), (length, width)))
    self.blocks = nnx.List([TransformerBlock(width, heads, rngs=rngs) for _ in range(depth)])
    self.norm = nnx.LayerNorm(width, rngs=rngs)

  def __call__(self, tokens):
    h = self.embed(tokens) + self.positions[...]
    for block in self.blocks:
      h = block(h)
    return self.embed.attend(jnp.mean(self.norm(h), axis=1))


class ScannedMLP(nnx.Module):
  """A stack of identical tanh layers applied with ``nnx.scan`` (weights stacked by ``nnx.vmap``)."""

  def __init__(self, features: int, hidden: int, classes: int, *, depth: int = 3, rngs: nnx.Rngs):
    self.embed = nnx.Linear(features, hidden, rngs=rngs)

    @nnx.split_rngs(splits=depth)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def stacked(rngs):
      return nnx.Linear(hidden, hidden, rngs=rngs)

    self.layers = stacked(rngs)
    self.head = nnx.Linear(hidden, classes, rngs=rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def step(h, layer):
      return jnp.tanh(layer(h))

    return self.head(step(jnp.tanh(self.embed(x)), self.layers))
