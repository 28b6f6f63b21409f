"""Transfusion (Raghu, Zhang, Kleinberg, Bengio; NeurIPS 2019): how a network starts its training.

Every initialization arm here is a pure function of variable pytrees ``{"params": ...,
"batch_stats": ...}`` (``batch_stats`` empty for models without BatchNorm): the ``pretrained``
variables of a source model, already adapted to the target's input channels
(:func:`adapt_input_channels`), and the ``fresh`` random variables of the target model, whose
classifier (``head``) every arm keeps, since the target has its own classes.

Arms (:class:`Arm`, built by :func:`initialize`):

- ``random``: the fresh variables.
- ``transfer``: every unit below the head copied from the pretrained model (params and running
  statistics), the head random.
- ``transfusion`` (``num_blocks = k``): only the lowest k units copied, the rest random.
- ``slim`` (``num_blocks = k``): the lowest k units copied into a model whose upper units are
  narrower (random), built with the model option ``unit_widths`` from :func:`slim_unit_widths`.
- ``meanvar``: every pretrained tensor replaced by i.i.d. draws from N(mu, sigma^2) with that
  tensor's own mean and variance (:func:`mean_var_init`). BatchNorm choice: the affine ``scale``
  and ``bias`` of norm layers are tensors like any other and are redrawn the same way
  (``norm_init="meanvar"``, the default), or keep the fresh init (``"default"``: scale 1,
  bias 0). Running statistics always restart from the fresh ones (mean 0, variance 1): the
  pretrained ones describe activations of weights that no longer exist.
- ``gabor``: the fresh variables with the first conv replaced by synthetic Gabor filters
  (:func:`gabor_filters`) scaled to the fresh kernel's standard deviation, so that only the
  filters' structure differs from random init.

Units: a network's top-level modules (``model.block_names``, stem first, head last) grouped so
that a norm module belongs to the module before it (``stem`` + ``stem_norm`` is unit 1); the head
is never a unit. :func:`transfer_units` gives them; "the lowest k blocks" means the first k.

Grayscale: MedMNIST targets have one channel, CIFAR-10 sources three. A network pretrained on RGB
sees a gray image as the same gray value in each channel, so its first conv on the target is
the pretrained kernel summed over its input channels (:func:`adapt_input_channels`): exactly the
usual "repeat the gray channel three times", without tripling the input.

Convergence (:func:`steps_to_threshold`, :func:`speedup`) is the number of training steps until
the validation ROC-AUC first reaches a threshold, and its ratio against random init.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxtickets import data as data_lib
from jaxtickets import errors, tickets
from jaxtickets.errors import UserError

PyTree = Any
Variables = Mapping[str, PyTree]  # {"params": ..., "batch_stats": ...}

ARM_KINDS = ("random", "transfer", "transfusion", "slim", "meanvar", "gabor")
# Arms that take a number of pretrained units.
_BLOCK_ARMS = ("transfusion", "slim")
NORM_INITS = ("meanvar", "default")
HEAD = "head"


# ----------------------------------------------------------------------------------------------
# Units


def transfer_units(block_names: Sequence[str]) -> tuple[tuple[str, ...], ...]:
  """The transferable units of a network, lowest first.

  Args:
    block_names: the model's ``block_names`` (stem first, head last).

  Returns:
    One tuple of top-level module names per unit; a module whose name contains "norm" joins the
    unit before it, and the head is left out.

  Raises:
    UserError: names that do not start with a non-norm module.
  """
  units: list[list[str]] = []
  for name in block_names:
    if name == HEAD:
      continue
    if "norm" in name:
      if not units:
        raise UserError(f"block_names {tuple(block_names)!r} start with the norm {name!r}")
      units[-1].append(name)
    else:
      units.append([name])
  return tuple(tuple(unit) for unit in units)


def check_num_blocks(num_blocks: Any, block_names: Sequence[str], *, arm: str = "transfusion",
                     minimum: int = 0) -> int:
  """``num_blocks`` as an int in [minimum, number of units]; UserError otherwise."""
  num_units = len(transfer_units(block_names))
  if isinstance(num_blocks, bool) or not isinstance(num_blocks, (int, np.integer)) or \
      not minimum <= num_blocks <= num_units:
    raise UserError(f"{arm} num_blocks={num_blocks!r}; expected an int in [{minimum}, "
                    f"{num_units}] (the network has {num_units} units below the head)")
  return int(num_blocks)


def lowest_modules(block_names: Sequence[str], num_blocks: int) -> tuple[str, ...]:
  """Top-level module names of the lowest ``num_blocks`` units (checked, see above)."""
  num_blocks = check_num_blocks(num_blocks, block_names)
  return tuple(name for unit in transfer_units(block_names)[:num_blocks] for name in unit)


# ----------------------------------------------------------------------------------------------
# Initialization arms


@dataclasses.dataclass(frozen=True)
class Arm:
  """One way to start training on the target.

  Attributes:
    kind: one of :data:`ARM_KINDS`.
    num_blocks: pretrained units of "transfusion" and "slim" (None for the other kinds).
  """
  kind: str
  num_blocks: int | None = None

  def __post_init__(self):
    if self.kind not in ARM_KINDS:
      raise UserError(f"unknown arm {self.kind!r}; known: {', '.join(ARM_KINDS)}")
    if (self.kind in _BLOCK_ARMS) != (self.num_blocks is not None):
      raise UserError(f"arm {self.kind!r} takes num_blocks={self.num_blocks!r}; arms "
                      f"{' and '.join(_BLOCK_ARMS)} need an int, the others none")

  @property
  def name(self) -> str:
    """``"transfusion_k2"`` for a transfusion of 2 units; the kind for unnumbered arms."""
    return self.kind if self.num_blocks is None else f"{self.kind}_k{self.num_blocks}"


def copy_modules(source: PyTree, target: PyTree, names: Sequence[str], *,
                 what: str = "pretrained") -> PyTree:
  """``target`` with its top-level entries ``names`` taken from ``source``.

  Args:
    source: a variable collection (params or batch_stats) keyed by top-level module.
    target: the same collection of the network being initialized.
    names: the modules to copy; a name absent from both (a norm-free module's batch_stats) is
      skipped.
    what: how ``source`` is named in messages.

  Raises:
    UserError: a module in only one of the two trees, or with other leaves or shapes.
  """
  copied = dict(target)
  for name in names:
    if name not in source and name not in target:
      continue
    if name not in source or name not in target:
      raise UserError(f"module {name!r} is in {'the target' if name in target else what} "
                      f"variables only; are they the same architecture?")
    tickets.check_matches(target[name], source[name], what=f"{what} module {name!r}",
                          reference_name="the target's")
    copied[name] = source[name]
  return copied


def transfuse(pretrained: Variables, fresh: Variables, block_names: Sequence[str],
              num_blocks: int) -> dict[str, PyTree]:
  """The lowest ``num_blocks`` units from ``pretrained`` (params and running statistics), the
  rest (and the head) from ``fresh``.

  Args:
    pretrained: source variables, input channels already adapted.
    fresh: the target network's random variables.
    block_names: the target model's ``block_names``.
    num_blocks: k in [0, number of units]; 0 is random init, all units is full transfer.

  Raises:
    UserError: k out of range, or copied modules whose leaves differ.
  """
  names = lowest_modules(block_names, num_blocks)
  return {collection: copy_modules(pretrained.get(collection, {}), tree, names)
          for collection, tree in fresh.items()}


def full_transfer(pretrained: Variables, fresh: Variables,
                  block_names: Sequence[str]) -> dict[str, PyTree]:
  """Every unit below the head from ``pretrained``; the head from ``fresh``."""
  return transfuse(pretrained, fresh, block_names, len(transfer_units(block_names)))


def _path_names(path: tuple) -> tuple[str, ...]:
  """Dict keys of a ``tree_flatten_with_path`` path."""
  return tuple(str(getattr(entry, "key", entry)) for entry in path)


def _is_norm_leaf(path: tuple) -> bool:
  return any("norm" in name for name in _path_names(path)[:-1])


def mean_var_init(key: jax.Array, pretrained: Variables, fresh: Variables, *,
                  norm_init: str = "meanvar") -> dict[str, PyTree]:
  """Mean-Var init: each pretrained tensor redrawn i.i.d. from N(its mean, its variance).

  Args:
    key: PRNG key of one standard-normal draw cut into the leaves.
    pretrained: source variables (input channels adapted), same modules as ``fresh``.
    fresh: the target network's random variables; its head and running statistics are kept.
    norm_init: "meanvar" (norm scale/bias redrawn like every tensor) or "default" (norm
      scale/bias from ``fresh``); see the module docstring.

  Returns:
    ``{"params": ..., "batch_stats": fresh["batch_stats"]}``. A tensor of one element keeps its
    value (its variance is 0). Jit- and vmap-safe (over ``key``).

  Raises:
    UserError: unknown ``norm_init``, or pretrained modules that differ from the fresh ones.
  """
  if norm_init not in NORM_INITS:
    raise UserError(f"unknown Mean-Var norm_init {norm_init!r}; known: {', '.join(NORM_INITS)}")
  fresh_params = fresh["params"]
  body = [name for name in fresh_params if name != HEAD]
  params = copy_modules(pretrained["params"], fresh_params, body)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  # One draw for the whole tree: a PRNG call per leaf costs XLA:CPU ~0.4 s of compile each.
  sizes = [leaf.size for _, leaf in leaves]
  noise = jax.random.normal(key, (sum(sizes),), jnp.float32)
  offsets = np.cumsum([0, *sizes])

  def redraw(index: int, path: tuple, leaf: jax.Array, fresh_leaf: jax.Array) -> jax.Array:
    if _path_names(path)[0] == HEAD or (norm_init == "default" and _is_norm_leaf(path)):
      return fresh_leaf
    standard = noise[offsets[index]:offsets[index + 1]].reshape(leaf.shape).astype(leaf.dtype)
    return jnp.mean(leaf) + jnp.std(leaf) * standard

  drawn = [redraw(index, path, leaf, fresh_leaf) for index, ((path, leaf), fresh_leaf)
           in enumerate(zip(leaves, jax.tree.leaves(fresh_params)))]
  return {**fresh, "params": jax.tree_util.tree_unflatten(treedef, drawn)}


def gabor_filters(key: jax.Array, kernel_shape: Sequence[int], *, std: float | jax.Array = 1.0
                  ) -> jax.Array:
  """Random Gabor filters as a conv kernel.

  Filter o is ``exp(-(u^2 + (g v)^2) / (2 s^2)) * cos(2 pi u / lam + phase)`` on pixel offsets
  from the kernel centre, with ``u, v`` rotated by a uniform orientation, wavelength ``lam`` in
  [2, max(2, k)], envelope width ``s`` in [k/6, k/3], aspect ``g`` in [0.5, 1] and a uniform
  phase: oriented edge and bar detectors like those a trained first layer learns. Every input
  channel gets the same filter (a luminance detector); the whole kernel is shifted to mean 0 and
  scaled to standard deviation ``std``.

  Args:
    key: PRNG key.
    kernel_shape: (k_h, k_w, C_in, C_out).
    std: standard deviation of the returned kernel.

  Returns:
    f32[k_h, k_w, C_in, C_out].
  """
  if len(kernel_shape) != 4:
    raise UserError(f"gabor kernel_shape={tuple(kernel_shape)!r}; expected (k_h, k_w, C_in, "
                    "C_out)")
  height, width, in_channels, out_channels = kernel_shape
  size = max(height, width)
  # (low, high) of orientation, wavelength, envelope width, aspect and phase; one draw for all.
  low, high = np.array([(0.0, math.pi), (2.0, max(2.0, size)), (size / 6, size / 3), (0.5, 1.0),
                        (0.0, 2 * math.pi)], np.float32).T
  draws = jax.random.uniform(key, (out_channels, 5), minval=low, maxval=high)
  theta, wavelength, sigma, aspect, phase = draws.T
  rows = jnp.arange(height, dtype=jnp.float32)[:, None, None] - (height - 1) / 2
  columns = jnp.arange(width, dtype=jnp.float32)[None, :, None] - (width - 1) / 2
  along = columns * jnp.cos(theta) + rows * jnp.sin(theta)
  across = -columns * jnp.sin(theta) + rows * jnp.cos(theta)
  envelope = jnp.exp(-(along**2 + (aspect * across) ** 2) / (2 * sigma**2))
  filters = envelope * jnp.cos(2 * math.pi * along / wavelength + phase)  # [k_h, k_w, C_out]
  kernel = jnp.broadcast_to(filters[:, :, None, :], tuple(kernel_shape))
  kernel = kernel - jnp.mean(kernel)
  return kernel * (std / jnp.maximum(jnp.std(kernel), 1e-12))


def gabor_init(key: jax.Array, fresh: Variables) -> dict[str, PyTree]:
  """``fresh`` with the first conv (``stem``) kernel replaced by :func:`gabor_filters` of the
  fresh kernel's standard deviation."""
  params = dict(fresh["params"])
  kernel = params["stem"]["kernel"]
  params["stem"] = {**params["stem"],
                    "kernel": gabor_filters(key, kernel.shape, std=jnp.std(kernel))}
  return {**fresh, "params": params}


def initialize(arm: Arm, key: jax.Array, pretrained: Variables | None, fresh: Variables,
               block_names: Sequence[str], *, norm_init: str = "meanvar") -> dict[str, PyTree]:
  """The starting variables of ``arm``.

  Args:
    arm: the arm.
    key: PRNG key of the arm's own randomness (Mean-Var draws, Gabor filters).
    pretrained: adapted source variables (unused by "random" and "gabor"; may be None there).
    fresh: the target network's random variables (for "slim": of the slim network).
    block_names: the target model's ``block_names``.
    norm_init: Mean-Var's BatchNorm choice, see :func:`mean_var_init`.

  Returns:
    ``{"params": ..., "batch_stats": ...}`` shaped like ``fresh``.
  """
  if arm.kind == "random":
    return dict(fresh)
  if arm.kind == "gabor":
    return gabor_init(key, fresh)
  if pretrained is None:
    raise UserError(f"arm {arm.name!r} needs pretrained variables")
  if arm.kind == "transfer":
    return full_transfer(pretrained, fresh, block_names)
  if arm.kind == "meanvar":
    return mean_var_init(key, pretrained, fresh, norm_init=norm_init)
  minimum = 1 if arm.kind == "slim" else 0
  check_num_blocks(arm.num_blocks, block_names, arm=arm.kind, minimum=minimum)
  return transfuse(pretrained, fresh, block_names, arm.num_blocks)


def unit_widths(params: PyTree, block_names: Sequence[str]) -> tuple[int, ...]:
  """Output channels of every unit: those of the first kernel (in path order) of its first
  module, i.e. a CBR unit's conv or a residual block's planes."""
  widths = []
  for unit in transfer_units(block_names):
    kernels = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params[unit[0]])
               if _path_names(path)[-1] == "kernel"]
    if not kernels:
      raise UserError(f"module {unit[0]!r} has no kernel to read its width from")
    widths.append(int(kernels[0].shape[-1]))
  return tuple(widths)


