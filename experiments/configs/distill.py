"""Dataset distillation (``experiments/distill.py``): Acc-DD and its DC, DSA, DM, IDC baselines.

    python -m experiments.distill --config experiments/configs/distill.py:cifar10_ipc10_fast \\
        --workdir runs/distill

Hint: ``--config.method=idc`` (or ``dc``, ``dsa``, ``dm``) runs a baseline on the same preset;
``--config.method_overrides.<field>=...`` overrides any field of the method
(``jaxtickets.distill.methods.Method``; None keeps the method's own value).

Deviations from the reference code (ncsu-dk-lab/Acc-DD, IDC, DC/DSA/DM):
- With ``num_models`` M > 1, each image update averages the matching loss over M nets (vmapped)
  where the reference uses one net per outer iteration; the default number of outer iterations
  is then the method's divided by M (rounded up), so nets x inner iterations stay the same.
- Images are learned in [0, 1] pixel space for every method (DC/DSA/DM learn normalized images;
  their learning rates are converted by std^2) and clipped to [0, 1] once per outer iteration.
- The evaluated set is the decoded set quantized to 8 bits; DC/DSA/DM are evaluated with IDC's
  protocol (not their own) so that every method is measured the same way; the reference's
  "best epoch" (selected on the test set) is not reported.
- DC starts from random real images, as DSA's README runs it (DC's own default is Gaussian
  noise in normalized space); ``method_overrides.init=noise`` starts from IDC's noise.
- Digits have no left-right symmetry, so the digits presets drop ``flip`` from every DSA
  strategy (``flip=False``).
- Real batches are drawn afresh per matching step (IDC walks a per-class shuffle), and the
  ``real``/``mix`` initializations draw each class's images at random (IDC takes the class's
  first ones in dataset order).
- DC's and DSA's nets also train after the last image update of an outer iteration (their code
  skips it; the nets are replaced next anyway); an epoch on the synthetic set is
  ``ceil(size / batch)`` batches of the set's shuffle, which may run into the next permutation.
- Evaluation batches drop the remainder of an epoch; IDC's ``tune_lr_img`` factor
  (size / 32)^2 is not applied (1 on CIFAR).
"""

import dataclasses
import math
from typing import Any

import ml_collections

from experiments import checks
from experiments.configs import common
from jaxtickets.distill import dsa, evaluate, matching, methods, synthetic
from jaxtickets.errors import UserError


