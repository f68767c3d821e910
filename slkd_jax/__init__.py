"""slkd_jax: knowledge distillation through self-learning teachers in JAX.

Importing the package (and its model, loss and step modules) never imports
TensorFlow; only :mod:`slkd_jax.data` does, lazily.
"""

__version__ = "0.1.0"
