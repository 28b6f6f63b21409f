"""Tickets: masks, scores and signs shaped like a model's params.

A ticket is pure data. Every tree here has the same structure as ``params`` so that trees
``tree_map`` together:

- ``prunable``: Python bools (static), from :func:`prunable`; close over it rather than passing it
  through ``jax.jit`` as an argument.
- masks: bool arrays; leaves that are not prunable are all-True.
- scores: float arrays; leaves that are not prunable are zeros.
- signs: int8 arrays in {-1, 0, 1}.

``keep_ratio`` is always the fraction KEPT (RST's "remaining ratio"). It may be a Python number or
a traced f32 scalar, so a population can ``jax.vmap`` over ratios (R2S). Kept counts follow the
PyTorch references, ``numel - int((1 - keep_ratio) * numel)`` evaluated in float64, on both paths:
see :func:`kept_count`. Ties in a top-k are broken by position: the lower flat index (in
``jax.tree.leaves`` order for global masks) is kept.

Everything except the accounting functions (:func:`sparsity_report`, :func:`effective_flops`,
which return Python numbers) is pure and jit- and vmap-safe.
"""

import functools
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxtickets import paths
from jaxtickets.errors import UserError
from jaxtickets.models.init import get_initializer

PyTree = Any
KeepRatio = float | jax.Array

# Traced keep ratios are read as multiples of 1e-6 (see kept_count).
_MILLION = 10**6
_MAX_NUMEL = 2**31 - 1  # counts are int32 on the traced path


# ----------------------------------------------------------------------------- paths, validation


def check_matches(reference: PyTree, tree: PyTree, *, what: str, reference_name: str = "params",
                  shapes: bool = True) -> None:
  """Raises UserError unless ``tree`` has the leaves (and shapes) of ``reference``.

  Args:
    reference: the tree others must match, usually params.
    tree: the tree to check (mask, scores, signs, prunable flags).
    what: how ``tree`` is named in the message.
    reference_name: how ``reference`` is named in the message.
    shapes: also compare leaf shapes (off for trees of Python bools).

  Raises:
    UserError: one line naming the first missing, extra or mis-shaped leaf by its '/'-joined path.
  """
  reference_leaves = {paths.joined(p): leaf for p, leaf in jax.tree.leaves_with_path(reference)}
  leaves = {paths.joined(p): leaf for p, leaf in jax.tree.leaves_with_path(tree)}
  missing = [path for path in reference_leaves if path not in leaves]
  if missing:
    raise UserError(f"{what} lacks leaf {missing[0]!r} of {reference_name} "
                    f"({len(missing)} missing in all)")
  extra = [path for path in leaves if path not in reference_leaves]
  if extra:
    raise UserError(f"{what} has leaf {extra[0]!r} that {reference_name} lack "
                    f"({len(extra)} extra in all)")
  if jax.tree.structure(reference) != jax.tree.structure(tree):
    raise UserError(f"{what} has the leaf paths of {reference_name} but other container types")
  if shapes:
    for path, leaf in reference_leaves.items():
      if np.shape(leaves[path]) != np.shape(leaf):
        raise UserError(f"{what} leaf {path!r} has shape {np.shape(leaves[path])}, "
                        f"{reference_name} have {np.shape(leaf)}")


def _flags(tree: PyTree, prunable: PyTree) -> list[bool]:
  """The prunable flags of ``tree``'s leaves, in ``jax.tree.leaves`` order, after validation."""
  check_matches(tree, prunable, what="prunable", reference_name="the tree", shapes=False)
  flags = jax.tree.leaves(prunable)
  for path, flag in jax.tree.leaves_with_path(prunable):
    if not isinstance(flag, bool):
      raise UserError(f"prunable leaf {paths.joined(path)!r} is {type(flag).__name__}, not a "
                      "Python bool; close over the prunable tree instead of passing it through "
                      "jit")
  return flags


def _map_flagged(fn: Callable[..., jax.Array], other: Callable[..., jax.Array],
                 prunable: PyTree, tree: PyTree, *rest: PyTree) -> PyTree:
  """``fn(*leaves)`` on prunable leaves and ``other(*leaves)`` elsewhere."""
  flags = _flags(tree, prunable)
  leaves, treedef = jax.tree.flatten(tree)
  rest_leaves = [treedef.flatten_up_to(r) for r in rest]
  return treedef.unflatten([
      (fn if flag else other)(leaf, *others)
      for flag, leaf, *others in zip(flags, leaves, *rest_leaves)])


def _all_true(leaf: jax.Array, *_: Any) -> jax.Array:
  return jnp.ones(jnp.shape(leaf), bool)