def _base() -> ml_collections.ConfigDict:
  """Acc-DD on CIFAR-10 at IPC 10 with the official code's settings (read off
  ncsu-dk-lab/Acc-DD and IDC's reproduce settings): ConvNet-3 (width 128, instance norm,
  avg-pool, PyTorch init), IDC's squared gradient distance over conv kernels, multi-formation
  factor 2 with ``mix`` init, 500 outer x 100 inner iterations, lr_img 1e-2 * ipc / 10
  (momentum 0.5, one step per class in class order), real batch 64 per class, at most 128
  decoded synthetic images per class, nets trained between updates on 2000 real images (32 steps
  of 64) with DSA color + crop and CutMix (p 0.5), a pool of 5 early-stage nets pretrained for 2
  epochs, perturbation magnitudes U(0.01, 0.09). Evaluation: 5 nets, 1000 epochs, batch 64, lr
  x0.2 at 2/3 and 5/6, DSA + CutMix, final test accuracy. The other methods' settings come from
  ``jaxtickets.distill.methods.get_method``."""
  # The training fields are the early-stage pool's pretraining (and the learning rate of the
  # nets during distillation; their momentum and weight decay are the method's): batch 64,
  # 2 epochs, constant lr 0.01 (the reference's schedule never decays within 2 epochs),
  # momentum 0.9, weight decay 5e-4.
  c = common.training(dataset="cifar10", batch_size=64, epochs=2, learning_rate=0.01,
                      schedule="constant")
  # The reference's, for CIFAR-10 and CIFAR-100 alike (std 0.2023, 0.1994, 0.2010): the units of
  # DSA's brightness range and of DC/DSA/DM's image learning rates. The CIFAR sources are TFDS
  # names; dataset="npz:.../cifar10_jpeg.npz" reads the JPEG-packed CIFAR-10.
  c.normalization = "cifar10_common"
  c.method = "acc_dd"
  c.ipc = 10
  c.train_fraction = 1.0  # A stratified share of the real training split (CPU runs).
  c.flip = True  # False: every DSA strategy (matching, nets, evaluation) without its flip.
  # Method fields (jaxtickets.distill.methods.Method); None keeps the method's own value.
  c.method_overrides = ml_collections.ConfigDict(
      {field.name: ml_collections.FieldReference(None, field_type=object)
       for field in dataclasses.fields(methods.Method) if field.name != "name"})
  c.outer_iterations = None  # None: the method's, divided by num_models.
  c.num_models = 1  # Nets matched together per outer iteration (vmapped).
  c.pool_size = 5  # Acc-DD's early-stage nets.
  c.perturb_magnitude = (0.01, 0.09)
  c.checkpoint_every = 10  # Outer iterations between checkpoints of the synthetic set.
  # IDC/Acc-DD: train the nets of this many outer iterations first, as one population, then
  # run their matching steps against the kept snapshots (the same computation, reordered; see
  # jaxtickets.distill.methods.make_distill_step). None: interleaved, one inner iteration per
  # step. Must divide the outer iterations and checkpoint_every.
  c.trajectory_chunk = None
  # How the matching runs the nets and the classes ("vmap", "map", "unroll"; see
  # jaxtickets.distill.matching.matching_losses); model_map None: map on CPU, vmap elsewhere.
  # With XLA's convolutions a vmap groups them; model_options.conv_impl="im2col" makes them
  # batched matrix products instead (jaxtickets/models/conv.py).
  c.model_map = None
  c.class_map = "unroll"
  c.strategy = None  # Population strategy of the nets; None: the measured default.
  c.chunk_size = None

  c.eval = ml_collections.ConfigDict()
  c.eval.num_nets = 5
  c.eval.epochs = 1000
  c.eval.batch_size = 64
  c.eval.learning_rate = 0.01
  c.eval.momentum = 0.9
  c.eval.weight_decay = 5e-4
  c.eval.strategy = "color_crop_flip_scale_rotate"  # cutout is dropped since CutMix is on
  c.eval.mix_probability = 0.5
  c.eval.checkpoint_every = 100  # epochs
  c.eval.random_baseline = True  # Also evaluate IPC random real images per class.
  return c


def _preset(dataset: str, ipc: int):
  def build() -> ml_collections.ConfigDict:
    c = _base()
    c.dataset = dataset
    c.ipc = ipc
    return c
  return build


def _cifar10_ipc10_fast() -> ml_collections.ConfigDict:
  """``cifar10_ipc10`` for a GPU: bfloat16 nets, the nets of 20 outer iterations trained as one
  population before their matching steps (``trajectory_chunk``), the classes of a matching step
  vmapped and im2col convolutions (vmapped nets and classes become batched matrix products).
  Apart from bfloat16 the same computation as ``cifar10_ipc10``, reordered and batched; its
  ``method`` is ``acc_dd`` or ``idc`` (``trajectory_chunk`` needs nets trained on the real
  data)."""
  c = _preset("cifar10", 10)()
  c.dtype = "bfloat16"
  c.trajectory_chunk = 20  # Divides the 500 outer iterations and checkpoint_every.
  c.checkpoint_every = 20
  c.class_map = "vmap"
  c.model_options.conv_impl = "im2col"
  return c


def _digits() -> ml_collections.ConfigDict:
  """The demo's CPU run: Acc-DD on the 16x16 digits, IPC 10, ConvNet-3 of width 16, 8 outer x 10
  inner iterations with 2 net steps each, a pool of 3 nets, 4 evaluation nets x 150 epochs."""
  c = _base()
  c.dataset = "digits"
  c.normalization = "dataset"
  c.image_size = 16
  c.model_options.width = 16
  c.outer_iterations = 8
  c.method_overrides.inner_iterations = 10
  c.method_overrides.net_steps = 2
  c.pool_size = 3
  c.checkpoint_every = 4
  c.eval.num_nets = 4
  c.eval.epochs = 150
  c.eval.checkpoint_every = 50
  c.flip = False  # Digits are not mirror-symmetric.
  return c


