"""Evaluating a (distilled) training set: N fresh nets trained on it as ONE population.

IDC/Acc-DD's protocol (``train.py``/``test.py`` of the reference): fresh ConvNet-3s trained on
the decoded set with SGD (lr 0.01, momentum 0.9, coupled weight decay 5e-4), batch 64 (the whole
set when smaller), lr x0.2 at 2/3 and 5/6 of the epochs (CIFAR: 1000), per-sample DSA
(color, crop, flip, scale, rotate; cutout is dropped when CutMix is on) and CutMix with
probability 0.5. The reported number is the mean +- std over the N nets of the FINAL test
accuracy (the reference also reports the best epoch, selected on the test set; not here).
Differences: batches drop the remainder of an epoch (``train.make_train_step``), and the set is
read as 8-bit images (``synthetic.decoded_split``).
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax

from jaxtickets import data as data_lib
from jaxtickets import loop, population
from jaxtickets import train as train_lib
from jaxtickets.distill import augment_models, dsa


@dataclasses.dataclass(frozen=True)
class Protocol:
  """How a training set is evaluated (defaults: the reference's CIFAR protocol).

  Attributes:
    num_nets: N >= 1 nets trained from different inits (one population).
    epochs: passes over the set (>= 1).
    batch_size: examples per step (>= 1; capped at the set size).
    learning_rate: initial SGD rate (> 0).
    momentum: SGD momentum in [0, 1].
    weight_decay: coupled weight decay (>= 0).
    milestones: fractions in [0, 1] of the epochs where the rate is multiplied by ``gamma``.
    gamma: the decay factor (> 0).
    strategy: per-sample DSA ops (``dsa.Strategy.parse``'s strings).
    composition: DSA composition ("idc").
    mix_probability: CutMix probability in [0, 1] (0: none).
    checkpoint_every: epochs (>= 1) between checkpoints of a run with a workdir.
  """
  num_nets: int = 5
  epochs: int = 1000
  batch_size: int = 64
  learning_rate: float = 0.01
  momentum: float = 0.9
  weight_decay: float = 5e-4
  milestones: tuple[float, ...] = (2 / 3, 5 / 6)
  gamma: float = 0.2
  strategy: str = "color_crop_flip_scale_rotate"
  composition: str = "idc"
  mix_probability: float = 0.5
  checkpoint_every: int = 100

  def dsa_strategy(self) -> dsa.Strategy:
    """The evaluation nets' per-sample DSA ops."""
    return dsa.Strategy.parse(self.strategy, self.composition)


def optimizer(protocol: Protocol, steps_per_epoch: int) -> optax.GradientTransformation:
  """SGD with the protocol's step decays (PyTorch's MultiStepLR at ``int(f * epochs)``; at a
  few epochs two milestones can coincide, and the rate then decays twice there, as in IDC)."""
  milestones = [int(fraction * protocol.epochs) for fraction in protocol.milestones]
  schedule = train_lib.multistep_schedule(protocol.learning_rate, steps_per_epoch, milestones,
                                          protocol.gamma)
  return train_lib.sgd(schedule, momentum=protocol.momentum,
                       weight_decay=protocol.weight_decay)


def batch_size(protocol: Protocol, num_examples: int) -> int:
  """The protocol's batch, at most the evaluated set (IPC 1 sets are smaller than a batch)."""
  return min(protocol.batch_size, num_examples)


def make_step(apply_fn: train_lib.ApplyFn, protocol: Protocol,
              net_optimizer: optax.GradientTransformation, num_examples: int,
              mean: Sequence[float], std: Sequence[float]):
  """One training step of ONE evaluation net (DSA + CutMix), for ``population.run``."""
  mix = dsa.dsa_cutmix(protocol.dsa_strategy(), mix_probability=protocol.mix_probability,
                       mean=mean, std=std)
  return train_lib.make_train_step(apply_fn, net_optimizer,
                                   batch_size=batch_size(protocol, num_examples), augment=None,
                                   mix=mix)


def test_accuracies(apply_fn: train_lib.ApplyFn, nets: train_lib.TrainState,
                    test: train_lib.Data) -> np.ndarray:
  """f64[N]: every net's accuracy on the whole test split (eval mode)."""

  def accuracy(params, batch_stats):
    return train_lib.evaluate(apply_fn, params, batch_stats, test)["accuracy"]

  return np.asarray(jax.jit(jax.vmap(accuracy))(nets.params, nets.batch_stats), np.float64)


def summarize(accuracies: Sequence[float]) -> dict[str, Any]:
  """{"mean", "std" (population, as the reference's np.std), "accuracies"}."""
  values = np.asarray(accuracies, np.float64)
  return {"mean": float(values.mean()), "std": float(values.std()),
          "accuracies": values.tolist()}


def evaluate_split(key: jax.Array, model: nn.Module, split: data_lib.Split,
                   test: train_lib.Data, protocol: Protocol, *, mean: Sequence[float],
                   std: Sequence[float], workdir: str | pathlib.Path | None = None,
                   progress: bool = True, description: str = "evaluate",
                   model_name: str = "convnet3",
                   population_options: dict[str, Any] | None = None) -> dict[str, Any]:
  """Trains ``protocol.num_nets`` fresh nets on ``split`` as one population; test accuracies.

  Args:
    key: PRNG key of the inits and data orders.
    model: the evaluation network.
    split: the training set (u8 images, e.g. ``synthetic.decoded_split``).
    test: the test split on device.
    protocol: the evaluation protocol.
    mean: per-channel normalization mean.
    std: per-channel normalization std.
    workdir: resume from / checkpoint into this directory (``loop.fit``), or None.
    progress: tqdm bar.
    description: the bar's label.
    model_name: the model's registry name (picks the default population strategy).
    population_options: ``population.run`` options (default: ``population.default_strategy``).

  Returns:
    :func:`summarize` of the final test accuracies plus ``"steps"`` and ``"seconds"`` (the
    training's wall time, summed over resumed runs: :func:`loop.wall_seconds`).
  """
  num_examples = len(split.labels)
  steps_per_epoch = data_lib.steps_per_epoch(num_examples, batch_size(protocol, num_examples))
  net_optimizer = optimizer(protocol, steps_per_epoch)
  apply_fn = train_lib.model_apply_fn(model, mean, std)
  nets = augment_models.init_nets(key, model, split.images.shape[1:], protocol.num_nets,
                                  net_optimizer)
  if population_options is None:
    num_params = sum(leaf.size for leaf in jax.tree.leaves(nets.params)) // protocol.num_nets
    population_options = population.default_strategy(model_name, num_params)
  step = population.run(make_step(apply_fn, protocol, net_optimizer, num_examples, mean, std),
                        **population_options)
  num_steps = protocol.epochs * steps_per_epoch
  nets, records = loop.fit(step, nets, train_lib.device_data(split), num_steps=num_steps,
                           eval_every=min(num_steps, protocol.checkpoint_every * steps_per_epoch),
                           workdir=workdir, progress=progress, description=description)
  result = summarize(test_accuracies(apply_fn, nets, test))
  return {**result, "steps": num_steps, "seconds": loop.wall_seconds(records)}
