"""altgrad: learning rules that replace or repair backpropagation, as optax transformations."""

from altgrad import data, diagnostics, losses, nn, rules, train
from altgrad._optimizer import Optimizer

__version__ = "0.1.0"

__all__ = ["Optimizer", "data", "diagnostics", "losses", "nn", "rules", "train", "__version__"]
