"""Transfusion (Raghu, Zhang, Kleinberg, Bengio; NeurIPS 2019): how a network starts training.

The paper's pieces and their functions, all on variable pytrees ``{"params": ...,
"batch_stats": ...}`` (``batch_stats`` empty without BatchNorm):

- Transfer learning vs random init: :func:`initialize` of an :class:`Arm`, "transfer" or
  "random" (every arm keeps the target's fresh classifier, ``head``); the arms x seeds of one
  experiment as one population: :func:`initialize_population`.
- Transfusion of the lowest k blocks, the rest random: :func:`transfuse`, arm
  "transfusion"; the slim top, the lowest k blocks under narrower random ones: the model option
  ``unit_widths`` from :func:`slim_unit_widths`, arm "slim".
- Mean-Var init, each pretrained tensor redrawn i.i.d. from N(its mean, its variance):
  :func:`mean_var_init`, arm "meanvar". Norm layers' ``scale`` and ``bias`` are redrawn like
  every tensor (``norm_init="meanvar"``) or keep the fresh init (``"default"``: the paper's "BN
  Identity Init"); running statistics always restart fresh, as they describe activations of
  weights that no longer exist.
- Synthetic Gabor filters as the first conv: :func:`gabor_filters`, :func:`gabor_init`,
  arm "gabor": the fresh kernel's standard deviation, so only the filters' structure differs.
- Convergence speed-up: :func:`steps_to_threshold` (steps until the validation AUC first
  reaches a threshold) and :func:`speedup` (its ratio against random init).

Units (the paper's "blocks"): a network's top-level modules (``model.block_names``, stem first,
head last), a norm module joined to the module before it (``stem`` + ``stem_norm`` is unit 1);
the head is never a unit. :func:`transfer_units` gives them.

Grayscale targets read RGB-pretrained first convs summed over input channels
(:func:`adapt_input_channels`): exactly "repeat the gray channel three times", without tripling
the input. :func:`class_subset` splits a dataset into source and held-out target classes.

Representational analysis: each unit's output (:func:`unit_outputs`) compared by SVCCA/PWCCA
(:mod:`jaxtickets.similarity`) before vs after training.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxtickets import data as data_lib
from jaxtickets import models

PyTree = Any
Variables = Mapping[str, PyTree]  # {"params": ..., "batch_stats": ...}

ARM_KINDS = ("random", "transfer", "transfusion", "slim", "meanvar", "gabor")
NORM_INITS = ("meanvar", "default")
_HEAD = "head"


def transfer_units(block_names: Sequence[str]) -> tuple[tuple[str, ...], ...]:
  """The transferable units of a network, lowest first.

  Args:
    block_names: the model's ``block_names`` (stem first, head last); the first is not a norm.

  Returns:
    One tuple of top-level module names per unit; a module whose name contains "norm" joins the
    unit before it, and the head is left out.
  """
  units: list[list[str]] = []
  for name in block_names:
    if name == _HEAD:
      continue
    if "norm" in name:
      units[-1].append(name)
    else:
      units.append([name])
  return tuple(tuple(unit) for unit in units)


@dataclasses.dataclass(frozen=True)
class Arm:
  """One way to start training on the target.

  Attributes:
    kind: one of :data:`ARM_KINDS`.
    num_blocks: pretrained units of "transfusion" (in [0, units]) and "slim" (in [1, units]);
      None for the other kinds.
  """
  kind: str
  num_blocks: int | None = None

  @property
  def name(self) -> str:
    """``"transfusion_k2"`` for a transfusion of 2 units; the kind for unnumbered arms."""
    return self.kind if self.num_blocks is None else f"{self.kind}_k{self.num_blocks}"


def _copy_modules(source: PyTree, target: PyTree, names: Sequence[str]) -> dict[str, PyTree]:
  """``target`` with those of its top-level entries ``names`` it has taken from ``source``."""
  return {**target, **{name: source[name] for name in names if name in target}}


def transfuse(pretrained: Variables, fresh: Variables, block_names: Sequence[str],
              num_blocks: int) -> dict[str, PyTree]:
  """The lowest ``num_blocks`` units from ``pretrained`` (params and running statistics), the
  rest (and the head) from ``fresh``.

  Args:
    pretrained: source variables, input channels adapted; the copied modules shaped as in
      ``fresh``.
    fresh: the target network's random variables.
    block_names: the target model's ``block_names``.
    num_blocks: k in [0, units]; 0 is random init, all units is full transfer.
  """
  names = [name for unit in transfer_units(block_names)[:num_blocks] for name in unit]
  return {collection: _copy_modules(pretrained.get(collection, {}), tree, names)
          for collection, tree in fresh.items()}


def _path_names(path: tuple) -> tuple[str, ...]:
  """Dict keys of a ``tree_flatten_with_path`` path."""
  return tuple(str(getattr(entry, "key", entry)) for entry in path)


def mean_var_init(key: jax.Array, pretrained: Variables, fresh: Variables, *,
                  norm_init: str = "meanvar") -> dict[str, PyTree]:
  """Mean-Var init: each pretrained tensor redrawn i.i.d. from N(its mean, its variance).

  Args:
    key: PRNG key of one standard-normal draw cut into the leaves.
    pretrained: source variables (input channels adapted), the modules of ``fresh``.
    fresh: the target network's random variables; its head and running statistics are kept.
    norm_init: one of :data:`NORM_INITS`: norm scale/bias redrawn like every tensor
      ("meanvar") or taken from ``fresh`` ("default").

  Returns:
    ``{"params": ..., "batch_stats": fresh["batch_stats"]}``. A tensor of one element keeps its
    value (its variance is 0). Jit- and vmap-safe (over ``key``).
  """
  if norm_init not in NORM_INITS:
    raise ValueError(f"unknown Mean-Var norm_init {norm_init!r}; known: {', '.join(NORM_INITS)}")
  fresh_params = fresh["params"]
  params = _copy_modules(pretrained["params"], fresh_params,
                         [name for name in fresh_params if name != _HEAD])
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  # One draw for the whole tree: a PRNG call per leaf costs XLA:CPU a compile each.
  sizes = [leaf.size for _, leaf in leaves]
  noise = jax.random.normal(key, (sum(sizes),), jnp.float32)
  offsets = np.cumsum([0, *sizes])

  def redraw(index: int, path: tuple, leaf: jax.Array, fresh_leaf: jax.Array) -> jax.Array:
    names = _path_names(path)
    if names[0] == _HEAD or (norm_init == "default" and any("norm" in n for n in names[:-1])):
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
  height, width, _, out_channels = kernel_shape
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
    pretrained: adapted source variables (None allowed for "random" and "gabor").
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
  if arm.kind == "transfer":
    return transfuse(pretrained, fresh, block_names, len(transfer_units(block_names)))
  if arm.kind == "meanvar":
    return mean_var_init(key, pretrained, fresh, norm_init=norm_init)
  if arm.kind in ("transfusion", "slim"):
    return transfuse(pretrained, fresh, block_names, arm.num_blocks)
  raise ValueError(f"unknown arm {arm.kind!r}; known: {', '.join(ARM_KINDS)}")


def initialize_population(arms: Sequence[Arm], keys: jax.Array, pretrained: Variables | None,
                          fresh: Variables, block_names: Sequence[str], *,
                          norm_init: str = "meanvar") -> dict[str, PyTree]:
  """Every arm of every seed as one population: member ``a * S + s`` is
  ``initialize(arms[a], keys[s], pretrained, fresh[s], ...)``, so a seed's arms share its
  fresh draw and key.

  Args:
    arms: A arms (for "slim", the slim network's only).
    keys: S PRNG keys, one per seed.
    pretrained: as in :func:`initialize` (no member axis).
    fresh: the target network's random variables with a leading axis S.
    block_names, norm_init: as in :func:`initialize`.

  Returns:
    Variables shaped like ``fresh`` with a leading axis A * S.
  """

  def seed_members(pretrained, fresh, key):
    return [initialize(arm, key, pretrained, fresh, block_names, norm_init=norm_init)
            for arm in arms]

  per_arm = jax.vmap(seed_members, in_axes=(None, 0, 0))(pretrained, fresh, keys)
  return jax.tree.map(lambda *leaves: jnp.concatenate(leaves), *per_arm)


def unit_outputs(model: Any, variables: Variables, x: jax.Array) -> dict[str, jax.Array]:
  """The representation of each unit: the output of its last module, in training mode.

  Batch statistics normalize every network alike, an untrained one too (its running statistics
  are still 0 / 1); running statistics are not updated.

  Args:
    model: a zoo model (``model.block_names``).
    variables: its variables.
    x: f32[B, H, W, C] normalized images.

  Returns:
    {last module of each unit: f32[B, ...]}, keyed as ``transfer_units``, lowest first.
  """
  acts = models.block_outputs(model, variables, x, train=True)
  return {unit[-1]: acts[unit[-1]].astype(jnp.float32)
          for unit in transfer_units(model.block_names)}


def slim_unit_widths(params: PyTree, block_names: Sequence[str], num_blocks: int,
                     factor: float) -> tuple[int, ...]:
  """The ``unit_widths`` model option of a slim top.

  Args:
    params: the full network's params; a unit's width is the output channels of the first
      kernel (in path order) of its first module: a CBR unit's conv, a residual block's planes.
    block_names: the model's ``block_names``.
    num_blocks: units kept at their width, in [1, units].
    factor: >= 1; every unit above is divided by it (at least 1 channel).
  """
  widths = []
  for unit in transfer_units(block_names):
    kernels = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params[unit[0]])
               if _path_names(path)[-1] == "kernel"]
    widths.append(int(kernels[0].shape[-1]))
  return tuple(widths[:num_blocks]) + tuple(max(1, round(width / factor))
                                            for width in widths[num_blocks:])


def adapt_input_channels(params: PyTree, in_channels: int) -> PyTree:
  """``params`` with the ``stem`` kernel f32[k, k, C_src, C_out] made to read ``in_channels``.

  RGB to gray (``in_channels == 1``): the sum over the source channels, which equals repeating
  the gray image in every channel. Gray to C channels (``C_src == 1``): the kernel divided by C
  and repeated, which equals the source net seeing the channels' mean. Equal counts: unchanged.
  Other pairs of counts are not defined.
  """
  kernel = params["stem"]["kernel"]
  if kernel.shape[-2] == in_channels:
    return params
  if in_channels == 1:
    adapted = jnp.sum(kernel, axis=-2, keepdims=True)
  else:
    adapted = jnp.repeat(kernel / in_channels, in_channels, axis=-2)
  return {**params, "stem": {**params["stem"], "kernel": adapted}}


def class_subset(dataset: data_lib.Dataset, classes: Sequence[int] | None) -> data_lib.Dataset:
  """The examples of ``classes`` only, relabelled 0.. in the given order (None: unchanged).

  Args:
    dataset: any dataset; its normalization statistics are kept.
    classes: distinct labels in [0, dataset.num_classes), at least 2, or None.
  """
  if classes is None:
    return dataset
  lookup = np.full(dataset.num_classes, -1, np.int32)
  lookup[list(classes)] = np.arange(len(classes))

  def take(split: data_lib.Split | None) -> data_lib.Split | None:
    if split is None:
      return None
    keep = lookup[split.labels] >= 0
    return data_lib.Split(split.images[keep], lookup[split.labels[keep]])

  return dataclasses.replace(dataset, train=take(dataset.train), val=take(dataset.val),
                             test=take(dataset.test), num_classes=len(classes))


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
  if auc.shape[:1] != steps.shape:  # Fewer AUCs than steps would index silently.
    raise ValueError(f"auc has {auc.shape[:1]} evaluations, steps {steps.shape}")
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
