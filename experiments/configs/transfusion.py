"""Configs for Transfusion (``experiments/transfusion.py``): transfer learning vs random init.

    python -m experiments.transfusion --config experiments/configs/transfusion.py:breastmnist \\
        --workdir runs/transfusion

Presets are the keys of ``PRESETS`` (each described in its docstring);
``--config.dataset=npz:PATH`` reads any official MedMNIST ``.npz`` as the target.

Deviations from the paper (Raghu et al. 2019):

- Data: the paper's RETINA / CheXpert images (224-587 px) and ImageNet weights are not available;
  sources are pretrained here on CIFAR-10 (downsized to 16x16 on CPU) and targets are 28x28
  MedMNIST sets. Grayscale targets read RGB-pretrained first convs summed over input channels
  (the same as repeating the gray channel).
- Models at CPU scale use reduced widths (``widths``); ResNet-18 (not ResNet-50) is the large
  model there. Optimizer: SGD with momentum at a constant learning rate (the paper does not
  publish its schedule); the reduced regime keeps the full regime's number of steps.
- Units: a ResNet's units are its residual blocks (the paper transfuses by stage).
- Convergence: the step at which the validation AUC first reaches ``convergence_fraction`` of
  the random arm's final mean validation AUC, evaluated every ``eval_every_steps``.
- The transfusion sweep, slim top and Gabor arms run on one model (``model``) and the full
  training split only.
- Similarity: every SVCCA/PWCCA curve is shown with its chance level (independent noise of the
  unit's shape): the probe's few datapoints per neuron put unrelated representations well above
  0 in late units. "Lower layers change less" and "larger models change less" (mean over units,
  models ordered by parameter count) are judged above that level, for random init and seed 0
  only.
"""

import dataclasses
import numbers
from typing import Any

import ml_collections

from experiments import build, checks
from experiments.configs import common
from jaxtickets import data as data_lib
from jaxtickets import models, similarity, transfusion
from jaxtickets.errors import UserError

REGIMES = ("full", "reduced")
MAIN_ARMS = ("random", "transfer", "meanvar", "gabor")
SWEEP_ARMS = ("transfusion", "slim", "gabor")

_DIGITS_SOURCE_CLASSES = (0, 1, 2, 3, 4)
_DIGITS_TARGET_CLASSES = (5, 6, 7, 8, 9)


def medmnist(name: str) -> str:
  """The dataset spec of a shared MedMNIST file, e.g. ``medmnist("breastmnist")``."""
  return f"npz:{data_lib.shared_data_dir() / 'medmnist' / name}.npz"


def _source(digits: bool = False) -> ml_collections.ConfigDict:
  """CIFAR-10 from the shared JPEG npz when present (and not ``digits``), else the digits 0-4."""
  cifar = data_lib.shared_data_dir() / "cifar10" / "cifar10_jpeg.npz"
  if cifar.is_file() and not digits:
    s = common.training(dataset=f"npz:{cifar}", batch_size=128, epochs=30, learning_rate=0.05,
                        schedule="cosine", augment="crop_flip")
    s.classes = None
  else:
    s = common.training(dataset="digits", image_size=16, batch_size=64, epochs=10,
                        learning_rate=0.05, schedule="cosine")
    s.classes = _DIGITS_SOURCE_CLASSES
  # The models, their options and dtype, and the seed are the study's (``models``, ``seed``):
  # fields here that nothing read would let ``--config.source.model=...`` pass and do nothing.
  for name in ("model", "model_options", "dtype", "seed"):
    del s[name]
  s.train_fraction = 1.0  # Stratified share of the source training split used to pretrain.
  s.eval_size = 2000  # Test examples scored after pretraining (a stratified random subset).
  # A folder with one pretrained checkpoint per model name (a previous run's pretrain/), used
  # instead of pretraining; None pretrains.
  s.checkpoint_dir = ml_collections.config_dict.placeholder(str)
  return s


def _base() -> ml_collections.ConfigDict:
  """BreastMNIST at the paper's model sizes (CBR-Small, CBR-Tiny, ResNet-50; for an
  accelerator), 3 seeds, the transfusion sweep k = 1..3, a slim top and Gabor filters on
  CBR-Small. The source is CIFAR-10 from the shared ``cifar10_jpeg.npz`` when it is there,
  else the digits."""
  c = common.training(dataset=medmnist("breastmnist"), model="cbr_small", batch_size=32,
                      epochs=30, learning_rate=0.01, schedule="constant")
  c.models = ("cbr_small", "cbr_tiny", "resnet50")
  c.widths = (None, None, None)  # Each model's width option; None: the architecture's.
  c.target_classes = None  # A class subset of the target, relabelled (digits' held-out task).
  c.val_fraction = 0.15  # Carved out of train for targets without a validation split.
  c.reduced_fraction = 0.15  # The reduced-data regime's share of train; None: full only.
  c.seeds = 3  # Members of each arm, trained as one population.
  c.strategy = None  # Population strategy; None: population.default_strategy.
  c.arms = ("random", "transfer", "meanvar")  # On every model, in both regimes.
  # On ``model`` only, full regime: transfusion of the lowest k units for each k, slim top, Gabor.
  c.sweep_arms = ("transfusion", "slim", "gabor")
  c.transfusion_blocks = (1, 2, 3)
  c.slim_blocks = 2
  c.slim_factor = 2.0  # Units above slim_blocks get 1/slim_factor of their channels.
  # Mean-Var's norm layers: "default" (scale 1, bias 0: the paper's "BN Identity Init", what it
  # uses) or "meanvar" (drawn from the pretrained ones' statistics, its alternative).
  c.meanvar_norm_init = "default"
  c.eval_every_steps = 20
  c.convergence_fraction = 0.95
  c.similarity = ml_collections.ConfigDict()
  c.similarity.probe_size = 200  # Target test images whose activations are compared.
  c.similarity.max_datapoints = 5000  # Per conv layer (positions subsampled).
  c.similarity.keep_variance = 0.99
  c.similarity.methods = ("svcca", "pwcca")  # The figure and findings use the first.
  c.source = _source()
  return c