# ----------------------------------------------------------------------------- leaf selection


def _is_prunable(names: tuple[str, ...], *, first_conv: bool, shortcut: bool, classifier: bool,
                 biases: bool, norms: bool) -> bool:
  if not names:
    return False
  leaf, modules = names[-1], names[:-1]
  if any("norm" in module.lower() for module in modules):
    return norms and paths.is_norm_param(names)
  if leaf == "kernel":
    selected = True
  elif leaf == "bias":
    selected = biases
  else:
    return False
  if "stem" in modules:
    selected = selected and first_conv
  if "shortcut" in modules:
    selected = selected and shortcut
  if "head" in modules:
    selected = selected and classifier
  return selected


def prunable(params: PyTree, *, first_conv: bool = True, shortcut: bool = True,
             classifier: bool = True, biases: bool = False, norms: bool = False) -> PyTree:
  """Which leaves a ticket masks, from the param path names (the naming convention of models/).

  By default every conv/dense ``kernel`` is prunable (RST masks all layers). AWS/LRR:
  ``classifier=False``. Leaves with other names (``embedding``, statistics) are never prunable.

  Args:
    params: the param tree (only its paths are read).
    first_conv: include the ``stem`` conv.
    shortcut: include the 1x1 projection ``shortcut`` convs.
    classifier: include the ``head`` dense layer.
    biases: include conv/dense ``bias`` leaves (still subject to the three flags above).
    norms: include norm ``scale``/``bias`` leaves (modules whose name contains ``norm``).

  Returns:
    A tree of Python bools with the structure of ``params``.
  """
  def select(path: Sequence[Any], _: Any) -> bool:
    return _is_prunable(paths.names(path), first_conv=first_conv, shortcut=shortcut,
                        classifier=classifier, biases=biases, norms=norms)

  return jax.tree.map_with_path(select, params)


# ----------------------------------------------------------------------------- kept counts


def _is_python_number(value: Any) -> bool:
  # np.float32 scalars take the array path: their float64 value is not the ratio that was meant.
  return isinstance(value, (int, float, np.integer)) and not isinstance(value, bool)


def check_keep_ratio(keep_ratio: Any) -> None:
  """UserError for a Python or concrete keep ratio (any shape) outside (0, 1] or not a number;
  traced ratios pass unchecked."""
  if isinstance(keep_ratio, (bool, np.bool_)) or (_is_python_number(keep_ratio)
                                                  and not 0 < float(keep_ratio) <= 1):
    raise UserError(f"keep_ratio must be a number in (0, 1], got {keep_ratio!r}")
  if _is_python_number(keep_ratio):
    return
  try:
    values = np.asarray(keep_ratio)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return
  except (TypeError, ValueError):
    values = None
  if values is None or values.dtype.kind not in "iuf":  # strings would convert silently
    raise UserError(f"keep_ratio must be a number in (0, 1], got {keep_ratio!r}")
  values = values.astype(np.float64).reshape(-1)
  bad = values[~((values > 0) & (values <= 1))]
  if bad.size:
    raise UserError(f"keep_ratio must be in (0, 1], got {float(bad[0])!r} "
                    f"(in an array of shape {values.shape})")


def kept_count(numel: int, keep_ratio: KeepRatio) -> int | jax.Array:
  """How many of ``numel`` entries a top-k with ``keep_ratio`` keeps, as the references count.

  Python int or float (np.float64 too): ``numel - int((1 - keep_ratio) * numel)`` in float64,
  exactly as edge-popup/RST's ``GetSubnet`` does (so ``kept_count(10, 0.9) == 10``:
  ``(1 - 0.9) * 10`` is 0.999...).

  Array or np.float32 scalar (traced or not, any shape, read as f32): the same float64 result,
  computed with int32 arithmetic, for ratios that are multiples of 1e-6 (0.05, 0.3, 0.123456 ...):
  the f32 value is rounded to the nearest millionth, the exact count is computed in integers, and
  where ``(1 - keep_ratio) * numel`` is a whole number a per-``numel`` table (built on the host in
  float64) supplies the references' rounding. (Plain f32 arithmetic gets e.g. 0.9 of 5120 wrong
  by one.) Other ratios (1/3, 0.8**7, 0.3000001) are read as their nearest millionth, which
  moves a count by one wherever ``(1 - keep_ratio) * numel`` lies within ``numel / 2e6`` of a
  whole number (on a layer of any size; by more only above 2e6 entries); ratios below 1e-6 are
  read as 1e-6, so a layer is never pruned whole. Traced ratios are not validated: values
  outside (0, 1] give counts clipped to [0, numel]. Concrete arrays are validated.

  Args:
    numel: entries in the layer (or in all prunable layers), at most 2**31 - 1.
    keep_ratio: fraction kept, in (0, 1].

  Returns:
    A Python int for a Python ``keep_ratio``; otherwise int32 with ``keep_ratio``'s shape.

  Raises:
    UserError: ``keep_ratio`` (Python or concrete) outside (0, 1], or a bad ``numel``.
  """
  if isinstance(numel, bool) or not isinstance(numel, numbers.Integral) or not (
      0 <= numel <= _MAX_NUMEL):
    raise UserError(f"numel must be an int in [0, {_MAX_NUMEL}], got {numel!r}")
  check_keep_ratio(keep_ratio)
  return _kept_count(int(numel), keep_ratio)


