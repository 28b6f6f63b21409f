"""Tickets: masks, scores and signs shaped like a model's params.

A ticket is pure data. Every tree here has the structure of ``params``, so trees ``tree_map``
together:

- ``prunable``: Python bools (static), from :func:`prunable`; close over it rather than passing it
  through ``jax.jit`` as an argument.
- masks: bool arrays; leaves that are not prunable are all-True.
- scores: float arrays; leaves that are not prunable are zeros.
- signs: int8 arrays in {-1, 0, 1}.
- kept counts: int32 arrays from :func:`kept_counts`, computed on the host (Python float64, as the
  PyTorch references count) and passed into traced code as data, so a population can
  ``jax.vmap`` over them.

``keep_ratio`` is always the fraction KEPT (RST's "remaining ratio").

Everything except the host functions (:func:`kept_count`, :func:`kept_counts`,
:func:`sparsity_report`, :func:`effective_flops`) is pure and jit- and vmap-safe.
"""

import math
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


# ----------------------------------------------------------------------------- matching trees


def _check_matches(reference: PyTree, tree: PyTree, *, what: str, reference_name: str = "params",
                   shapes: bool = True) -> None:
  """Raises UserError unless ``tree`` has the leaf paths (and shapes) of ``reference``: the one
  guard, since trees of other shapes would broadcast silently or pair the wrong leaves.

  Args:
    reference: the tree others must match, usually params.
    tree: the tree to check (mask, scores, signs, prunable flags).
    what, reference_name: how the two trees are named in the one-line message.
    shapes: also compare leaf shapes (off for trees of Python bools).
  """
  expected = {paths.joined(p): np.shape(leaf) for p, leaf in jax.tree.leaves_with_path(reference)}
  got = {paths.joined(p): np.shape(leaf) for p, leaf in jax.tree.leaves_with_path(tree)}
  for path in dict.fromkeys([*expected, *got]):  # the union, in order
    want, have = expected.get(path), got.get(path)
    if want != have and (shapes or None in (want, have)):
      have, want = ("no such leaf" if shape is None else f"shape {shape}" for shape in (have, want))
      raise UserError(f"{what} leaf {path!r}: {have}; {reference_name}: {want}")


def _flags(tree: PyTree, prunable: PyTree) -> list[bool]:
  """The prunable flags of ``tree``'s leaves, in ``jax.tree.leaves`` order."""
  _check_matches(tree, prunable, what="prunable", reference_name="the tree", shapes=False)
  flags = jax.tree.leaves(prunable)
  if not all(isinstance(flag, bool) for flag in flags):  # traced flags cannot pick leaves
    raise UserError("prunable leaves must be Python bools; close over the prunable tree "
                    "instead of passing it through jit")
  return flags


def _map_flagged(fn: Callable[..., jax.Array], other: Callable[..., jax.Array],
                 prunable: PyTree, tree: PyTree, *rest: PyTree) -> PyTree:
  """``fn(*leaves)`` on prunable leaves and ``other(*leaves)`` elsewhere; ``rest`` are trees
  with ``tree``'s structure (or a prefix of it)."""
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


def kept_count(numel: int, keep_ratio: float) -> int:
  """How many of ``numel`` entries a top-k with ``keep_ratio`` keeps, as the references count.

  ``numel - int((1 - keep_ratio) * numel)`` in float64, exactly as edge-popup/RST's
  ``GetSubnet`` does (so ``kept_count(10, 0.9) == 10``: ``(1 - 0.9) * 10`` is 0.999...).

  Args:
    numel: entries in the layer (or in all prunable layers), a Python int < 2**53.
    keep_ratio: fraction kept, a Python float in [0, 1].
  """
  return numel - int((1 - keep_ratio) * numel)