def _cifar10_subset() -> ml_collections.ConfigDict:
  """Acc-DD vs IDC on CPU: the ``digits`` schedule on a stratified 10% of CIFAR-10's training
  split at 32x32, full test split, flips on, IDC-I's start (``init=real``, factor 1: the stored
  set starts as the random-real baseline) and lr_img 1e-2 for IDC and Acc-DD alike; 20 outer
  iterations (``--config.method=idc --config.outer_iterations=80`` for the 4x longer IDC run),
  4 eval nets x 100 epochs."""
  c = _digits()
  c.dataset = "cifar10"
  c.normalization = "cifar10_common"
  c.train_fraction = 0.1
  c.image_size = None  # CIFAR-10 as stored (32x32); the digits preset resizes to 16.
  c.outer_iterations = 20
  c.method_overrides.factor = 1
  c.method_overrides.init = "real"
  c.method_overrides.image_lr = 1e-2
  c.flip = True
  c.eval.epochs = 100
  return c


def _small() -> ml_collections.ConfigDict:
  """The tests' run: IPC 2, width 8, 8x8 digits, 2 outer x 2 inner iterations, 2 nets evaluated
  for 3 epochs."""
  c = _digits()
  c.image_size = 8
  c.ipc = 2
  c.model_options.width = 8
  c.outer_iterations = 2
  c.method_overrides.inner_iterations = 2
  c.method_overrides.net_steps = 1
  c.pool_size = 2
  c.epochs = 1
  c.checkpoint_every = 1
  c.class_map = "vmap"  # A few steps only: the smaller compile wins.
  c.eval.num_nets = 2
  c.eval.epochs = 3
  c.eval.checkpoint_every = 1
  return c


PRESETS = {
    "cifar10_ipc1": _preset("cifar10", 1), "cifar10_ipc10": _preset("cifar10", 10),
    "cifar10_ipc50": _preset("cifar10", 50), "cifar100_ipc1": _preset("cifar100", 1),
    "cifar100_ipc10": _preset("cifar100", 10), "cifar100_ipc50": _preset("cifar100", 50),
    "cifar10_ipc10_fast": _cifar10_ipc10_fast,
    "digits": _digits, "cifar10_subset": _cifar10_subset, "small": _small,
}


def get_config(preset: str = "digits") -> ml_collections.ConfigDict:
  return common.select(PRESETS, preset)


def without_flip(strategy: str) -> str:
  """A DSA strategy's text without its flip (``flip`` off)."""
  return "_".join(op for op in strategy.split("_") if op != "flip") or "none"


def outer_iterations(config: ml_collections.ConfigDict, method: methods.Method) -> int:
  """``config.outer_iterations``, or the method's divided by ``num_models`` (same model-steps)."""
  if config.outer_iterations is not None:
    return config.outer_iterations
  return math.ceil(method.outer_iterations / config.num_models)


# Method fields that take one of a few names.
_METHOD_NAMES = {"objective": methods.OBJECTIVES, "models": methods.MODEL_SOURCES,
                 "net_data": methods.NET_DATA, "net_unit": methods.NET_UNITS,
                 "image_lr_space": methods.LR_SPACES, "image_updates": methods.IMAGE_UPDATES,
                 "init": synthetic.INITS}


def _check_strategy(text: Any, composition: Any) -> None:
  if not isinstance(text, str):
    raise UserError(f"DSA strategy {text!r} is not a string like 'color_crop_cutout'")
  dsa.Strategy.parse(text, composition)


