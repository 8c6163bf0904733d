"""ER on minibatches of 64: moments streamed over the data set against a refit per batch alone,
and the two hidden targets. Prints each run's test accuracy per epoch (the README quotes them).

    python tools/er_minibatch.py            # about 3 minutes on 2 CPU cores
"""

import optax
from flax import nnx

from altgrad import data, losses, nn, rules, train

RUNS = (  # data set, hidden widths, data_size ("stream": the training set's size), hidden target, epochs
  ("digits", (128, 128), "stream", "diff", 10),
  ("digits", (128, 128), "per_batch", "diff", 10),
  ("digits", (128, 128), "stream", "ratio", 10),
  ("digits", (32,), "stream", "diff", 20),
  ("digits", (32,), "stream", "ratio", 20),
  ("mnist1d", (128, 128), "stream", "diff", 10),
  ("mnist1d", (128, 128), "per_batch", "diff", 10),
  ("mnist1d", (128, 128), "stream", "ratio", 10),
)


def main() -> None:
  for name, hidden, data_size, hidden_target, epochs in RUNS:
    dataset = data.load(name)
    model = nn.MLP((dataset.input_shape[0], *hidden, dataset.num_classes), rngs=nnx.Rngs(0))
    size = len(dataset.x_train) if data_size == "stream" else data_size
    rule = rules.expectation_reflection(model, data_size=size, hidden_target=hidden_target)
    history = train.fit(
      model, optax.chain(rule, optax.sgd(1.0)), dataset, loss_fn=losses.softmax_cross_entropy,
      epochs=epochs, batch_size=64, progress=False,
    )
    accuracies = " ".join(f"{a:.3f}" for a in history.test_accuracy)
    print(f"{name:8} {'-'.join(map(str, hidden)):8} {data_size:9} {hidden_target:5} {accuracies}", flush=True)


if __name__ == "__main__":
  main()