def _pneumoniamnist() -> ml_collections.ConfigDict:
  """The ``breastmnist`` study on PneumoniaMNIST (the shared reduced copy)."""
  c = _base()
  c.dataset = medmnist("pneumoniamnist_reduced")
  c.epochs = 10
  c.eval_every_steps = 50
  return c


def _breastmnist_cpu() -> ml_collections.ConfigDict:
  """The measurement behind the report's findings, sized for CPUs: CBR-Small and CBR-Tiny at
  width 4 (33k and 17k parameters) vs ResNet-18 at width 8 (175k parameters), pretrained on
  CIFAR-10 at 16x16 for 2 epochs, BreastMNIST for 10 epochs, 2 seeds, Mean-Var on every model,
  no sweep."""
  c = _base()
  c.models = ("cbr_small", "cbr_tiny", "resnet18")
  c.widths = (4, 4, 8)
  c.epochs = 10
  c.seeds = 2
  c.sweep_arms = ()
  c.eval_every_steps = 17  # One epoch of BreastMNIST's 546 images.
  c.source.image_size = 16
  c.source.batch_size = 64
  c.source.epochs = 2  # 1,562 steps of 64 images
  return c


def _digits() -> ml_collections.ConfigDict:
  """The demo: source digits 0-4 (16x16); target BreastMNIST downsized to 16x16 when the shared
  data is present, else the held-out digits 5-9 (5-way, so its AUC is one-vs-rest); CBR-Tiny at
  width 4 with every arm, ResNet-18 at width 4 with the main arms; 5 epochs; SVCCA only."""
  c = _base()
  c.model = "cbr_tiny"
  c.models = ("cbr_tiny", "resnet18")
  c.widths = (4, 4)
  c.seeds = 2
  c.transfusion_blocks = (1, 2)
  c.epochs = 5
  c.eval_every_steps = 17
  c.image_size = 16  # BreastMNIST downsized too: a third of the compute of 28x28.
  if not (data_lib.shared_data_dir() / "medmnist" / "breastmnist.npz").is_file():
    c.dataset = "digits"
    c.target_classes = _DIGITS_TARGET_CLASSES
  c.source = _source(digits=True)
  c.similarity.probe_size = 150
  c.similarity.methods = ("svcca",)
  return c


def _small() -> ml_collections.ConfigDict:
  """The tests' (offline): digits 0-4 -> digits 5-9 at 8x8, CBR-Tiny at width 2 with every
  arm, 2 seeds."""
  c = _digits()
  c.dataset = "digits"
  c.image_size = 8
  c.target_classes = _DIGITS_TARGET_CLASSES
  c.models = ("cbr_tiny",)
  c.widths = (2,)
  c.transfusion_blocks = (1,)
  c.epochs = 4
  c.eval_every_steps = 12
  c.source.image_size = 8
  c.source.epochs = 3
  c.similarity.probe_size = 100
  c.similarity.methods = ("svcca", "pwcca")
  return c


PRESETS = {"breastmnist": _base, "pneumoniamnist": _pneumoniamnist,
           "breastmnist_cpu": _breastmnist_cpu, "digits": _digits, "small": _small}


def get_config(preset: str = "digits") -> ml_collections.ConfigDict:
  return common.select(PRESETS, preset)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """One architecture of the study: registry name and options (width, dtype, ...)."""
  name: str
  options: dict[str, Any]

  def build(self, num_classes: int, **overrides: Any):
    return models.get_model(self.name, num_classes=num_classes, **{**self.options, **overrides})

  @property
  def block_names(self) -> tuple[str, ...]:
    return tuple(self.build(2).block_names)


def arms_of(config: ml_collections.ConfigDict, spec: ModelSpec,
            regime: str) -> list[transfusion.Arm]:
  """One population's arms: the main arms, plus the sweep on ``config.model`` (full only; the
  slim arm trains apart, see :func:`slim_arm`)."""
  arms = [transfusion.Arm(kind) for kind in config.arms]
  if spec.name == config.model and regime == "full":
    if "transfusion" in config.sweep_arms:
      arms += [transfusion.Arm("transfusion", k) for k in config.transfusion_blocks]
    if "gabor" in config.sweep_arms and "gabor" not in config.arms:
      arms.append(transfusion.Arm("gabor"))
  return arms