def check_method(method: methods.Method) -> None:
  """Raises UserError for a method (with its overrides) the library cannot run."""
  for field, known in _METHOD_NAMES.items():
    if getattr(method, field) not in known:
      raise UserError(f"unknown {field} {getattr(method, field)!r} for method {method.name!r}; "
                      f"known: {', '.join(known)}")
  matching.get_gradient_distance(method.distance)
  _check_strategy(method.match_strategy, method.match_composition)
  _check_strategy(method.net_strategy, method.net_composition)
  for field in ("factor", "outer_iterations", "inner_iterations", "real_batch",
                "synthetic_max", "net_batch"):
    checks.check_int(field, getattr(method, field))
  checks.check_int("net_steps", method.net_steps, 0)
  if method.perturb and method.models != "pool":
    raise UserError(f"perturb=True perturbs the early-stage pool's nets; method "
                    f"{method.name!r} draws models={method.models!r}")
  if method.net_unit == "epoch" and method.net_data != "synthetic":
    raise UserError(f"net_unit 'epoch' counts passes over the synthetic set; method "
                    f"{method.name!r} trains its nets on {method.net_data!r}")
  checks.check_number("image_lr", method.image_lr, 0, strict=True)
  checks.check_number("net_weight_decay", method.net_weight_decay, 0)
  for field in ("image_momentum", "net_momentum", "net_mix_probability"):
    checks.check_number(field, getattr(method, field), 0, 1)


def check_config(config: ml_collections.ConfigDict) -> methods.Method:
  """Raises UserError for settings that are wrong before any data is read.

  Returns:
    The config's method with its non-None ``method_overrides``, without flips in its DSA
    strategies where ``config.flip`` is off.
  """
  checks.check_training(config)
  checks.check_int("ipc", config.ipc)
  overrides = {name: value for name, value in config.method_overrides.to_dict().items()
               if value is not None}
  method = methods.get_method(config.method, config.ipc, **overrides)
  check_method(method)
  if not config.flip:
    method = dataclasses.replace(method, match_strategy=without_flip(method.match_strategy),
                                 net_strategy=without_flip(method.net_strategy))
  checks.check_population_options(config)
  for name in ("num_models", "pool_size", "checkpoint_every"):
    checks.check_int(name, config[name])
  # (A trajectory_chunk's C x num_models nets split wherever num_models does.)
  checks.check_population_sizes(config, {"num_models": config.num_models, **(
      {"the early-stage pool (pool_size)": config.pool_size} if method.models == "pool" else {})})
  checks.check_number("train_fraction", config.train_fraction, 0, 1, strict=True)
  if config.outer_iterations is not None:
    checks.check_int("outer_iterations", config.outer_iterations)
  if config.trajectory_chunk is not None:
    checks.check_int("trajectory_chunk", config.trajectory_chunk)
    methods.check_trajectory_chunk(method)
    for name, count in (("outer iterations", outer_iterations(config, method)),
                        ("checkpoint_every", config.checkpoint_every)):
      if count % config.trajectory_chunk:
        raise UserError(f"trajectory_chunk={config.trajectory_chunk} must divide the "
                        f"{name} ({count})")
  for field, allowed in (("model_map", (None, *matching.MAP_STRATEGIES)),
                         ("class_map", matching.MAP_STRATEGIES)):
    if config[field] not in allowed:
      raise UserError(f"{field}={config[field]!r}; known: {', '.join(matching.MAP_STRATEGIES)}")
  magnitude = config.perturb_magnitude
  try:
    low, high = (float(value) for value in magnitude)
  except (TypeError, ValueError):
    raise UserError(f"perturbation magnitude {magnitude!r}; expected (low, high)") from None
  if not 0 <= low <= high:
    raise UserError(f"perturbation magnitude {magnitude!r}; expected 0 <= low <= high")
  settings = config.eval
  for field in ("num_nets", "epochs", "batch_size", "checkpoint_every"):
    checks.check_int(f"evaluation {field}", settings[field])
  checks.check_number("evaluation learning_rate", settings.learning_rate, 0, strict=True)
  checks.check_number("evaluation weight_decay", settings.weight_decay, 0)
  for field in ("momentum", "mix_probability"):
    checks.check_number(f"evaluation {field}", settings[field], 0, 1)
  _check_strategy(settings.strategy, evaluate.Protocol.composition)
  return method
