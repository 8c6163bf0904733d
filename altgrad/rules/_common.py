"""What every rule shares beyond the pure model view."""

from __future__ import annotations

from altgrad.nn._pure import LossFn

__all__ = ["LossFn", "check_loss_fn"]


def check_loss_fn(loss_fn: object) -> None:
  if not callable(loss_fn):
    raise TypeError(
      "loss_fn must be a function (outputs, targets) -> per-example losses, such as "
      f"altgrad.losses.softmax_cross_entropy; got {type(loss_fn).__name__}"
    )