def slim_arm(config: ml_collections.ConfigDict, spec: ModelSpec,
             regime: str) -> transfusion.Arm | None:
  if spec.name == config.model and regime == "full" and "slim" in config.sweep_arms:
    return transfusion.Arm("slim", config.slim_blocks)
  return None


def _check_blocks(arm: str, num_blocks: Any, spec: ModelSpec, minimum: int) -> None:
  units = len(transfusion.transfer_units(spec.block_names))
  if isinstance(num_blocks, bool) or not isinstance(num_blocks, numbers.Integral) or \
      not minimum <= num_blocks <= units:
    raise UserError(f"{arm} num_blocks={num_blocks!r}; expected an int in [{minimum}, {units}] "
                    f"(the network has {units} units below the head)")


def check_config(config: ml_collections.ConfigDict) -> list[ModelSpec]:
  """Raises UserError for a bad field before anything is loaded; returns the model specs."""
  checks.check_training(config)
  checks.check_training(config.source, "source.")
  for name, value in (("source.eval_size", config.source.eval_size), ("seeds", config.seeds),
                      ("eval_every_steps", config.eval_every_steps),
                      ("similarity.probe_size", config.similarity.probe_size)):
    checks.check_int(name, value)
  for name, value in (("source.train_fraction", config.source.train_fraction),
                      ("convergence_fraction", config.convergence_fraction),
                      ("similarity.keep_variance", config.similarity.keep_variance)):
    checks.check_number(name, value, 0, 1, strict=True)
  checks.check_val_fraction("val_fraction", config.val_fraction)
  checks.check_names("models", config.models, models.list_models(),
                     repeat="each model trains once")
  checks.check_sequence("widths", config.widths)
  if len(config.models) != len(config.widths):
    raise UserError(f"models={tuple(config.models)!r} and widths={tuple(config.widths)!r}; "
                    "expected one width (or None) per model")
  specs = []
  for name, width in zip(config.models, config.widths):
    if width is not None:
      checks.check_int("widths entry", width)
    specs.append(ModelSpec(name, build.model_options(
        config, **({} if width is None else {"width": width}))))
    specs[-1].build(2)  # Unknown options fail here, before any data is loaded.
  for field, allowed in (("arms", MAIN_ARMS), ("sweep_arms", SWEEP_ARMS)):
    checks.check_names(field, config[field], allowed, repeat="it would train identical members",
                       nonempty=field == "arms")
  if config.sweep_arms and config.model not in config.models:
    raise UserError(f"model={config.model!r} (the sweep model) is not among models="
                    f"{tuple(config.models)!r}")
  if "transfusion" in config.sweep_arms:
    checks.check_sequence("transfusion_blocks", config.transfusion_blocks)
    for num_blocks in config.transfusion_blocks:
      _check_blocks("transfusion", num_blocks, specs[config.models.index(config.model)], 0)
    checks.check_distinct("transfusion_blocks", config.transfusion_blocks,
                          "it would train identical members")
  if "slim" in config.sweep_arms:
    _check_blocks("slim", config.slim_blocks, specs[config.models.index(config.model)], 1)
    checks.check_number("slim_factor", config.slim_factor, 1)
  if "random" not in config.arms:
    raise UserError(f"arms={tuple(config.arms)!r}; 'random' is the baseline and must be one")
  if config.meanvar_norm_init not in transfusion.NORM_INITS:
    raise UserError(f"unknown meanvar_norm_init {config.meanvar_norm_init!r}; known: "
                    f"{', '.join(transfusion.NORM_INITS)}")
  checks.check_population_options(config)
  if config.reduced_fraction is not None:
    checks.check_number("reduced_fraction", config.reduced_fraction, 0, 1, strict=True)
    if config.reduced_fraction == 1:
      raise UserError("reduced_fraction=1 is the full regime; expected a value in (0, 1) or None")
  sizes = {}  # Of the populations that run.
  for spec in specs:
    for regime in REGIMES[:1 if config.reduced_fraction is None else 2]:
      sizes[f"{spec.name} {regime} (arms x seeds)"] = len(arms_of(config, spec, regime)) * \
          config.seeds
      if slim_arm(config, spec, regime) is not None:
        sizes[f"{spec.name} {regime} slim (seeds)"] = config.seeds
  checks.check_population_sizes(config, sizes)
  settings = config.similarity
  if (isinstance(settings.methods, str) or not settings.methods
      or set(settings.methods) - set(similarity.METHODS)):
    raise UserError(f"similarity.methods={settings.methods!r}; expected one or more of "
                    f"{', '.join(similarity.METHODS)} (the figure and findings use the first)")
  if settings.max_datapoints is not None:
    checks.check_int("similarity.max_datapoints", settings.max_datapoints)
  return specs