def slim_unit_widths(params: PyTree, block_names: Sequence[str], num_blocks: int,
                     factor: float) -> tuple[int, ...]:
  """The ``unit_widths`` model option of a slim top: the lowest ``num_blocks`` units at their
  widths, every unit above divided by ``factor`` (at least 1 channel).

  Raises:
    UserError: ``num_blocks`` outside [1, units] or ``factor`` < 1.
  """
  num_blocks = check_num_blocks(num_blocks, block_names, arm="slim", minimum=1)
  errors.check_number("slim factor", factor, 1)
  widths = unit_widths(params, block_names)
  return widths[:num_blocks] + tuple(max(1, round(width / factor))
                                     for width in widths[num_blocks:])


# ----------------------------------------------------------------------------------------------
# Grayscale, datasets


def adapt_input_channels(params: PyTree, in_channels: int) -> PyTree:
  """``params`` with the ``stem`` kernel f32[k, k, C_src, C_out] made to read ``in_channels``.

  RGB to gray (``in_channels == 1``): the sum over the source channels, which equals repeating
  the gray image in every channel. Gray to C channels: the kernel divided by C and repeated,
  which equals the source net seeing the channels' mean. Equal counts: unchanged.

  Raises:
    UserError: any other pair of channel counts.
  """
  kernel = params["stem"]["kernel"]
  source_channels = kernel.shape[-2]
  if source_channels == in_channels:
    return params
  if in_channels == 1:
    adapted = jnp.sum(kernel, axis=-2, keepdims=True)
  elif source_channels == 1:
    adapted = jnp.repeat(kernel / in_channels, in_channels, axis=-2)
  else:
    raise UserError(f"cannot adapt a first conv from {source_channels} to {in_channels} input "
                    "channels; expected equal counts, or one of them 1")
  return {**params, "stem": {**params["stem"], "kernel": adapted}}


