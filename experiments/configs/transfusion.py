"""Configs for Transfusion (``experiments/transfusion.py``): transfer learning vs random init.

A source model per architecture is pretrained by the runner (CIFAR-10 from the shared
``cifar10_jpeg.npz`` when it is there, else the digits), then every initialization arm trains on
the target, seeds as one population, on the full training split and on a reduced one.

Presets:

- ``breastmnist``, ``pneumoniamnist``: the study at the paper's model sizes (CBR-Small, CBR-Tiny,
  ResNet-50; for an accelerator): BreastMNIST / PneumoniaMNIST from the shared ``medmnist``
  folder (or any official MedMNIST ``.npz`` via ``--set dataset=npz:PATH``), 3 seeds, the
  transfusion sweep k = 1..3, a slim top and Gabor filters on CBR-Small.
- ``breastmnist_cpu``: the measurement behind the report's findings, sized for 2 CPU cores
  (about 11 minutes): CBR-Small and CBR-Tiny at width 4 (33k and 17k parameters) vs ResNet-18 at
  width 8 (175k parameters, 5-10x more), pretrained on CIFAR-10 at 16x16 for 2 epochs,
  BreastMNIST for 10 epochs (170 steps of 32), 2 seeds, Mean-Var on every model, no sweep.
- ``digits``: the demo (under 2 minutes on 2 free cores): source digits 0-4 (16x16),
  target BreastMNIST downsized to 16x16 when the shared data is present, else the held-out
  digits 5-9 (5-way, so its AUC is one-vs-rest); CBR-Tiny at width 4 with every arm, ResNet-18
  at width 4 with the main arms; 5 epochs; SVCCA only.
- ``small``: the tests' (offline, well under a minute): digits 0-4 -> digits 5-9 at 8x8,
  CBR-Tiny at width 2 with every arm, 2 seeds.

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

import ml_collections

from experiments.configs import common
from jaxtickets import data as data_lib

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
  # fields here that nothing read would let ``--set source.model=...`` pass and do nothing.
  for name in ("model", "model_options", "dtype", "seed"):
    del s[name]
  s.train_fraction = 1.0  # Stratified share of the source training split used to pretrain.
  s.eval_size = 2000  # Test examples scored after pretraining (a stratified random subset).
  # A folder with one pretrained checkpoint per model name (a previous run's pretrain/), used
  # instead of pretraining; None pretrains.
  s.checkpoint_dir = ml_collections.config_dict.placeholder(str)
  return s


def _base() -> ml_collections.ConfigDict:
  """BreastMNIST with the paper's model sizes."""
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
  c = _base()
  c.dataset = medmnist("pneumoniamnist_reduced")
  c.epochs = 10
  c.eval_every_steps = 50
  return c


def _breastmnist_cpu() -> ml_collections.ConfigDict:
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
