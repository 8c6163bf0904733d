"""The suites of ``altgrad bench``: each a list of :class:`Run`, literal settings only."""

from __future__ import annotations

import dataclasses
import functools

from altgrad import data as data_lib
from altgrad import rules

#: The baselines of the field beside the seeds' rules: the feedback-alignment family, direct
#: feedback and forward gradients (issue 42), in every suite that compares rules on one model.
BASELINES = ("fa", "sign", "kp", "dfa", "drtp", "fg", "fga")

#: The seeds a grid is tuned from (``Run.tune``): others than any run's reported seeds.
TUNE_SEEDS = (1000, 1001)

#: The fields of :class:`Run` a grid may tune (``Run.tune``) besides ``lr`` and the rule's
#: options: each value builds its own program (a layer attribute, not optimizer state).
TUNED_FIELDS = ("decorrelation_lr",)

#: The fraction of the training data a grid is scored on.
VALIDATION = 0.1

#: How many training examples the per-layer cosine to backprop is measured on.
PROBE_SIZE = 256

#: What makes two runs comparable (one is the other's backprop reference): the same data, model,
#: batch size, decorrelation and number of seeds.
REFERENCE_FIELDS = (
  "dataset",
  "dataset_options",
  "model",
  "hidden",
  "activation",
  "batch_size",
  "decorrelation_lr",
  "decorrelation_sample",
  "decorrelation_kappa",
  "kernel_init",
  "seeds",
)


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run: data set, model, rule (with options), optimizer and schedule.

  ``seeds`` runs are trained together (seeds ``seed``, ``seed + 1``, ...; vmapped, or in turn in
  the same program with ``vectorize=False``), each seeding the initial params, the shuffling and
  the rule's key. ``tune`` is a grid, ``(("lr", values), (rule option, values), ...)``: its
  points are tried first on a validation split of the training data from :data:`TUNE_SEEDS`
  (``altgrad.train.tune``: one program), and the best is the run's setting (``lr`` and
  ``rule_options`` are then the grid's starting point, replaced; so is ``decorrelation_lr``,
  which a decorrelated run may tune too, a program per value). With ``fresh_steps`` every epoch is that many batches freshly drawn by the
  task's sampler (an evaluation interval), not a pass over the training split.
  """

  dataset: str
  hidden: tuple[int, ...]
  rule: str
  optimizer: str
  lr: float
  epochs: int
  batch_size: int
  model: str = "auto"
  activation: str = "tanh"
  rule_options: tuple[tuple[str, object], ...] = ()
  dataset_options: tuple[tuple[str, object], ...] = ()
  seed: int = 0
  decorrelation_lr: float | None = None
  decorrelation_sample: float = 1.0
  decorrelation_kappa: float = 0.0
  kernel_init: str | None = None
  stop_on_discrepancy: bool = False
  seeds: int = 1
  vectorize: bool = True
  loss: str = "auto"
  fresh_steps: int | None = None
  tune: tuple[tuple[str, tuple[float, ...]], ...] = ()

  @property
  def name(self) -> str:
    options = ",".join(f"{k}={v}" for k, v in self.rule_options)
    rule = f"{self.rule}({options})" if options else self.rule
    if self.decorrelation_lr is not None:
      sample = "" if self.decorrelation_sample == 1.0 else f",sample={self.decorrelation_sample:g}"
      kappa = f",kappa={self.decorrelation_kappa:g}" if self.decorrelation_kappa else ""
      rule = f"d{rule}(decor={self.decorrelation_lr:g}{sample}{kappa})"
    if self.stop_on_discrepancy:
      rule += "+stop"
    if self.loss != "auto":
      rule += f"[{self.loss}]"
    tuned = "".join(f",{k}={min(v):g}..{max(v):g}" for k, v in self.tune)
    optimizer = f"{self.optimizer}(tuned{tuned})" if self.tune else f"{self.optimizer}({self.lr:g})"
    hidden = "-".join(map(str, self.hidden)) + (f"({self.kernel_init})" if self.kernel_init else "")
    data = ",".join(f"{k}={v}" for k, v in self.dataset_options)
    data = f"{self.dataset}({data})" if data else self.dataset
    return (
      f"{data}/{self.model}:{hidden}/{self.activation}/b{self.batch_size}/{rule}+{optimizer}"
      f"/e{self.epochs}" + (f"x{self.fresh_steps}fresh" if self.fresh_steps else "")
      + f"/s{self.seed}" + (f"/n{self.seeds}" if self.seeds > 1 else "")
    )

  @property
  def reference_key(self) -> tuple:
    """Runs with the same key are compared with the same backprop run (:data:`REFERENCE_FIELDS`)."""
    return tuple(getattr(self, field) for field in REFERENCE_FIELDS)


#: The cw suite's learning-rate grids, per optimizer: log-spaced, around the rates the CW
#: authors' and Flax's tutorials use; CW's ``eps`` is tuned beside them.
CW_GRID = {
  "sgd": (0.03, 0.1, 0.3, 1.0),
  "momentum": (3e-3, 1e-2, 3e-2, 1e-1),
  "adam": (3e-4, 1e-3, 3e-3, 1e-2),
}


def _cw_suite(epochs: int) -> list[Run]:
  """CW against backprop on Fashion-MNIST MLPs (tanh, batch 128), each at its tuned learning rate
  (:data:`CW_GRID`; CW also its ``eps``, 0.1 or 1), 5 seeds: the 256-256 MLP with SGD, momentum
  and Adam, the 1024-1024 MLP with Adam; then altgrad's conv net (ReLU, Adam) for half the
  epochs. CW trains its seeds and grid points in turn (vmapped, its batched Cholesky factors hang
  XLA's CPU backend at a dozen runs)."""
  runs = []
  eps = ("eps", (0.1, 1.0))
  cases = [((256, 256), opt) for opt in CW_GRID] + [((1024, 1024), "adam")]
  for hidden, opt in cases:
    lrs = ("lr", CW_GRID[opt])
    runs.append(Run("fashion_mnist", hidden, "backprop", opt, 1e-3, epochs, 128, seeds=5, tune=(lrs,)))
    runs.append(
      Run("fashion_mnist", hidden, "consequentialism", opt, 1e-3, epochs, 128, seeds=5, tune=(lrs, eps), vectorize=False)
    )
  conv = functools.partial(
    Run, "fashion_mnist", (128,), optimizer="adam", lr=1e-3, epochs=max(1, epochs // 2), batch_size=128, model="conv",
    activation="relu", dataset_options=(("flatten", False),), seeds=5, tune=(("lr", (3e-4, 1e-3, 3e-3)),),
  )
  runs.append(conv(rule="backprop"))
  runs.append(conv(rule="consequentialism", vectorize=False))
  return runs


#: The node-perturbation authors' MLP settings (their ``main.py``) but its width and schedule.
_authors_mlp = functools.partial(
  Run, "fashion_mnist", optimizer="adam", lr=1e-3, batch_size=1000, activation="leaky_relu", kernel_init="he_normal",
  loss="clipped_cross_entropy",
)


def _np_authors_suite() -> list[Run]:
  """The node-perturbation authors' settings (SanderDalm/DANP_open_source main.py defaults) on
  Fashion-MNIST: MLP 784-1024x3-10, leaky ReLU (slope 0.2, tf.nn.leaky_relu's), He-normal kernels,
  probability-space cross-entropy clipped to [1e-7, 1 - 1e-7], batch 1000, Adam 1e-3, noise
  sigma 1e-2, one noise sample, decorrelation lr 1e-3 on the whole batch; 20 epochs (the authors
  run 200), 3 seeds. Each rule with and without decorrelation. Then backprop and the baselines
  (:data:`BASELINES`) at one seed each, same settings, no decorrelation. Untuned: the authors'
  settings as they publish them (the ``np`` suite tunes every rule on a smaller form)."""
  mlp = functools.partial(_authors_mlp, hidden=(1024, 1024, 1024), epochs=20)
  runs = [mlp(rule=rule) for rule in ("backprop", *BASELINES)]
  for rule in ("backprop", "np", "inp", "anp"):
    options = () if rule == "backprop" else (("sigma", 1e-2),)
    runs += [mlp(rule=rule, rule_options=options, decorrelation_lr=lr, seeds=3) for lr in (None, 1e-3)]
  return runs


#: The np suite's grid: Adam's learning rate for every rule, node perturbation's ``sigma`` beside it.
NP_GRID = {"lr": (3e-5, 1e-4, 3e-4, 1e-3, 3e-3), "sigma": (1e-3, 1e-2)}

#: The runs that chose the top of :data:`NP_GRID`'s learning rates in its first run (backprop,
#: FA, sign symmetry, weight-perturbed forward gradients, every decorrelated run) tune one step higher.
NP_GRID_HIGHER = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)


def _np_suite() -> list[Run]:
  """The node-perturbation authors' MLP and settings (the ``np_authors`` suite) shrunk to fit 2
  CPU cores: three hidden layers of 256 (not 1024), 5 epochs (not 200), 5 seeds. Every rule at
  its tuned setting (:data:`NP_GRID`, or :data:`NP_GRID_HIGHER`; NP, INP and ANP also
  ``sigma``): backprop and each node perturbation with and without decorrelation (lr 1e-3, the
  authors'), and the baselines (:data:`BASELINES`)."""
  mlp = functools.partial(_authors_mlp, hidden=(256, 256, 256), epochs=5, seeds=5)

  def grid(rule, decorrelated):
    higher = decorrelated or rule in ("backprop", "fa", "sign", "fg")
    lrs = ("lr", NP_GRID_HIGHER if higher else NP_GRID["lr"])
    return (lrs, ("sigma", NP_GRID["sigma"])) if rule in ("np", "inp", "anp") else (lrs,)

  runs = []
  for rule in ("backprop", "np", "inp", "anp"):
    for decorrelation in (None, 1e-3):
      runs.append(mlp(rule=rule, tune=grid(rule, decorrelation is not None), decorrelation_lr=decorrelation))
  runs += [mlp(rule=rule, tune=grid(rule, False)) for rule in BASELINES]
  return runs


def _tp_suite() -> list[Run]:
  """docs/rules/target_propagation.rst, Benchmark settings: a tanh RNN of 100 units, TP (SGD gamma_theta; gamma_h, r) against BPTT (Nesterov)
  and against the control, BPTT at TP's step sizes (``scaled_backprop``), 3 seeds; the adding task
  in the authors' squared error (``mean_squared_error``). Temporal order at T = 60 and the adding
  task run the authors' budgets as they do: 40k, 48k and 24k iterations of fresh batches of 20,
  evaluated every 200.

  Not quite the authors' steps: torch's RNN cell has two biases (input and hidden), both moved by
  the same gradient, so the reference's effective bias step is twice altgrad's (one bias).
  """
  runs = []
  for length, epochs, fresh_steps, num_train, tp_options, tp_lr, bp_lr in (
    (60, 200, 200, 2_000, (("lr_target", 1e-2), ("reg", 10.0)), 0.1, 1e-5),
    (120, 240, 200, 2_000, (("lr_target", 1e-2), ("reg", 1.0)), 1e-2, 1e-5),
  ):
    sequences = functools.partial(
      Run, "temporal_order", (100,), epochs=epochs, batch_size=20, seeds=3, fresh_steps=fresh_steps,
      dataset_options=(("length", length), ("num_train", num_train), ("num_test", 2_000)),
    )
    runs.append(sequences(rule="backprop", optimizer="nesterov", lr=bp_lr))
    runs.append(sequences(rule="tp", optimizer="sgd", lr=tp_lr, rule_options=tp_options))
    # the control: BPTT at TP's step sizes (hidden layers at lr_target times the step)
    control = (("hidden_scale", dict(tp_options)["lr_target"]),)
    runs.append(sequences(rule="scaled_backprop", optimizer="sgd", lr=tp_lr, rule_options=control))
  # the authors' squared error is torch's MSELoss, twice altgrad's squared_error
  adding = functools.partial(
    Run, "adding", (100,), epochs=120, batch_size=20, seeds=3, loss="mean_squared_error", fresh_steps=200,
    dataset_options=(("length", 30), ("num_train", 2_000), ("num_test", 2_000)),
  )
  runs.append(adding(rule="backprop", optimizer="nesterov", lr=1e-3))
  runs.append(adding(rule="tp", optimizer="sgd", lr=0.1, rule_options=(("lr_target", 0.1), ("reg", 1.0))))
  # MNIST-1D as a 40-step sequence, with SGD settings after the paper's pixel-MNIST ones (both
  # rules diverged in results/tp.md: a setting to tune, not a comparison)
  sequence = (("as_sequence", True),)
  runs.append(Run("mnist1d", (100,), "backprop", "nesterov", 1e-3, 20, 16, dataset_options=sequence))
  runs.append(
    Run(
      "mnist1d",
      (100,),
      "tp",
      "sgd",
      0.1,
      20,
      16,
      rule_options=(("lr_target", 1e-2), ("reg", 1.0)),
      dataset_options=sequence,
    )
  )
  for length in (30, 60, 120, 240):  # step time against T, one epoch each
    options = (("length", length), ("num_train", 2_000), ("num_test", 200))
    runs.append(Run("temporal_order", (100,), "backprop", "nesterov", 1e-5, 1, 20, dataset_options=options))
    runs.append(
      Run(
        "temporal_order",
        (100,),
        "tp",
        "sgd",
        0.1,
        1,
        20,
        rule_options=(("reg", 1.0),),
        dataset_options=options,
      )
    )
  return runs


def _rnn_suite() -> list[Run]:
  """Users' recurrent models beside altgrad's own: ``nnx.RNN`` over Flax's ``GRUCell`` and
  ``LSTMCell`` (``flax_gru``, ``flax_lstm``) and altgrad's GRU, 100 units and a readout of the
  last state, trained with BPTT, TP, CW and ANP, all with Adam 1e-3 (TP's authors' SGD settings
  learn nothing in this budget), 3 seeds; CW and ANP on the Flax cells only, whose gates are
  ``nnx.Linear`` sites (altgrad's GRU cell keeps its kernels as params outside any site, which
  CW would give backprop's gradient and ANP would leave frozen), on the temporal-order task at T = 60 and the adding
  task at T = 30, and BPTT and TP at T = 120: 2,000 iterations of fresh batches of 20, evaluated
  every 200. A shorter budget than the ``tp`` suite's (the authors' 24k-48k iterations), so that
  it runs in about an hour on 2 CPU cores; the learning rates are not tuned. TP and CW train
  their seeds in turn."""
  runs = []
  tasks = (
    ("temporal_order", 60, "auto", ("backprop", "tp", "consequentialism", "anp")),
    ("adding", 30, "mean_squared_error", ("backprop", "tp", "consequentialism", "anp")),
    ("temporal_order", 120, "auto", ("backprop", "tp")),
  )
  options = {"tp": (("lr_target", 1e-2), ("reg", 1.0)), "anp": (("sigma", 1e-3),)}
  for dataset, length, loss, rule_names in tasks:
    for model in ("gru", "flax_gru", "flax_lstm"):
      setting = functools.partial(
        Run, dataset, (100,), optimizer="adam", lr=1e-3, epochs=10, batch_size=20, model=model, seeds=3,
        fresh_steps=200, loss=loss, dataset_options=(("length", length), ("num_train", 2_000), ("num_test", 2_000)),
      )
      # in turn: three seeds of TP's or CW's vmapped steps (their Cholesky factors batched) hang
      # XLA's CPU backend (jaxlib 0.10.1; two do not), as ER's and CW's do in the er and conv suites
      runs += [
        setting(rule=rule, rule_options=options.get(rule, ()), vectorize=rule not in ("tp", "consequentialism"))
        for rule in rule_names
        if model != "gru" or rule in ("backprop", "tp")
      ]
  return runs


def _er_suite() -> list[Run]:
  """docs/rules/expectation_reflection.rst, Benchmark settings: full-batch ER, one sweep (3 seeds) and the reference stopping rule (one seed:
  it stops one run); ER on minibatches of 64 and 256 with moments streamed over the data set
  (3 seeds, 5 epochs; the hidden models also with the ratio hidden target); backprop with Adam
  (3 seeds)."""
  runs = []
  for dataset, size in (("fashion_mnist", 60_000), ("mnist1d", 4_000)):
    for hidden in ((), (256,), (256, 256)):
      # in turn: vmapped multilayer ER hangs XLA's CPU backend (train.fit_seeds says when)
      er = functools.partial(Run, dataset, hidden, "er", "sgd", 1.0, seeds=3, vectorize=False)
      runs.append(er(1, size))
      runs.append(Run(dataset, hidden, "er", "sgd", 1.0, 30, size, stop_on_discrepancy=True))
      runs.extend(er(5, batch_size) for batch_size in (64, 256))
      if hidden:
        runs.append(er(5, 64, rule_options=(("hidden_target", "ratio"),)))
      runs.append(Run(dataset, hidden, "backprop", "adam", 1e-3, 10, 128, seeds=3))
  return runs


def _models_suite() -> list[Run]:
  """Ordinary NNX models, as a user writes them (altgrad._zoo, no altgrad layers): a small ResNet
  (BatchNorm, dropout) on Fashion-MNIST and a small transformer (attention, tied head) on the
  majority task, trained with backprop, CW, ANP and the baselines (:data:`BASELINES`), and with
  plain ``jax.grad``, which times the backprop rule's overhead; then backprop, decorrelated backprop and DANP (``nn.decorrelate``:
  every Conv and Linear, decorrelation lr 1e-3 as the node-perturbation authors') over 3 seeds,
  and decorrelated backprop with the DBP code's unit-variance term (``kappa=0.01``)."""
  runs = []
  anp = ("anp", (("sigma", 1e-3),))
  for dataset, model, hidden, epochs, batch_size, lr, options in (
    ("fashion_mnist", "resnet", (16,), 2, 128, 3e-3, (("flatten", False),)),
    ("majority", "transformer", (32, 32), 10, 64, 1e-3, ()),
  ):
    setting = functools.partial(
      Run,
      dataset,
      hidden,
      optimizer="adam",
      lr=lr,
      epochs=epochs,
      batch_size=batch_size,
      model=model,
      activation="relu" if model == "resnet" else "gelu",
      dataset_options=options,
    )
    for rule, rule_options in (("jax_grad", ()), ("backprop", ()), ("consequentialism", ()), anp):
      runs.append(setting(rule=rule, rule_options=rule_options))
    runs += [setting(rule=rule) for rule in BASELINES]
    runs.append(setting(rule="backprop", seeds=3))
    for rule, rule_options in (("backprop", ()), anp):
      runs.append(setting(rule=rule, rule_options=rule_options, decorrelation_lr=1e-3, seeds=3))
    runs.append(setting(rule="backprop", decorrelation_lr=1e-3, decorrelation_kappa=0.01, seeds=3))
  return runs


#: The conv suite's grid: Adam's learning rate for every rule but ER (its own step), around the
#: rate both rules chose on the same net in the cw suite (3e-3, the top of its grid there).
CONV_GRID = (3e-4, 1e-3, 3e-3, 1e-2)


def _conv_suite() -> list[Run]:
  """Every rule on one convolutional network, Fashion-MNIST images (28x28x1), sized for 2 CPU
  cores: altgrad's conv net (two 3x3 convolutions of stride 2, 16 and 32 channels, tanh, a dense
  layer of 128 and the classifier), 2 epochs of batches of 128. Backprop, CW, ANP (sigma 1e-3)
  and the baselines (:data:`BASELINES`), each with Adam at its tuned learning rate
  (:data:`CONV_GRID`), 5 seeds, paired; decorrelated backprop and DANP (decorrelation lr 1e-3,
  the node-perturbation authors') tuned on the grid's middle two rates, their step being 4-5x
  backprop's here. TP (Adam 1e-3; linearized, the default) and ER (its own step, moments
  streamed over the data set, one epoch) at one seed, untuned, against a one-seed backprop: on
  2 CPU cores their steps cost 17x and 64x backprop's (a convolution's inverse by conjugate
  gradients; refits through the convolutions). Their 3-seed rows, decorbp's ``kappa=0.01`` and
  the same net in plain NNX are in results/gpu/conv.md (an H200), the ``kappa`` row also in the
  ``models`` suite. TP and ER on convolutions are reconstructions (see their docstrings)."""
  setting = functools.partial(
    Run, "fashion_mnist", (128,), optimizer="adam", lr=1e-3, epochs=2, batch_size=128, model="conv",
    dataset_options=(("flatten", False),), seeds=5, tune=(("lr", CONV_GRID),),
  )
  # in turn: vmapped CW (batched Cholesky factors) hangs XLA's CPU backend (jaxlib 0.10.1)
  runs = [setting(rule="backprop"), setting(rule="consequentialism", vectorize=False)]
  runs += [setting(rule="anp", rule_options=(("sigma", 1e-3),)), *(setting(rule=rule) for rule in BASELINES)]
  decorrelated = functools.partial(setting, decorrelation_lr=1e-3, tune=(("lr", CONV_GRID[1:3]),))
  runs += [decorrelated(rule="backprop"), decorrelated(rule="anp", rule_options=(("sigma", 1e-3),))]
  once = functools.partial(setting, seeds=1, tune=())
  runs += [once(rule="backprop"), once(rule="tp"), once(rule="er", optimizer="sgd", lr=1.0, epochs=1)]
  return runs


#: The smoke suite's grid: every rule's learning rate (Adam), the key option of the rules that
#: have one and the decorrelated runs' rate, on a validation split (``Run.tune``).
SMOKE_GRID = {
  "lr": (1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
  "np": ("sigma", (1e-3, 1e-2)),
  "inp": ("sigma", (1e-3, 1e-2)),
  "anp": ("sigma", (1e-3, 1e-2)),
  "consequentialism": ("eps", (0.1, 1.0)),
  "tp": ("reg", (0.1, 1.0)),  # not lr_target: Adam divides its scale out
  "decorrelation_lr": ("decorrelation_lr", (1e-4, 1e-3, 1e-2)),
}


def _smoke_suite() -> list[Run]:
  """Every rule on digits, each at its tuned setting (:data:`SMOKE_GRID`, Adam), six seeds each
  (paired with backprop's), in a few minutes on 2 CPU cores; decorrelated backprop and DANP
  with their decorrelation rate tuned as well; ER (its own step, untuned) also sweeps the full
  training set, as its reference does."""
  def grid(rule, *extra):  # the learning rate, then extra, then the rule's key option
    return (("lr", SMOKE_GRID["lr"]), *extra) + ((SMOKE_GRID[rule],) if rule in SMOKE_GRID else ())

  runs = []
  for rule in rules.RULES:
    if rule == "er":
      continue
    # in turn: twelve vmapped runs of CW's or TP's step (batched Cholesky factors) hang XLA's CPU backend
    in_turn = rule in ("consequentialism", "tp")
    runs.append(Run("digits", (64, 32), rule, "adam", 3e-3, 3, 64, seeds=6, tune=grid(rule), vectorize=not in_turn))
  for rule in ("backprop", "anp"):  # decorrelated, its rate tuned too (a program per rate)
    tune = grid(rule, SMOKE_GRID["decorrelation_lr"])
    runs.append(Run("digits", (64, 32), rule, "adam", 3e-3, 3, 64, seeds=6, decorrelation_lr=1e-3, tune=tune))
  full_batch = len(data_lib.load("digits").x_train)
  runs.append(Run("digits", (64, 32), "er", "sgd", 1.0, 3, 64, seeds=6))
  runs.append(Run("digits", (64, 32), "er", "sgd", 1.0, 3, full_batch, seeds=6))
  runs.append(Run("digits", (64, 32), "backprop", "adam", 3e-3, 30, full_batch, seeds=6, tune=grid("backprop")))
  return runs


SUITES = {
  "smoke": _smoke_suite,
  "cw": lambda: _cw_suite(epochs=5),
  "np": _np_suite,
  "np_authors": _np_authors_suite,
  "tp": _tp_suite,
  "rnn": _rnn_suite,
  "er": _er_suite,
  "models": _models_suite,
  "conv": _conv_suite,
}
SUITES["all"] = lambda: [run for name in ("cw", "np", "np_authors", "tp", "rnn", "er", "models", "conv") for run in SUITES[name]()]