def class_subset(dataset: data_lib.Dataset, classes: Sequence[int] | None) -> data_lib.Dataset:
  """The examples of ``classes`` only, relabelled 0.. in the given order (None: unchanged).

  Normalization statistics are kept. Used to split digits into a source task and a held-out
  target task.

  Raises:
    UserError: fewer than 2 classes, repeats, or a class the dataset lacks.
  """
  if classes is None:
    return dataset
  if isinstance(classes, (str, numbers.Number)) or not all(
      isinstance(label, numbers.Integral) and not isinstance(label, bool) for label in classes):
    raise UserError(f"classes={classes!r}; expected a sequence of int labels")
  classes = tuple(int(label) for label in classes)
  if len(classes) < 2 or len(set(classes)) != len(classes) or \
      not all(0 <= label < dataset.num_classes for label in classes):
    raise UserError(f"classes={classes!r}; expected at least 2 distinct labels in "
                    f"[0, {dataset.num_classes}) of {dataset.name}")
  lookup = np.full(dataset.num_classes, -1, np.int32)
  lookup[list(classes)] = np.arange(len(classes))

  def take(split: data_lib.Split | None) -> data_lib.Split | None:
    if split is None:
      return None
    keep = lookup[split.labels] >= 0
    return data_lib.Split(split.images[keep], lookup[split.labels[keep]])

  return dataclasses.replace(dataset, train=take(dataset.train), val=take(dataset.val),
                             test=take(dataset.test), num_classes=len(classes))


