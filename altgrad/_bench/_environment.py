"""What a measurement ran on: the versions and the machine, recorded beside every result."""

from __future__ import annotations

import platform

import jax
import optax


def environment() -> dict:
  """The versions and the machine a suite ran with."""
  import flax

  return {
    "jax": jax.__version__,
    "optax": optax.__version__,
    "flax": flax.__version__,
    "device": str(jax.devices()[0]),
    "device_count": jax.device_count(),
    "platform": platform.platform(),
    "processor": platform.processor() or platform.machine(),
  }
