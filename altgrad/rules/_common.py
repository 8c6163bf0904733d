"""What every rule shares beyond the pure model view."""

from __future__ import annotations

from collections.abc import Callable

import jax

Array = jax.Array
LossFn = Callable[[Array, Array], Array]


def check_loss_fn(loss_fn: object) -> None:
  if not callable(loss_fn):
    raise TypeError(
      "loss_fn must be a function (outputs, targets) -> per-example losses, such as "
      f"altgrad.losses.softmax_cross_entropy; got {type(loss_fn).__name__}"
    )