def kept_counts(tree: PyTree, keep_ratio: float | Sequence[float] | np.ndarray,
                prunable: PyTree) -> PyTree:
  """Per-leaf kept counts for :func:`topk_mask` (host only: call outside jit).

  Args:
    tree: params-like tree (only leaf sizes are read; each < 2**31).
    keep_ratio: fraction kept per layer, in [0, 1]: a Python float, or K of them (a sequence or
      float64 array; float32 values are taken as the float64 numbers they are).
    prunable: Python bools from :func:`prunable`.

  Returns:
    A tree shaped like ``tree`` of np.int32 arrays of ``keep_ratio``'s shape ([] or [K]):
    ``kept_count(leaf.size, r)`` on prunable leaves, ``leaf.size`` elsewhere.
  """
  ratios = np.asarray(keep_ratio, np.float64)
  if not np.all((ratios >= 0) & (ratios <= 1)):  # NaN or out of range: counts would be garbage.
    raise ValueError(f"keep_ratio {keep_ratio!r} is not in [0, 1]")

  def count(leaf: Any) -> np.ndarray:
    # float64 as Python's; np.floor is int() for these non-negative products.
    return np.asarray(np.size(leaf) - np.floor((1.0 - ratios) * np.size(leaf)), np.int32)

  def everything(leaf: Any) -> np.ndarray:
    return np.full(ratios.shape, np.size(leaf), np.int32)

  return _map_flagged(count, everything, prunable, tree)


# ----------------------------------------------------------------------------- top-k masks


def _top_k_flat(values: jax.Array, kept: int | jax.Array) -> jax.Array:
  """bool[n]: the ``kept`` largest of ``values: f[n]`` (``kept`` may be traced)."""
  size = values.shape[0]
  if size == 0:
    return jnp.zeros((0,), bool)
  threshold = jnp.sort(values)[jnp.clip(size - kept, 0, size - 1)]
  above = values > threshold
  # Ties at the threshold: the lower flat index wins, so exactly ``kept`` entries are kept.
  ties = values == threshold
  tie_budget = kept - jnp.sum(above, dtype=jnp.int32)
  return above | (ties & (jnp.cumsum(ties, dtype=jnp.int32) <= tie_budget))


def _top_k_across(values: list[jax.Array], kept: int | jax.Array) -> list[jax.Array]:
  """One top-k over the concatenation of several arrays; masks come back in their shapes."""
  flat = _top_k_flat(jnp.concatenate([value.reshape(-1) for value in values]), kept)
  pieces = jnp.split(flat, np.cumsum([value.size for value in values])[:-1])
  return [piece.reshape(value.shape) for piece, value in zip(pieces, values)]


def topk_mask(scores: PyTree, kept: PyTree, prunable: PyTree) -> PyTree:
  """Per-layer top-k of |scores| (edge-popup / RST ``GetSubnet``).

  Args:
    scores: float tree shaped like params.
    kept: int32[] per leaf, from :func:`kept_counts` (traced is fine; ``jax.vmap`` over the
      int32[K] counts of a population).
    prunable: Python bools from :func:`prunable`.

  Returns:
    bool tree shaped like ``scores``: exactly ``kept`` entries per prunable leaf (ties to the
    lower flat index); non-prunable leaves all-True.
  """
  def layer_mask(score: jax.Array, count: jax.Array) -> jax.Array:
    return _top_k_flat(jnp.abs(score).reshape(-1), count).reshape(score.shape)

  return _map_flagged(layer_mask, _all_true, prunable, scores, kept)


def global_topk_mask(scores: PyTree, kept: int | jax.Array, prunable: PyTree) -> PyTree:
  """Top-k of |scores| with one budget across all prunable leaves.

  Args:
    scores: float tree shaped like params.
    kept: entries kept in total over the prunable leaves, an int or int32[] (traced is fine),
      e.g. ``kept_count(N, keep_ratio)`` for N prunable entries.
    prunable: Python bools from :func:`prunable`.

  Returns:
    bool tree shaped like ``scores``: exactly ``kept`` prunable entries (ties to the earlier leaf
    in ``jax.tree.leaves`` order, then the lower index); non-prunable leaves all-True.
  """
  flags = _flags(scores, prunable)
  leaves, treedef = jax.tree.flatten(scores)
  chosen = [jnp.abs(leaf) for flag, leaf in zip(flags, leaves) if flag]
  masks = iter(_top_k_across(chosen, kept) if chosen else [])
  return treedef.unflatten([next(masks) if flag else _all_true(leaf)
                            for flag, leaf in zip(flags, leaves)])


