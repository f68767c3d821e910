"""Jitted steps kept per program: a stage built again reuses its steps.

Each driver run (a stage, its resume, each of a table's cells, a study's
separate-run check) resolves a fresh :class:`~slkd_jax.stage.Stage` and
builds its steps from it. ``jax.jit`` keeps compiled programs per function
object, so a new closure over an equal stage traces, lowers and compiles
(or reads from the persistent cache) the same program again: seconds per
run. The step builders are memoized here on the stage's
:meth:`~slkd_jax.stage.Stage.program_key` (the part of a stage that decides
the program) and on their other arguments.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import inspect
import types
from typing import Callable, TypeVar

import flax.linen as nn
import numpy as np

#: Programs kept per builder (least recently used dropped first): a table
#: runs ~10 methods in one process; each kept program holds its executable.
MAX_PROGRAMS = 16

Builder = TypeVar("Builder", bound=Callable)


class _Same:
  """Equal only to itself: an unhashable object that is not a container
  (the reference is held, so its ``id`` is never reused while cached)."""
  __slots__ = ("obj",)

  def __init__(self, obj):
    self.obj = obj

  def __hash__(self):
    return id(self.obj)

  def __eq__(self, other):
    return isinstance(other, _Same) and other.obj is self.obj


def frozen(value):
  """A hashable value equal exactly when ``value`` builds the same program:
  containers by their items, scalars with their type (``1`` and ``1.0``,
  ``0.0`` and ``-0.0`` differ), flax modules as flax compares them, any
  other unhashable object by identity."""
  if isinstance(value, dict):
    return ("dict", tuple(sorted((k, frozen(v)) for k, v in value.items())))
  if isinstance(value, types.SimpleNamespace):
    return ("namespace", frozen(vars(value)))
  if isinstance(value, (list, tuple)):
    return (type(value), tuple(frozen(v) for v in value))
  if isinstance(value, (float, complex, np.inexact)):
    return (type(value), repr(value))
  if isinstance(value, nn.Module):
    return _hashable_or_same(value)
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    return (type(value), tuple((f.name, frozen(getattr(value, f.name)))
                               for f in dataclasses.fields(value)))
  return (type(value), _hashable_or_same(value))


def _hashable_or_same(value):
  try:
    hash(value)
  except TypeError:
    return _Same(value)
  return value


def per_program(builder: Builder) -> Builder:
  """Memoizes ``builder(stage, ...)`` (a jitted program) on
  ``stage.program_key()`` and its other arguments (mesh, impl, switches:
  hashable), however they are passed, defaults filled in."""
  cache = collections.OrderedDict()
  signature = inspect.signature(builder)

  @functools.wraps(builder)
  def cached(*args, **kwargs):
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    stage, *rest = bound.arguments.values()
    key = (stage.program_key(), tuple(rest))
    if key in cache:
      cache.move_to_end(key)
      return cache[key]
    built = cache[key] = builder(*bound.args, **bound.kwargs)
    while len(cache) > MAX_PROGRAMS:
      cache.popitem(last=False)
    return built

  cached.cache_clear = cache.clear
  return cached
