"""Model zoo: CIFAR-style classifiers with shared options, built by name.

>>> model = get_model("resnet18", num_classes=10, norm="batch_noaffine", dtype="bfloat16")
>>> variables = model.init(key, jnp.zeros((1, 32, 32, 3)))
>>> logits = model.apply(variables, x, train=False)   # f32[B, 10]

Every model takes ``x: f32[B, H, W, C]`` normalized images and returns ``f32[B, num_classes]``
logits; the options common to all of them are documented on ``layers.Classifier``. Param paths
follow the naming convention in ``layers`` (``stem``, ``head``, ``*norm*``, ``shortcut``), and
``model.block_names`` lists the top-level modules in forward order; ``block_outputs`` returns their
outputs (sown into ``intermediates[BLOCK_OUTPUTS]``) for representation-similarity studies.
"""

import dataclasses

import flax.linen as nn
import jax

from jaxtickets.errors import UserError
from jaxtickets.models.cbr import CBRLargeT, CBRLargeW, CBRSmall, CBRTiny
from jaxtickets.models.convnet import ConvNet
from jaxtickets.models.layers import BLOCK_OUTPUTS, Classifier, check_names
from jaxtickets.models.mobilenet import MobileNetV2
from jaxtickets.models.resnet import ResNet18, ResNet20, ResNet50, ResNet56
from jaxtickets.models.vgg import VGG16
from jaxtickets.models.wrn import WideResNet34x10

_REGISTRY: dict[str, type[Classifier]] = {
    "convnet3": ConvNet, "resnet18": ResNet18, "resnet20": ResNet20, "resnet56": ResNet56,
    "resnet50": ResNet50, "vgg16": VGG16, "wrn34_10": WideResNet34x10, "cbr_large_t": CBRLargeT,
    "cbr_large_w": CBRLargeW, "cbr_small": CBRSmall, "cbr_tiny": CBRTiny,
    "mobilenetv2": MobileNetV2,
}
# Dataclass fields that are not options: flax's parent/name and the required num_classes.
_MODULE_FIELDS = frozenset({"parent", "name", "num_classes"})


def list_models() -> list[str]:
  """Registered model names, sorted."""
  return sorted(_REGISTRY)


def model_options(name: str) -> list[str]:
  """Option names ``get_model(name, ...)`` accepts besides ``num_classes``, sorted."""
  return sorted(field.name for field in dataclasses.fields(_model_class(name))
                if field.name not in _MODULE_FIELDS)


def get_model(name: str, *, num_classes: int, **options) -> nn.Module:
  """Builds the registered model ``name``.

  Args:
    name: one of ``list_models()``.
    num_classes: number of logits, >= 1.
    **options: module attributes such as ``norm``, ``dtype``, ``use_bias``, ``head_bias``,
      ``kernel_init``, ``head_init``, ``width`` (see ``model_options(name)`` and
      ``layers.Classifier`` for their domains).

  Returns:
    An unbound flax module: ``apply(variables, x: f32[B, H, W, C], train=bool)`` returns
    ``f32[B, num_classes]``.

  Raises:
    UserError: unknown model or option name, or an unknown name as the value of ``norm``,
      ``dtype``, an initializer or ``conv_impl``. Other values (``width``, ``use_bias``, an
      architecture's ``depth``, ...) are the caller's to check.
  """
  known = model_options(name)
  unknown = sorted(set(options) - set(known))
  if unknown:
    raise UserError(f"unknown option(s) {', '.join(unknown)} for model {name!r}; "
                    f"known: {', '.join(known)}")
  model = _model_class(name)(num_classes=num_classes, **options)
  check_names(model)
  return model


def block_outputs(model: nn.Module, variables: dict, x: jax.Array, *,
                  train: bool = False) -> dict[str, jax.Array]:
  """Output of every top-level module, keyed by the names in ``model.block_names``.

  Runs the model without updating any state (running statistics are read, not written).

  Args:
    model: a zoo model.
    variables: its {"params": ..., "batch_stats": ...}.
    x: f32[B, H, W, C] normalized images.
    train: run norms in training mode (batch statistics).

  Returns:
    {name: f[B, ...]}; "head" holds the f32[B, num_classes] logits. In forward order when run
    eagerly; a jitted call returns the dict sorted by name (``model.block_names`` has the order).
  """
  _, state = model.apply(variables, x, train=train, mutable=["intermediates", "batch_stats"])
  return state["intermediates"][BLOCK_OUTPUTS]


def _model_class(name: str) -> type[Classifier]:
  if name not in _REGISTRY:
    raise UserError(f"unknown model {name!r}; known: {', '.join(list_models())}")
  return _REGISTRY[name]


__all__ = ["BLOCK_OUTPUTS", "Classifier", "block_outputs", "get_model", "list_models",
           "model_options"]
