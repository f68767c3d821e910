"""The errors a user fixes: the command line prints their one-line message.

Everything raised as a :class:`UserError` (a bad config value, missing or
damaged data, an unreadable checkpoint, a missing optional dependency, a
diverged loss) says what is wrong and what to do, and every command
(:mod:`slkd_jax.cli`) prints it as one line and exits with status 2. Any
other exception is a bug in slkd_jax or a library and keeps its traceback.
"""


class UserError(Exception):
  """Base of the errors whose message is the whole story."""


class ConfigError(UserError, ValueError):
  """A config value is invalid, or conflicts with the run in the workdir."""


class CheckpointError(UserError, RuntimeError):
  """No usable checkpoint could be restored or written."""


class NonFiniteLossError(UserError, FloatingPointError):
  """A loss term became NaN/Inf; the message names the step and the term."""


class ConversionError(ConfigError):
  """A PyTorch checkpoint or a converted teacher cannot be converted or
  loaded (:mod:`slkd_jax.convert_torch`): the message says why and how to
  fix it (a ``ValueError``, as before)."""


class MissingDependencyError(UserError, ImportError):
  """An optional dependency is not installed; the message names the extra."""


def require(module: str, extra: str, purpose: str):
  """``import module``, or a :class:`MissingDependencyError` that says which
  ``pip install`` extra brings it."""
  import importlib
  try:
    return importlib.import_module(module)
  except ImportError:
    raise MissingDependencyError(
        f"{purpose} needs {module!r}, which is not installed: "
        f'pip install -e ".[{extra}]"') from None