def _kept_count(numel: int, keep_ratio: KeepRatio) -> int | jax.Array:
  """kept_count without validation (callers validated keep_ratio once)."""
  if _is_python_number(keep_ratio):
    return numel - int((1 - float(keep_ratio)) * numel)
  return _kept_count_array(numel, jnp.asarray(keep_ratio, jnp.float32))


def _kept_count_array(numel: int, keep_ratio: jax.Array) -> jax.Array:
  """kept_count for f32 ratios (any shape) read as millionths; see kept_count."""
  if numel == 0:
    return jnp.zeros(keep_ratio.shape, jnp.int32)
  # f32 holds every millionth to within 0.06 of it after scaling, so rounding recovers it.
  millionths = jnp.clip(jnp.round(keep_ratio * _MILLION), 1, _MILLION).astype(jnp.int32)
  dropped = _MILLION - millionths
  # pruned = floor(dropped * numel / 1e6) without overflowing int32: split numel into
  # whole millions and a remainder, and the remainder into thousands.
  whole, remainder = divmod(numel, _MILLION)
  remainder_thousands, remainder_units = divmod(remainder, 1000)
  thousands_part = dropped * remainder_thousands  # < 1e9
  below_million = (thousands_part % 1000) * 1000 + dropped * remainder_units  # < 1.001e9
  pruned = dropped * whole + thousands_part // 1000 + below_million // _MILLION
  # Only where the exact product is a whole number can float64 rounding land one below it.
  is_whole = below_million % _MILLION == 0
  step = _MILLION // math.gcd(numel, _MILLION)
  one_short = jnp.asarray(_float64_one_short(numel))[millionths // step]
  return numel - (pruned - (is_whole & one_short))


@functools.lru_cache(maxsize=512)
def _float64_one_short(numel: int) -> np.ndarray:
  """bool[gcd(numel, 1e6) + 1]: at the ratios m/1e6 where (1 - m/1e6) * numel is a whole number
  (m = 0, step, 2 step, ...), whether int((1 - m/1e6) * numel) in float64 is one below it."""
  step = _MILLION // math.gcd(numel, _MILLION)
  millionths = np.arange(0, _MILLION + 1, step, dtype=np.int64)
  exact = (_MILLION - millionths) * numel // _MILLION
  # numpy float64 division and products round as Python's do (m / 10**6 is the literal's value).
  float64 = np.floor((1.0 - millionths / float(_MILLION)) * numel).astype(np.int64)
  shortfall = exact - float64
  assert np.all((shortfall == 0) | (shortfall == 1)), numel
  return shortfall == 1


def _limbs_product(factor: int, count: jax.Array) -> list[jax.Array]:
  """Exact ``factor * count`` as little-endian 16-bit limbs (uint32 arrays < 2**16).

  Args:
    factor: static non-negative Python int (any size).
    count: uint32 array, values < 2**32.
  """
  factor_limbs = [(factor >> shift) & 0xFFFF for shift in range(0, max(factor.bit_length(), 1), 16)]
  count_limbs = [count & 0xFFFF, count >> 16]
  columns = [jnp.zeros_like(count) for _ in range(len(factor_limbs) + len(count_limbs) + 1)]
  for i, factor_limb in enumerate(factor_limbs):
    for j, count_limb in enumerate(count_limbs):
      term = count_limb * np.uint32(factor_limb)  # < 2**32
      columns[i + j] = columns[i + j] + (term & 0xFFFF)
      columns[i + j + 1] = columns[i + j + 1] + (term >> 16)
  limbs, carry = [], jnp.zeros_like(count)
  for column in columns:
    total = column + carry
    limbs.append(total & 0xFFFF)
    carry = total >> 16
  return limbs


def _bit_field(limbs: list[jax.Array], low: int, width: int) -> jax.Array:
  """Bits [low, low + width) of a number in 16-bit limbs, as uint32 (width < 32)."""
  field = jnp.zeros_like(limbs[0])
  for index, limb in enumerate(limbs):
    offset = 16 * index - low  # where this limb's bit 0 lands in the field
    if -16 < offset < width:
      field = field | (limb << offset if offset >= 0 else limb >> -offset)
  return field & np.uint32((1 << width) - 1)


def _leading_ones_27(field: jax.Array) -> jax.Array:
  """Leading one bits of a 27-bit uint32 field (27 when all are set)."""
  return lax.clz(~(field << 5))


def _float64_floor_product(scale: float, count: jax.Array) -> jax.Array:
  """``int(scale * count)`` exactly as Python evaluates it in float64.

  Exact for a static float ``scale`` in [0, 1] and a traced int ``count`` in [0, 2**31): the
  product is formed exactly in integers; float64 rounding can only change the floor by rounding
  up to the next whole number, which happens when the fraction's leading bits are all ones down
  to half an ulp of the result.

  Returns:
    int32 with ``count``'s shape.
  """
  numerator, denominator = float(scale).as_integer_ratio()
  fraction_bits = denominator.bit_length() - 1
  # At least 54 fraction bits, so the bits down to half an ulp of any result below 1 exist.
  pad = max(0, 54 - fraction_bits)
  numerator, fraction_bits = numerator << pad, fraction_bits + pad
  product = _limbs_product(numerator, jnp.asarray(count).astype(jnp.uint32))
  floor = _bit_field(product, fraction_bits, 31)
  # A result in [2**(b-1), 2**b) has ulp 2**(b-53); it rounds up to floor + 1 iff the top 54 - b
  # fraction bits are all ones (ties go to floor + 1, whose last mantissa bit is 0).
  bit_length = 32 - lax.clz(floor)
  upper = _bit_field(product, fraction_bits - 27, 27)
  lower = _bit_field(product, fraction_bits - 54, 27)
  leading_ones = _leading_ones_27(upper) + jnp.where(
      upper == (1 << 27) - 1, _leading_ones_27(lower), 0)
  rounds_up = leading_ones >= 54 - bit_length
  return (floor + rounds_up).astype(jnp.int32)


# ----------------------------------------------------------------------------- top-k masks


def _top_k_flat(values: jax.Array, kept: int | jax.Array) -> jax.Array:
  """bool[n]: the ``kept`` largest of ``values: f[n]``; among equal values lower indices win."""
  size = values.shape[0]
  if size == 0:
    return jnp.zeros((0,), bool)
  threshold = jnp.sort(values)[jnp.clip(size - kept, 0, size - 1)]
  above = values > threshold
  ties = values == threshold
  tie_budget = kept - jnp.sum(above, dtype=jnp.int32)
  return above | (ties & (jnp.cumsum(ties, dtype=jnp.int32) <= tie_budget))


def _top_k_across(values: list[jax.Array], kept: int | jax.Array) -> list[jax.Array]:
  """One top-k over the concatenation of several arrays; masks come back in their shapes."""
  sizes = [value.size for value in values]
  flat = _top_k_flat(jnp.concatenate([value.reshape(-1) for value in values]), kept)
  pieces = jnp.split(flat, np.cumsum(sizes)[:-1])
  return [piece.reshape(value.shape) for piece, value in zip(pieces, values)]


def _check_scalar_ratio(keep_ratio: KeepRatio) -> None:
  check_keep_ratio(keep_ratio)
  if not _is_python_number(keep_ratio) and jnp.ndim(keep_ratio) != 0:
    raise UserError(f"keep_ratio must be a scalar, got shape {jnp.shape(keep_ratio)}; "
                    f"jax.vmap over several ratios")


def topk_mask(scores: PyTree, keep_ratio: KeepRatio, prunable: PyTree) -> PyTree:
  """Per-layer top-k of |scores| (edge-popup / RST ``GetSubnet``).

  Each prunable leaf keeps exactly ``kept_count(leaf.size, keep_ratio)`` entries.

  Args:
    scores: float tree shaped like params.
    keep_ratio: fraction kept per layer, Python float or traced f32 scalar (see kept_count).
    prunable: Python bools from :func:`prunable`.

  Returns:
    bool tree shaped like ``scores``; non-prunable leaves all-True.
  """
  _check_scalar_ratio(keep_ratio)

  def layer_mask(score: jax.Array) -> jax.Array:
    kept = _kept_count(score.size, keep_ratio)
    return _top_k_flat(jnp.abs(score).reshape(-1), kept).reshape(score.shape)

  return _map_flagged(layer_mask, _all_true, prunable, scores)


def global_topk_mask(scores: PyTree, keep_ratio: KeepRatio, prunable: PyTree) -> PyTree:
  """Top-k of |scores| with one budget across all prunable leaves.

  Keeps exactly ``kept_count(N, keep_ratio)`` entries in total, N = number of prunable entries;
  ties go to the earlier leaf (``jax.tree.leaves`` order), then the lower index.

  Args:
    scores: float tree shaped like params.
    keep_ratio: fraction kept overall, Python float or traced f32 scalar.
    prunable: Python bools from :func:`prunable`.

  Returns:
    bool tree shaped like ``scores``; non-prunable leaves all-True.
  """
  _check_scalar_ratio(keep_ratio)
  flags = _flags(scores, prunable)
  leaves, treedef = jax.tree.flatten(scores)
  chosen = [jnp.abs(leaf) for flag, leaf in zip(flags, leaves) if flag]
  if not chosen:
    return jax.tree.map(_all_true, scores)
  kept = _kept_count(sum(leaf.size for leaf in chosen), keep_ratio)
  masks = iter(_top_k_across(chosen, kept))
  return treedef.unflatten([next(masks) if flag else _all_true(leaf)
                            for flag, leaf in zip(flags, leaves)])


_CHANNEL_AXES = {"out": -1, "in": -2}


def structured_topk_mask(scores: PyTree, keep_ratio: KeepRatio, prunable: PyTree, *,
                         axis: str = "out") -> PyTree:
  """Per-layer top-k of whole channels, ranked by the L1 norm of their scores.

  Kernels are ``[..., in, out]`` (flax): ``axis="out"`` keeps output filters/units,
  ``axis="in"`` input channels. A prunable 1-D leaf (a bias) is ranked on its own, entry by entry,
  with ``axis="out"``; keep biases unprunable for filter pruning that also drops the bias.

  Args:
    scores: float tree shaped like params.
    keep_ratio: fraction of channels kept per layer (``kept_count(channels, keep_ratio)``).
    prunable: Python bools from :func:`prunable`.
    axis: "out" or "in".

  Returns:
    bool tree shaped like ``scores``, constant along every axis but the channel axis;
    non-prunable leaves all-True.

  Raises:
    UserError: unknown ``axis``, or a prunable leaf without that axis.
  """
  if axis not in _CHANNEL_AXES:
    raise UserError(f"axis must be 'out' or 'in', got {axis!r}")
  _check_scalar_ratio(keep_ratio)
  channel_axis = _CHANNEL_AXES[axis]
  for flag, (path, score) in zip(_flags(scores, prunable),
                                 jax.tree.leaves_with_path(scores)):
    if flag and jnp.ndim(score) < -channel_axis:
      raise UserError(f"structured_topk_mask(axis={axis!r}) needs leaf {paths.joined(path)!r} "
                      f"to have at least {-channel_axis} dims, it has shape {jnp.shape(score)}")

  def channel_mask(score: jax.Array) -> jax.Array:
    channels = score.shape[channel_axis]
    norms = jnp.moveaxis(jnp.abs(score), channel_axis, -1).reshape(-1, channels).sum(axis=0)
    keep = _top_k_flat(norms, _kept_count(channels, keep_ratio))
    broadcast_shape = [1] * score.ndim
    broadcast_shape[channel_axis] = channels
    return jnp.broadcast_to(keep.reshape(broadcast_shape), score.shape)

  return _map_flagged(channel_mask, _all_true, prunable, scores)


# ----------------------------------------------------------------------------- straight-through


@jax.custom_vjp
def _straight_through_leaf(score: jax.Array, hard_mask: jax.Array) -> jax.Array:
  return hard_mask.astype(score.dtype)


def _straight_through_leaf_fwd(score: jax.Array,
                               hard_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  return hard_mask.astype(score.dtype), jnp.sign(score)


def _straight_through_leaf_bwd(score_sign: jax.Array,
                               mask_cotangent: jax.Array) -> tuple[jax.Array, None]:
  # edge-popup's GetSubnet passes the cotangent unchanged to |s|; d|s|/ds = sign(s).
  return score_sign * mask_cotangent, None


_straight_through_leaf.defvjp(_straight_through_leaf_fwd, _straight_through_leaf_bwd)


def straight_through(scores: PyTree, mask: PyTree, prunable: PyTree) -> PyTree:
  """Float mask whose forward is exactly ``mask`` and whose gradient reaches ``scores``.

  Pair it with any hard mask of |scores| (per-layer, global or structured top-k).

  Args:
    scores: float tree shaped like params.
    mask: bool tree shaped like ``scores`` (not differentiated).
    prunable: Python bools from :func:`prunable`.

  Returns:
    Tree shaped like ``scores`` in their dtypes: 1.0/0.0 on prunable leaves, with
    d/dscores = sign(scores) * d/dmask; ones with zero gradient elsewhere.
  """
  check_matches(scores, mask, what="mask", reference_name="scores")
  return _map_flagged(_straight_through_leaf, lambda score, _: jnp.ones_like(score),
                      prunable, scores, mask)


def ste_mask(scores: PyTree, keep_ratio: KeepRatio, prunable: PyTree) -> PyTree:
  """Straight-through per-layer top-k mask of |scores| (RST / edge-popup).

  Forward: exactly the 0/1 values of ``topk_mask(scores, keep_ratio, prunable)``.
  Backward: d/dscores = sign(scores) * d/dmask on prunable leaves, zero elsewhere.

  Args:
    scores: float tree shaped like params.
    keep_ratio: fraction kept per layer, Python float or traced f32 scalar.
    prunable: Python bools from :func:`prunable`.

  Returns:
    Float tree shaped like ``scores`` (their dtypes).
  """
  hard = topk_mask(lax.stop_gradient(scores), keep_ratio, prunable)
  return straight_through(scores, hard, prunable)


def masked_params(params: PyTree, scores: PyTree, keep_ratio: KeepRatio,
                  prunable: PyTree) -> PyTree:
  """The RST forward weights ``params * ste_mask(scores, ...)``.

  Gradient w.r.t. scores: sign(s) * w * dL/dW_eff (RST). The params are not stopped here: they
  receive mask * dL/dW_eff if the caller differentiates w.r.t. them; frozen-weight searches take
  the gradient w.r.t. scores only (or wrap params in ``lax.stop_gradient``).

  Args:
    params: float tree.
    scores: float tree shaped like ``params``.
    keep_ratio: fraction kept per layer, Python float or traced f32 scalar.
    prunable: Python bools from :func:`prunable`.

  Returns:
    Tree shaped like ``params`` in their dtypes.
  """
  check_matches(params, scores, what="scores")
  mask = ste_mask(scores, keep_ratio, prunable)
  return jax.tree.map(lambda weight, keep: weight * keep.astype(weight.dtype), params, mask)


def apply_mask(params: PyTree, mask: PyTree) -> PyTree:
  """``params`` with masked-out entries set to zero (dtypes kept).

  Raises:
    UserError: ``mask`` does not have the leaves and shapes of ``params``.
  """
  check_matches(params, mask, what="mask")
  return jax.tree.map(lambda weight, keep: jnp.where(keep, weight, jnp.zeros_like(weight)),
                      params, mask)


# ----------------------------------------------------------------------------- magnitude pruning


def _check_fraction(fraction: Any) -> float:
  if not _is_python_number(fraction):
    raise UserError(f"fraction must be a Python number in [0, 1] (static), got a "
                    f"{type(fraction).__name__}")
  if not 0 <= float(fraction) <= 1:
    raise UserError(f"fraction must be a Python number in [0, 1], got {fraction!r}")
  return float(fraction)


def prune_by_magnitude(params: PyTree, mask: PyTree, fraction: float, prunable: PyTree, *,
                       scope: str = "global") -> PyTree:
  """Removes ``fraction`` of the surviving prunable weights, smallest |w| first (LRR / AWS).

  Counts follow AWS's ``utils/prune.py``: of S survivors, ``int(S * (1 - fraction))`` stay, so
  ``S - int(S * (1 - fraction))`` go (with fraction 0.2 that is ceil(0.2 S), not int(0.2 S)); the
  count is exact in float64 terms even for a traced mask. The reference keeps every weight tied
  with the threshold; here ties go to the lower index so the count is exact.

  Args:
    params: float tree (the trained weights).
    mask: bool tree shaped like ``params``; pruned weights are never revived.
    fraction: Python number in [0, 1] (static), e.g. 0.2 per round.
    prunable: Python bools, e.g. ``prunable(params, classifier=False)`` for AWS.
    scope: "global" (one threshold over all prunable leaves, AWS) or "layer" (per leaf).

  Returns:
    The new bool mask; non-prunable leaves are returned as given.

  Raises:
    UserError: bad ``fraction`` or ``scope``, or mismatched trees.
  """
  check_matches(params, mask, what="mask")
  scale = 1.0 - _check_fraction(fraction)
  if scope not in ("global", "layer"):
    raise UserError(f"scope must be 'global' or 'layer', got {scope!r}")
  flags = _flags(params, prunable)
  weights, treedef = jax.tree.flatten(params)
  masks = treedef.flatten_up_to(mask)
  # Pruned weights rank below every survivor, so only survivors can be kept.
  candidates = [jnp.where(keep, jnp.abs(weight), -1)
                for flag, weight, keep in zip(flags, weights, masks) if flag]
  survivors = [jnp.sum(keep, dtype=jnp.int32) for flag, keep in zip(flags, masks) if flag]
  if not candidates:
    return mask
  if scope == "global":
    new = _top_k_across(candidates, _float64_floor_product(scale, sum(survivors)))
  else:
    new = [_top_k_flat(candidate.reshape(-1), _float64_floor_product(scale, count))
           .reshape(candidate.shape) for candidate, count in zip(candidates, survivors)]
  new = iter(new)
  return treedef.unflatten([next(new) if flag else keep for flag, keep in zip(flags, masks)])


# ----------------------------------------------------------------------------- signs


def signs_of(params: PyTree) -> PyTree:
  """int8 tree of sign(w) in {-1, 0, 1}; AWS takes ``signs_of(apply_mask(trained, mask))``."""
  return jax.tree.map(lambda weight: jnp.sign(weight).astype(jnp.int8), params)


def mask_from_signs(signs: PyTree, prunable: PyTree | None = None) -> PyTree:
  """``signs != 0`` (AWS: the transferred mask).

  Args:
    signs: int8 tree from :func:`signs_of`.
    prunable: optional Python bools; leaves that are not prunable become all-True (a zero
      norm bias is not a pruned weight).

  Returns:
    bool tree shaped like ``signs``.
  """
  if prunable is None:
    return jax.tree.map(lambda sign: sign != 0, signs)
  return _map_flagged(lambda sign: sign != 0, _all_true, prunable, signs)


def transfer_signs(new_params: PyTree, signs: PyTree, mask: PyTree, *,
                   where: PyTree | None = None) -> PyTree:
  """AWS sign transfer: ``|w_new| * sign * mask`` on chosen leaves, ``w_new`` elsewhere.

  AWS transfers signs into the masked layers, their biases and the dense classifier, and resets
  norm params: ``where=prunable(new_params, biases=True)`` (the classifier is included; AWS does
  not prune it, so its mask is all-True).

  Args:
    new_params: the fresh initialization (magnitudes come from here).
    signs: int8 tree shaped like ``new_params``.
    mask: bool tree shaped like ``new_params``.
    where: Python bools choosing the leaves; default ``prunable(new_params)``.

  Returns:
    Tree shaped like ``new_params`` in their dtypes.
  """
  check_matches(new_params, signs, what="signs")
  check_matches(new_params, mask, what="mask")
  chosen = prunable(new_params) if where is None else where

  def transfer(weight: jax.Array, sign: jax.Array, keep: jax.Array) -> jax.Array:
    return jnp.abs(weight) * sign.astype(weight.dtype) * keep.astype(weight.dtype)

  return _map_flagged(transfer, lambda weight, *_: weight, chosen, new_params, signs, mask)


# ----------------------------------------------------------------------------- accounting


def sparsity_report(mask: PyTree, prunable: PyTree) -> dict[str, Any]:
  """Kept/total/density per prunable leaf and overall (Python numbers; call outside jit).

  Args:
    mask: concrete bool tree.
    prunable: Python bools from :func:`prunable`.

  Returns:
    ``{"layers": {path: {"kept", "total", "density"}}, "kept", "total", "density"}`` with
    '/'-joined paths; density is 1.0 when nothing is prunable.
  """
  flags = _flags(mask, prunable)
  layers = {}
  for flag, (path, keep) in zip(flags, jax.tree.leaves_with_path(mask)):
    if flag:
      kept, total = int(np.count_nonzero(np.asarray(keep))), int(np.size(keep))
      layers[paths.joined(path)] = {"kept": kept, "total": total,
                                 "density": kept / total if total else 1.0}
  kept = sum(layer["kept"] for layer in layers.values())
  total = sum(layer["total"] for layer in layers.values())
  return {"layers": layers, "kept": kept, "total": total,
          "density": kept / total if total else 1.0}


def effective_flops(model: Any, variables: PyTree, mask: PyTree,
                    input_shape: Sequence[int]) -> tuple[int, float]:
  """Dense and mask-weighted multiply-accumulates per example (call outside jit).

  Output shapes come from ``model.apply(..., train=False, capture_intermediates=True)`` under
  ``jax.eval_shape`` (nothing is computed). Each ``kernel`` costs prod(kernel.shape) MACs per
  output position, positions = prod(output.shape[1:-1]) (H_out * W_out for a conv, 1 for a dense
  layer on [B, D]), summed over calls. Biases, norms, pooling and activations are not counted.

  Args:
    model: flax module taking ``(variables, x, train=bool)``.
    variables: {"params": ..., ...}.
    mask: concrete bool tree shaped like ``variables["params"]``.
    input_shape: ``[B, H, W, C]`` of the normalized input.

  Returns:
    (dense MACs, sum over kernels of density * MACs).

  Raises:
    UserError: mismatched mask, or a kernel whose module output was not captured.
  """
  params = variables["params"]
  check_matches(params, mask, what="mask")

  def run(variables: PyTree, images: jax.Array) -> Any:
    return model.apply(variables, images, train=False, capture_intermediates=True,
                       mutable=["intermediates"])

  images = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)
  _, state = jax.eval_shape(run, variables, images)
  captured = state["intermediates"]
  masks = jax.tree.leaves(mask)
  dense_macs, effective_macs = 0, 0.0
  for (path, kernel), keep in zip(jax.tree.leaves_with_path(params), masks):
    names = paths.names(path)
    if names[-1] != "kernel":
      continue
    outputs = captured
    for name in names[:-1] + ("__call__",):
      outputs = outputs.get(name) if isinstance(outputs, Mapping) else None
    if outputs is None:
      raise UserError(f"effective_flops: no captured output for layer {'/'.join(names[:-1])!r}")
    positions = sum(math.prod(output.shape[1:-1]) for output in outputs)
    macs = positions * math.prod(kernel.shape)
    dense_macs += macs
    effective_macs += macs * float(np.mean(np.asarray(keep)))
  return dense_macs, effective_macs


# ----------------------------------------------------------------------------- initializers


def _redraw(key: jax.Array, params: PyTree, prunable: PyTree, init: Callable[..., jax.Array],
            other: Callable[[jax.Array], jax.Array], what: str) -> PyTree:
  """``init`` on every prunable kernel (one key per leaf), ``other(leaf)`` elsewhere."""
  flags = _flags(params, prunable)
  leaves_with_path = jax.tree.leaves_with_path(params)
  for flag, (path, leaf) in zip(flags, leaves_with_path):
    if flag and jnp.ndim(leaf) < 2:
      raise UserError(f"{what} needs kernels ([..., in, out]); prunable leaf "
                      f"{paths.joined(path)!r} has shape {jnp.shape(leaf)}")
  keys = jax.random.split(key, max(len(leaves_with_path), 1))
  return jax.tree.structure(params).unflatten([
      init(leaf_key, jnp.shape(leaf), jnp.result_type(leaf)) if flag else other(leaf)
      for flag, leaf_key, (_, leaf) in zip(flags, keys, leaves_with_path)])


def init_scores(key: jax.Array, params: PyTree, prunable: PyTree) -> PyTree:
  """RST/edge-popup scores: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)) per prunable kernel.

  Args:
    key: PRNG key.
    params: float tree (shapes and dtypes are read).
    prunable: Python bools; every prunable leaf must be a kernel [..., in, out].

  Returns:
    Float tree shaped like ``params``; zeros on leaves that are not prunable.
  """
  return _redraw(key, params, prunable, get_initializer("pytorch"), jnp.zeros_like,
                 "init_scores")


def reinit_weights(key: jax.Array, params: PyTree, prunable: PyTree,
                   scheme: str = "signed_kaiming_constant", *, fan_scale: float = 1.0) -> PyTree:
  """Re-draws the prunable kernels with a named initializer; other leaves are kept.

  The RST default is ``signed_kaiming_constant`` (sign * sqrt(2/fan_in)) with no fan scaling.
  ``fan_scale=keep_ratio`` reproduces edge-popup's ``scale_fan`` as its paper describes; its code
  used ``fan * (1 - keep_ratio)`` (a bug), which ``fan_scale=1 - keep_ratio`` reproduces.

  Args:
    key: PRNG key.
    params: float tree.
    prunable: Python bools; every prunable leaf must be a kernel [..., in, out].
    scheme: a name known to ``jaxtickets.models.init.get_initializer``.
    fan_scale: multiplies fan_in (and fan_out) before use.

  Returns:
    Tree shaped like ``params`` in their dtypes.

  Raises:
    UserError: unknown ``scheme``, ``fan_scale`` <= 0, or a prunable leaf that is not a kernel.
  """
  return _redraw(key, params, prunable, get_initializer(scheme, fan_scale=fan_scale),
                 lambda leaf: leaf, "reinit_weights")
