"""The distillation methods (DC, DSA, DM, IDC, Acc-DD) as one parameterized algorithm.

Every method is a :class:`Method` record read off its official code (:func:`get_method`); one
step, :func:`make_distill_step`, runs any of them, ONE inner iteration per call, so ``loop.fit``
drives a distillation like any training run. Per inner iteration:

1. At the start of an outer iteration (every ``inner_iterations`` steps) the M matching nets are
   replaced: fresh random inits (DC, DSA, DM, IDC) or, for Acc-DD, M nets drawn uniformly from the
   pretrained early-stage pool, each perturbed (:mod:`augment_models`), with fresh SGD states; the
   stored images are clipped to [0, 1] (IDC's clamp; DC's, DSA's and DM's code never clip their
   normalized images, so for them it is a deviation, at every step for DM's single inner
   iteration).
2. Matching: for every (net, class) a real batch of the class (drawn without replacement) and the
   class's decoded synthetic images (at most ``synthetic_max``) get ONE DSA draw (Siamese), and
   the class objective is evaluated for all M x K pairs in one program; the loss averaged
   over the M nets updates the stored images: one SGD-with-momentum step on its sum over the
   classes (DC, DSA, DM), or IDC's K sequential per-class steps in one program (:mod:`image_sgd`).
3. The nets train (as one population): ``net_steps`` SGD steps on the real data with
   per-sample DSA and CutMix (IDC, Acc-DD), ``net_steps`` epochs on the current synthetic set
   read as 8-bit images (DC, DSA: plain SGD, each epoch ``ceil(size / net_batch)`` batches), or
   not at all (DM). DC's and DSA's code skip this after the last update of an outer iteration
   (IDC's and Acc-DD's do not); here it runs and the nets are then replaced, which costs compute
   only.

With M = 1 this is the reference's schedule. With M > 1 each update averages M nets; running
``outer_iterations / M`` outer iterations keeps the reference's number of model-steps (nets x
inner iterations), with M times fewer image updates.

Images live in [0, 1] pixel space (IDC's convention). DC, DSA and DM optimize normalized images;
their learning rates are converted to pixel space by ``std^2`` (mean over channels), which gives
the same SGD trajectory up to the per-channel spread of ``std`` when ``std`` is the reference's
(``data.NORMALIZATIONS["cifar10_common"]`` on CIFAR).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxtickets import data as data_lib
from jaxtickets import population
from jaxtickets import train as train_lib
from jaxtickets.distill import augment_models, dsa, image_sgd, matching, synthetic
from jaxtickets.errors import UserError

PyTree = Any

OBJECTIVES = ("gradient", "distribution")
MODEL_SOURCES = ("random", "pool")
NET_DATA = ("none", "synthetic", "real")
NET_UNITS = ("step", "epoch")
LR_SPACES = ("pixel", "normalized")
IMAGE_UPDATES = ("summed", "per_class")
# DC/DSA: (image updates per net, net epochs on the synthetic set after each) by IPC.
_DC_LOOPS = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}
_FULL_DSA = "color_crop_cutout_flip_scale_rotate"


@dataclasses.dataclass(frozen=True)
class Method:
  """One distillation method's settings (the defaults of its official code).

  The string fields take the names of the tuples above (``OBJECTIVES`` ...), ``distance`` a key
  of ``matching.GRADIENT_DISTANCES``, the strategies ``dsa.Strategy.parse``'s strings; ``perturb``
  needs ``models="pool"``, ``net_unit="epoch"`` needs ``net_data="synthetic"``.

  Attributes:
    name: registry name.
    objective: "gradient" (DC, DSA, IDC, Acc-DD) or "distribution" (DM).
    distance: gradient distance (``matching.GRADIENT_DISTANCES``: "dc", "mse", "l1").
    match_strategy: DSA ops of the Siamese matching augmentation ("none": no augmentation).
    match_composition: "idc" or "one" (see ``dsa``).
    factor: IDC multi-formation factor (1: none).
    init: synthetic initialization (``synthetic.INITS``).
    image_lr: learning rate of the images (for IPC 10 when ``image_lr_per_ipc``).
    image_lr_per_ipc: scale ``image_lr`` by IPC / 10 (IDC's ``tune_lr_img``, whose further
      factor (size / 32)^2 is 1 on CIFAR and not applied).
    image_lr_space: "pixel" or "normalized": the space the reference's rate is for.
    image_momentum: SGD momentum of the images.
    image_updates: "summed" (one step per inner iteration on the loss summed over classes) or
      "per_class" (IDC's one step per class, in class order; :mod:`image_sgd`).
    models: "random" (a fresh init per outer iteration) or "pool" (Acc-DD's early-stage pool).
    perturb: perturb the pool nets (Acc-DD).
    outer_iterations: the reference's number of outer iterations (one net each).
    inner_iterations: image updates per outer iteration.
    real_batch: real images per class per matching step.
    synthetic_max: at most this many decoded synthetic images per class per matching step.
    net_data: what the nets train on between image updates: "none", "synthetic" or "real".
    net_steps: how much the nets train after each image update, in ``net_unit``s.
    net_unit: "step" (one batch) or "epoch" (``ceil(size / net_batch)`` batches of the
      synthetic set, as many as DC/DSA's loader takes per pass; drawn by the split's shuffle,
      so an epoch may run into the next permutation instead of being exactly one pass).
    net_batch: their batch size.
    net_momentum: SGD momentum of the nets (DC/DSA: plain SGD).
    net_weight_decay: their coupled weight decay.
    net_strategy: per-sample DSA ops of the nets' own training ("none": none).
    net_composition: "idc" or "one".
    net_mix_probability: CutMix probability of the nets' training (0: none).
  """
  name: str
  objective: str
  distance: str = "dc"
  match_strategy: str = "none"
  match_composition: str = "one"
  factor: int = 1
  init: str = "real"
  image_lr: float = 0.1
  image_lr_per_ipc: bool = False
  image_lr_space: str = "normalized"
  image_momentum: float = 0.5
  image_updates: str = "summed"
  models: str = "random"
  perturb: bool = False
  outer_iterations: int = 1000
  inner_iterations: int = 1
  real_batch: int = 256
  synthetic_max: int = 128
  net_data: str = "none"
  net_steps: int = 0
  net_unit: str = "step"
  net_batch: int = 256
  net_momentum: float = 0.9
  net_weight_decay: float = 5e-4
  net_strategy: str = "none"
  net_composition: str = "one"
  net_mix_probability: float = 0.0

  def match_dsa(self) -> dsa.Strategy:
    """The Siamese augmentation of the matching step."""
    return dsa.Strategy.parse(self.match_strategy, self.match_composition)

  def net_dsa(self) -> dsa.Strategy:
    """The per-sample augmentation of the nets' own training."""
    return dsa.Strategy.parse(self.net_strategy, self.net_composition)

  def image_learning_rate(self, images_per_class: int, std: Sequence[float]) -> float:
    """The stored images' learning rate in pixel space."""
    rate = self.image_lr * (images_per_class / 10 if self.image_lr_per_ipc else 1.0)
    if self.image_lr_space == "normalized":
      rate *= float(np.mean(np.square(std)))
    return rate


def _dc_loops(images_per_class: int) -> tuple[int, int]:
  return _DC_LOOPS[max(ipc for ipc in _DC_LOOPS if ipc <= images_per_class)]


def _dc(images_per_class: int) -> Method:
  inner, net_epochs = _dc_loops(images_per_class)
  return Method("dc", "gradient", distance="dc", inner_iterations=inner, net_data="synthetic",
                net_steps=net_epochs, net_unit="epoch", net_momentum=0.0, net_weight_decay=0.0)


def _dsa(images_per_class: int) -> Method:
  return dataclasses.replace(_dc(images_per_class), name="dsa", match_strategy=_FULL_DSA,
                             net_strategy=_FULL_DSA)


def _dm(images_per_class: int) -> Method:
  del images_per_class
  return Method("dm", "distribution", match_strategy=_FULL_DSA, image_lr=1.0,
                outer_iterations=20000)


def _idc(images_per_class: int) -> Method:
  del images_per_class
  # n_data 2000 real images per inner iteration = 32 batches of 64 (the loop stops at >= 2000).
  return Method("idc", "gradient", distance="mse", match_strategy="color_crop_cutout",
                match_composition="idc", factor=2, init="mix", image_lr=5e-3,
                image_lr_per_ipc=True, image_lr_space="pixel", image_updates="per_class",
                outer_iterations=2000,
                inner_iterations=100, real_batch=64, net_data="real", net_steps=32,
                net_batch=64, net_strategy="color_crop", net_composition="idc",
                net_mix_probability=0.5)


def _acc_dd(images_per_class: int) -> Method:
  return dataclasses.replace(_idc(images_per_class), name="acc_dd", image_lr=1e-2,
                             models="pool", perturb=True, outer_iterations=500)


METHODS = {"dc": _dc, "dsa": _dsa, "dm": _dm, "idc": _idc, "acc_dd": _acc_dd}


def get_method(name: str, images_per_class: int, **overrides: Any) -> Method:
  """The method ``name`` for an IPC >= 1, with ``overrides`` of :class:`Method` fields.

  Raises:
    UserError: an unknown method name.
  """
  if name not in METHODS:
    raise UserError(f"unknown distillation method {name!r}; known: {', '.join(METHODS)}")
  return dataclasses.replace(METHODS[name](images_per_class), **overrides)


# ----------------------------------------------------------------------------------------------
# Data and state


class DistillData(NamedTuple):
  """What a distillation step reads (device arrays).

  Attributes:
    images: u8[N, H, W, C] real training images.
    labels: i32[N].
    class_index: i32[K, n_max] indices of each class's images (padded with 0).
    class_count: i32[K] images per class.
    pool: Acc-DD's early-stage nets ``{"params", "batch_stats"}`` with leading axis P, or {}.
  """
  images: jax.Array
  labels: jax.Array
  class_index: jax.Array
  class_count: jax.Array
  pool: PyTree


def distill_data(split: data_lib.Split, num_classes: int, pool: PyTree = None) -> DistillData:
  """:class:`DistillData` of a real training split (and the Acc-DD pool, if any)."""
  labels = np.asarray(split.labels)
  counts = synthetic.class_counts(labels, num_classes)
  class_index = np.zeros((num_classes, int(counts.max())), np.int32)
  for label in range(num_classes):
    members = np.flatnonzero(labels == label)
    class_index[label, :len(members)] = members
  return DistillData(jnp.asarray(split.images), jnp.asarray(labels, jnp.int32),
                     jnp.asarray(class_index), jnp.asarray(counts, jnp.int32),
                     {} if pool is None else pool)


class DistillState(NamedTuple):
  """A distillation in progress (what ``loop.fit`` checkpoints).

  Attributes:
    step: i32[] inner iterations done.
    images: f32[K, ipc, H, W, C] stored synthetic images in [0, 1].
    image_opt_state: their optimizer's state (momentum buffer f32[K, ipc, H, W, C]).
    nets: the M current matching nets (TrainState with leading axis M).
    key: the run's PRNG key (constant; per-step keys are folded from it).
  """
  step: jax.Array
  images: jax.Array
  image_opt_state: image_sgd.MomentumState
  nets: train_lib.TrainState
  key: jax.Array


def image_optimizer(method: Method, images_per_class: int,
                    std: Sequence[float]) -> image_sgd.ImageSGD:
  """SGD (with momentum) of the stored images at the method's pixel-space rate."""
  return image_sgd.image_sgd(method.image_learning_rate(images_per_class, std),
                             method.image_momentum,
                             per_class=method.image_updates == "per_class")


def init_state(key: jax.Array, images: np.ndarray | jax.Array,
               optimizer: image_sgd.ImageSGD,
               nets: train_lib.TrainState) -> DistillState:
  """The state before the first inner iteration; ``nets`` only give the shapes (step 0
  replaces them)."""
  images = jnp.asarray(images, jnp.float32)
  return DistillState(jnp.zeros((), jnp.int32), images, optimizer.init(images), nets, key)


def sample_real(key: jax.Array, data: DistillData, batch_size: int) -> jax.Array:
  """u8[K, batch_size, H, W, C]: per class, ``batch_size`` distinct random real images.

  Each call draws afresh; IDC's class sampler walks a per-class shuffle (no image repeats
  within a pass over the class), which differs only in how often an image can recur. A
  ``batch_size`` above a class's size repeats that class's images (never another class's);
  the runner caps it at the smallest class (see :func:`real_batch_size`).
  """
  num_classes, max_count = data.class_index.shape

  def one_class(class_key, index, count):
    scores = jnp.where(jnp.arange(max_count) < count, jax.random.uniform(class_key, (max_count,)),
                       2.0)
    # Padded positions sort last; cycling through the class's own draws never reaches them.
    return index[jnp.argsort(scores)[jnp.arange(batch_size) % count]]

  chosen = jax.vmap(one_class)(jax.random.split(key, num_classes), data.class_index,
                               data.class_count)
  return data.images[chosen]


def real_batch_size(method: Method, labels: np.ndarray, num_classes: int) -> int:
  """The matching's real batch per class: the method's, capped at the smallest class."""
  return int(min(method.real_batch, synthetic.class_counts(labels, num_classes).min()))


# ----------------------------------------------------------------------------------------------
# The step


def _quantize(images: jax.Array) -> jax.Array:
  """f32 pixels in [0, 1] -> u8, so the nets read the synthetic set like any split."""
  return jnp.round(jnp.clip(images, 0.0, 1.0) * 255).astype(jnp.uint8)


def make_distill_step(method: Method, model: nn.Module, *, mean: Sequence[float],
                      std: Sequence[float], num_classes: int, image_shape: Sequence[int],
                      images_per_class: int, num_models: int, real_batch: int,
                      net_optimizer: optax.GradientTransformation,
                      magnitude: Sequence[float] = augment_models.DEFAULT_MAGNITUDE,
                      population_options: dict[str, Any] | None = None,
                      model_map: str | None = None,
                      class_map: str = "unroll",
                      trajectory_chunk: int | None = None):
  """One inner iteration of ``method`` (see module docstring) as a pure step for ``loop.fit``,
  or, with ``trajectory_chunk`` C, C whole outer iterations.

  With C (methods whose nets train on the real data: IDC, Acc-DD; see
  :func:`check_trajectory_chunk`): a net's trajectory through an outer iteration does not depend
  on the synthetic set, so the C x M nets of C outer iterations first train as ONE population,
  keeping their params before each inner iteration's steps, and the images then take the
  C x ``inner_iterations`` matching updates in order against those snapshots. Same nets, keys
  and updates as C x ``inner_iterations`` interleaved steps, equal up to float rounding (which
  compounds over many steps: long runs agree in distribution, not bit for bit). Memory:
  C x inner_iterations x M param snapshots and the activations of C x M nets at once.

  Args:
    method: the method.
    model: the matching network (e.g. ConvNet-3, PyTorch init).
    mean: per-channel normalization mean (the nets normalize inside, as everywhere).
    std: per-channel normalization std.
    num_classes: K.
    image_shape: (H, W, C).
    images_per_class: IPC (stored images per class).
    num_models: M nets per outer iteration, matched together (vmapped).
    real_batch: real images per class per matching (see :func:`real_batch_size`).
    net_optimizer: SGD of the nets (reference: 0.01 / 0.9 / 5e-4).
    magnitude: Acc-DD's perturbation range (low, high), 0 <= low <= high.
    population_options: ``population.run`` options of the nets' training (default vmap).
    model_map: how ``matching.matching_losses`` runs the M nets (None: "map" on CPU, "vmap"
      elsewhere).
    class_map: how it runs the K classes.
    trajectory_chunk: None (one inner iteration per step) or C >= 1; the step then advances
      ``state.step`` by C x ``inner_iterations`` (``loop.fit``'s ``step_size``) and must start at
      an outer iteration's first inner iteration.

  Returns:
    ``step(state: DistillState, data: DistillData) -> (state, {"loss", ["net_accuracy"]})``,
    the metrics averaged over the inner iterations the step runs.
  """
  image_shape = tuple(image_shape)
  apply_fn = train_lib.model_apply_fn(model, mean, std)
  images_optimizer = image_optimizer(method, images_per_class, std)
  augmentation = method.match_dsa()
  if method.objective == "gradient":
    objective = matching.gradient_match(apply_fn, matching.get_gradient_distance(method.distance))
  else:
    objective = matching.distribution_match(matching.embedding_fn(model, mean, std))
  synthetic_size = synthetic.decoded_size(images_per_class, method.factor, method.synthetic_max)
  real_labels = jnp.broadcast_to(jnp.arange(num_classes)[:, None], (num_classes, real_batch))
  synthetic_labels = jnp.broadcast_to(jnp.arange(num_classes)[:, None],
                                      (num_classes, synthetic_size))
  new_net = functools.partial(augment_models.init_net, model=model, image_shape=image_shape,
                              optimizer=net_optimizer)
  # XLA:CPU has no fast grouped (vmapped) convolution: one net at a time there.
  model_map = model_map or ("map" if jax.default_backend() == "cpu" else "vmap")
  net_step = _net_training(method, apply_fn, net_optimizer, mean, std, images_per_class,
                           num_classes, population_options or {})
  inner = method.inner_iterations

  def new_nets(run_key, outer, pool):
    keys = jax.random.split(jax.random.fold_in(jax.random.fold_in(run_key, 0), outer),
                            num_models)
    if method.models == "random":
      return jax.vmap(new_net)(keys)

    def from_pool(member_key):
      pick_key, perturb_key, state_key = jax.random.split(member_key, 3)
      index = jax.random.randint(pick_key, (), 0, population.size(pool["params"]))
      params = jax.tree.map(lambda leaf: leaf[index], pool["params"])
      batch_stats = jax.tree.map(lambda leaf: leaf[index], pool["batch_stats"])
      if method.perturb:
        params = augment_models.perturb(perturb_key, params, magnitude=magnitude)
      return train_lib.create_train_state(state_key, params, batch_stats, net_optimizer)

    return jax.vmap(from_pool)(keys)

  def augment(params, x):
    return dsa.apply(params, x, mean=mean, std=std) if augmentation.ops else x

  def loss_of(images, params, batch_stats, data, key):
    real_key, synthetic_key, augment_key = jax.random.split(key, 3)
    real = jax.vmap(sample_real, in_axes=(0, None, None))(
        jax.random.split(real_key, num_models), data, real_batch)
    syn = jax.vmap(lambda class_key, class_images: synthetic.sample_class(
        class_key, class_images, method.factor, method.synthetic_max))(
            jax.random.split(synthetic_key, num_classes), images)
    draws = jax.vmap(jax.vmap(lambda k: dsa.sample_params(k, augmentation, image_shape)))(
        jax.random.split(augment_key, (num_models, num_classes)))
    real_x = jax.vmap(jax.vmap(augment))(draws, data_lib.to_unit(real))
    syn_x = jax.vmap(jax.vmap(augment), in_axes=(0, None))(draws, syn)
    return matching.matching_loss(objective, params, batch_stats, real_x, real_labels,
                                  syn_x, synthetic_labels, model_map=model_map,
                                  class_map=class_map)

  def update_images(run_key, step, images, opt_state, params, batch_stats, data):
    """Inner iteration ``step``'s image update against the M nets ``(params, batch_stats)``."""
    images = jnp.where(step % inner == 0, synthetic.clamp(images), images)
    step_key = jax.random.fold_in(jax.random.fold_in(run_key, 1), step)
    loss, grads = jax.value_and_grad(loss_of)(images_optimizer.lookahead(images, opt_state),
                                              params, batch_stats, data, step_key)
    images, opt_state = images_optimizer.update(grads, opt_state, images)
    return images, opt_state, loss

  def step(state: DistillState, data: DistillData):
    # A select, not a lax.cond: XLA:GPU stops the host at every conditional to read its
    # predicate, and fresh nets cost little next to an inner iteration's matching and training.
    nets = jax.tree.map(functools.partial(jnp.where, state.step % inner == 0),
                        new_nets(state.key, state.step // inner, data.pool), state.nets)
    images, image_opt_state, loss = update_images(state.key, state.step, state.images,
                                                  state.image_opt_state, nets.params,
                                                  nets.batch_stats, data)
    metrics = {"loss": loss}
    if net_step is not None:
      nets, net_metrics = net_step(nets, data, images)
      metrics["net_accuracy"] = jnp.mean(net_metrics["accuracy"])
    return state._replace(step=state.step + 1, images=images, image_opt_state=image_opt_state,
                          nets=nets), metrics

  if trajectory_chunk is None:
    return step
  check_trajectory_chunk(method)
  chunk = trajectory_chunk

  def trajectory_step(state: DistillState, data: DistillData):
    outers = state.step // inner + jnp.arange(chunk)
    nets = jax.vmap(new_nets, in_axes=(None, 0, None))(state.key, outers, data.pool)
    nets = jax.tree.map(lambda leaf: leaf.reshape(chunk * num_models, *leaf.shape[2:]), nets)

    def train(nets, _):
      nets_after, net_metrics = net_step(nets, data, None)
      return nets_after, ((nets.params, nets.batch_stats), jnp.mean(net_metrics["accuracy"]))

    # Leaves [inner, C * M, ...]: read in place below (a transposed copy for the scan's xs
    # would hold them twice).
    nets, (snapshots, accuracy) = jax.lax.scan(train, nets, None, length=inner)

    def match(carry, offset):
      params, batch_stats = jax.tree.map(
          functools.partial(_nets_at, offset=offset, inner=inner, num_models=num_models),
          snapshots)
      images, opt_state, loss = update_images(state.key, state.step + offset, *carry, params,
                                              batch_stats, data)
      return (images, opt_state), loss

    (images, image_opt_state), losses = jax.lax.scan(
        match, (state.images, state.image_opt_state), jnp.arange(chunk * inner))
    last = jax.tree.map(lambda leaf: leaf.reshape(chunk, num_models, *leaf.shape[1:])[-1], nets)
    return state._replace(step=state.step + chunk * inner, images=images,
                          image_opt_state=image_opt_state, nets=last), {
                              "loss": jnp.mean(losses), "net_accuracy": jnp.mean(accuracy)}

  return trajectory_step


def _nets_at(leaf: jax.Array, *, offset: jax.Array, inner: int, num_models: int) -> jax.Array:
  """The M nets of outer iteration ``offset // inner`` at its inner step ``offset % inner``, from
  a snapshot leaf ``[inner, C * M, ...]``."""
  leaf = jax.lax.dynamic_index_in_dim(leaf, offset % inner, keepdims=False)
  return jax.lax.dynamic_slice_in_dim(leaf, offset // inner * num_models, num_models)


def check_trajectory_chunk(method: Method) -> None:
  """Raises UserError unless ``method``'s nets train on the real data between image updates,
  which a ``trajectory_chunk`` needs (otherwise its step would fail obscurely)."""
  if method.net_data != "real" or method.net_steps == 0:
    raise UserError(f"trajectory_chunk trains the nets before matching against them, which "
                    f"needs nets that train on the real data; method {method.name!r} trains "
                    f"them on {method.net_data!r} for {method.net_steps} steps")


def net_schedule(method: Method, num_classes: int, images_per_class: int) -> tuple[int, int]:
  """(batch size, SGD steps) of the nets' training after each image update.

  On the synthetic set the batch is at most the set's decoded size, and an epoch is
  ``ceil(size / batch)`` batches, as DC/DSA's shuffled loader of batch 256 gives.
  """
  if method.net_data != "synthetic":
    return method.net_batch, method.net_steps
  synthetic_size = num_classes * images_per_class * method.factor ** 2
  batch_size = min(method.net_batch, synthetic_size)
  batches = -(-synthetic_size // batch_size) if method.net_unit == "epoch" else 1
  return batch_size, method.net_steps * batches


def _net_training(method: Method, apply_fn: train_lib.ApplyFn,
                  optimizer: optax.GradientTransformation, mean: Sequence[float],
                  std: Sequence[float], images_per_class: int, num_classes: int,
                  population_options: dict[str, Any]):
  """``(nets, data, images) -> (nets, metrics)``: the nets' steps after an image update, or
  None when the method does not train them."""
  if method.net_data == "none" or method.net_steps == 0:
    return None
  strategy = method.net_dsa()
  mix = None
  if strategy.ops or method.net_mix_probability > 0:
    mix = dsa.dsa_cutmix(strategy, mix_probability=method.net_mix_probability, mean=mean,
                         std=std)
  batch_size, num_steps = net_schedule(method, num_classes, images_per_class)
  step = train_lib.make_train_step(apply_fn, optimizer, batch_size=batch_size, augment=None,
                                   mix=mix)
  run = train_lib.repeat(population.run(step, **population_options), num_steps)

  def train_nets(nets, data, images):
    if method.net_data == "real":
      return run(nets, train_lib.Data(data.images, data.labels))
    decoded = jax.vmap(lambda class_images: synthetic.decode(class_images, method.factor))(
        jax.lax.stop_gradient(images))
    labels = jnp.repeat(jnp.arange(num_classes, dtype=jnp.int32), decoded.shape[1])
    return run(nets, train_lib.Data(_quantize(decoded.reshape(-1, *decoded.shape[2:])), labels))

  return train_nets