# ----------------------------------------------------------------------------------------------
# Convergence


def steps_to_threshold(steps: Sequence[int] | np.ndarray, auc: np.ndarray,
                       threshold: float) -> np.ndarray:
  """First evaluated step at which each run's AUC reaches ``threshold``.

  Args:
    steps: i[T] the evaluation steps, increasing.
    auc: f[T] or f[T, M]: AUC of M runs at those steps.
    threshold: the AUC to reach.

  Returns:
    f64[] or f64[M]: the step, ``inf`` for a run that never reaches it (NaN AUCs never do).
  """
  steps = np.asarray(steps, np.float64)
  auc = np.asarray(auc, np.float64)
  if auc.shape[:1] != steps.shape:
    raise UserError(f"auc has {auc.shape[:1]} evaluations, steps {steps.shape}")
  reached = np.nan_to_num(auc, nan=-np.inf) >= threshold
  first = np.argmax(reached, axis=0)
  return np.where(reached.any(axis=0), steps[first], np.inf)


def speedup(baseline_steps: np.ndarray, arm_steps: np.ndarray) -> float:
  """``mean(baseline_steps) / mean(arm_steps)``: > 1 when the arm converges faster.

  Runs that never reached the threshold count as ``inf``: an arm that never converges has
  speed-up 0, a baseline that never converges gives ``inf`` (NaN when neither does).
  """
  baseline, arm = float(np.mean(baseline_steps)), float(np.mean(arm_steps))
  if math.isinf(baseline) and math.isinf(arm):
    return math.nan
  return baseline / arm