# ----------------------------------------------------------------------------- straight-through


@jax.custom_vjp
def _straight_through(score: jax.Array, hard_mask: jax.Array) -> jax.Array:
  return hard_mask.astype(score.dtype)


def _straight_through_fwd(score: jax.Array, hard_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  return hard_mask.astype(score.dtype), jnp.sign(score)


def _straight_through_bwd(score_sign: jax.Array,
                          mask_cotangent: jax.Array) -> tuple[jax.Array, None]:
  # edge-popup's GetSubnet passes the cotangent unchanged to |s|; d|s|/ds = sign(s).
  return score_sign * mask_cotangent, None


_straight_through.defvjp(_straight_through_fwd, _straight_through_bwd)


def ste_mask(scores: PyTree, kept: PyTree, prunable: PyTree) -> PyTree:
  """Straight-through per-layer top-k mask of |scores| (RST / edge-popup).

  Forward: exactly the 0/1 values of ``topk_mask(scores, kept, prunable)``.
  Backward: d/dscores = sign(scores) * d/dmask on prunable leaves, zero elsewhere.

  Args:
    scores: float tree shaped like params.
    kept: int32[] per leaf, from :func:`kept_counts` (traced is fine).
    prunable: Python bools from :func:`prunable`.

  Returns:
    Float tree shaped like ``scores`` (their dtypes).
  """
  hard = topk_mask(lax.stop_gradient(scores), kept, prunable)
  return _map_flagged(_straight_through, lambda score, _: jnp.ones_like(score), prunable,
                      scores, hard)


def masked_params(params: PyTree, scores: PyTree, kept: PyTree, prunable: PyTree) -> PyTree:
  """The RST forward weights ``params * ste_mask(scores, kept, prunable)``.

  Gradient w.r.t. scores: sign(s) * w * dL/dW_eff (RST). The params are not stopped here: they
  receive mask * dL/dW_eff if the caller differentiates w.r.t. them; frozen-weight searches take
  the gradient w.r.t. scores only (or wrap params in ``lax.stop_gradient``).

  Args:
    params: float tree.
    scores: float tree shaped like ``params``.
    kept: int32[] per leaf, from :func:`kept_counts` (traced is fine).
    prunable: Python bools from :func:`prunable`.

  Returns:
    Tree shaped like ``params`` in their dtypes.
  """
  _check_matches(params, scores, what="scores")
  mask = ste_mask(scores, kept, prunable)
  return jax.tree.map(lambda weight, keep: weight * keep.astype(weight.dtype), params, mask)


def apply_mask(params: PyTree, mask: PyTree) -> PyTree:
  """``params`` with masked-out entries set to zero (dtypes kept); ``mask``: bool, shaped like
  ``params`` (UserError otherwise)."""
  _check_matches(params, mask, what="mask")
  return jax.tree.map(lambda weight, keep: jnp.where(keep, weight, jnp.zeros_like(weight)),
                      params, mask)


# ----------------------------------------------------------------------------- magnitude pruning


def prune_by_magnitude(params: PyTree, mask: PyTree, kept: PyTree, prunable: PyTree, *,
                       scope: str = "global") -> PyTree:
  """Keeps the ``kept`` largest |w| among the surviving prunable weights (LRR / AWS).

  AWS's ``utils/prune.py`` removes ``fraction`` of S survivors: ``kept = int(S * (1 - fraction))``
  on the host. The reference keeps every weight tied with the threshold; here ties go to the
  lower index, so exactly ``kept`` stay.

  Args:
    params: float tree (the trained weights).
    mask: bool tree shaped like ``params``; pruned weights are never revived.
    kept: survivors that stay, at most the survivors: an int / int32[] (traced is fine) for scope
      "global"; for scope "layer" a tree with the structure of ``params`` holding one per
      prunable leaf (other leaves are ignored).
    prunable: Python bools, e.g. ``prunable(params, classifier=False)`` for AWS.
    scope: "global" (one threshold over all prunable leaves, AWS) or "layer" (per leaf).

  Returns:
    The new bool mask; non-prunable leaves are returned as given.
  """
  _check_matches(params, mask, what="mask")
  flags = _flags(params, prunable)
  weights, treedef = jax.tree.flatten(params)
  masks = treedef.flatten_up_to(mask)
  # Pruned weights rank below every survivor, so only survivors can be kept.
  candidates = [jnp.where(keep, jnp.abs(weight), -1)
                for flag, weight, keep in zip(flags, weights, masks) if flag]
  if scope == "global":
    new = _top_k_across(candidates, kept) if candidates else []
  elif scope == "layer":
    counts = [count for flag, count in zip(flags, treedef.flatten_up_to(kept)) if flag]
    new = [_top_k_flat(candidate.reshape(-1), count).reshape(candidate.shape)
           for candidate, count in zip(candidates, counts)]
  else:
    raise UserError(f"scope must be 'global' or 'layer', got {scope!r}")
  # A ``kept`` above the survivors would pick pruned weights too: those are never revived.
  new = iter(new)
  return treedef.unflatten([next(new) & keep if flag else keep
                            for flag, keep in zip(flags, masks)])


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
  _check_matches(new_params, signs, what="signs")
  _check_matches(new_params, mask, what="mask")
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
    model: flax module taking ``(variables, x, train=bool)``; every kernel's module is called
      through ``__call__`` (so its output is captured).
    variables: {"params": ..., ...}.
    mask: concrete bool tree shaped like ``variables["params"]``.
    input_shape: ``[B, H, W, C]`` of the normalized input.

  Returns:
    (dense MACs, sum over kernels of density * MACs).

  Raises:
    UserError: a kernel whose module output was not captured.
  """
  params = variables["params"]
  _check_matches(params, mask, what="mask")

  def run(variables: PyTree, images: jax.Array) -> Any:
    return model.apply(variables, images, train=False, capture_intermediates=True,
                       mutable=["intermediates"])

  images = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)
  _, state = jax.eval_shape(run, variables, images)
  captured = state["intermediates"]
  dense_macs, effective_macs = 0, 0.0
  for (path, kernel), keep in zip(jax.tree.leaves_with_path(params), jax.tree.leaves(mask)):
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


def _redraw(key: jax.Array, params: PyTree, prunable: PyTree,
            init: Callable[..., jax.Array], other: Callable[[jax.Array], jax.Array]) -> PyTree:
  """``init`` on every prunable kernel (one key per leaf), ``other(leaf)`` elsewhere."""
  flags = _flags(params, prunable)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, max(len(leaves), 1))
  return treedef.unflatten([
      init(leaf_key, jnp.shape(leaf), jnp.result_type(leaf)) if flag else other(leaf)
      for flag, leaf_key, leaf in zip(flags, keys, leaves)])


def init_scores(key: jax.Array, params: PyTree, prunable: PyTree) -> PyTree:
  """RST/edge-popup scores: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)) per prunable kernel.

  Args:
    key: PRNG key.
    params: float tree (shapes and dtypes are read).
    prunable: Python bools; every prunable leaf must be a kernel [..., in, out].

  Returns:
    Float tree shaped like ``params``; zeros on leaves that are not prunable.
  """
  return _redraw(key, params, prunable, get_initializer("pytorch"), jnp.zeros_like)


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
    fan_scale: multiplies fan_in (and fan_out) before use, > 0.

  Returns:
    Tree shaped like ``params`` in their dtypes.
  """
  return _redraw(key, params, prunable, get_initializer(scheme, fan_scale=fan_scale),
                 lambda leaf: leaf)
