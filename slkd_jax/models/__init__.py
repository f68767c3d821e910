"""The model zoo: CIFAR and ImageNet networks of the KD literature.

``create(name, num_classes, dtype)`` builds a flax module; ``available()``
lists the names. See :mod:`slkd_jax.models.registry` for the conventions.
``module.apply(..., features=True)`` returns an :class:`Outputs` (logits and
mdistiller's feature lists) instead of the bare logits.
"""

from slkd_jax.models.registry import (ModelInfo, available, create, info,
                                      register)
from slkd_jax.models.layers import count_params
from slkd_jax.models.outputs import Outputs, feature_shapes, output_shapes

# Importing a family module registers its networks.
from slkd_jax.models import resnet_cifar  # noqa: F401
from slkd_jax.models import wrn  # noqa: F401
from slkd_jax.models import vgg  # noqa: F401
from slkd_jax.models import resnet_imagenet  # noqa: F401
from slkd_jax.models import mobilenetv2  # noqa: F401
from slkd_jax.models import shufflenetv1  # noqa: F401
from slkd_jax.models import shufflenetv2  # noqa: F401
from slkd_jax.models import mobilenet_imagenet  # noqa: F401
from slkd_jax.models import resnet_kuangliu  # noqa: F401

__all__ = ["ModelInfo", "Outputs", "available", "create", "info", "register",
           "count_params", "feature_shapes", "output_shapes"]
