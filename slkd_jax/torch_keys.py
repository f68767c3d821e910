"""PyTorch state_dicts ↔ flax variables: the naming rule and the conversion.

Our parameter paths are the PyTorch module paths with every numeric segment
joined to its parent by ``_`` (see :mod:`slkd_jax.models.registry`), so each
flax module maps back to exactly one PyTorch module, and the kind of flax
module (read off its variables) says how its tensors translate:

* Conv (4-D ``kernel`` [+ ``bias``]): ``weight`` OIHW → HWIO (grouped and
  depthwise weights ``(O, I/g, k, k)`` become ``(k, k, I/g, O)``);
* Linear (2-D ``kernel`` + ``bias``): ``weight`` ``(out, in)`` → transposed;
* BatchNorm (params ``scale``, ``bias``; batch_stats ``mean``, ``var``):
  ``weight``, ``bias``, ``running_mean``, ``running_var``;
  ``num_batches_tracked`` is ignored.

The mapping is strict: every flax variable must be filled and every PyTorch
tensor used, with the right shape; all violations are reported together.
Works on numpy arrays or torch tensors; imports no torch itself.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import numpy as np

from slkd_jax.errors import ConversionError

# Keys under which training scripts nest the state_dict in a checkpoint dict
# (mdistiller / RepDistiller: 'model'; others: 'state_dict', 'net').
_NESTING_KEYS = ("model", "state_dict", "net")
# Prefixes added by wrappers: nn.DataParallel / DistributedDataParallel, and
# torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


# ---------------------------------------------------------------------------
# The mapping.


@dataclasses.dataclass(frozen=True)
class _Slot:
  """One flax variable and the PyTorch tensor that fills it."""
  torch_key: str
  collection: str
  flax_path: tuple[str, ...]
  torch_shape: tuple[int, ...]
  to_flax: Callable[[np.ndarray], np.ndarray]
  kind: str


def _identity(x: np.ndarray) -> np.ndarray:
  return x


def _conv_to_flax(w: np.ndarray) -> np.ndarray:
  return np.transpose(w, (2, 3, 1, 0))  # OIHW -> HWIO


def _linear_to_flax(w: np.ndarray) -> np.ndarray:
  return np.transpose(w)  # (out, in) -> (in, out)


def torch_module_path(flax_path: tuple[str, ...]) -> str:
  """The PyTorch module path of a flax module path (the naming rule inverted).

  ``('layer1_0', 'downsample_1')`` → ``'layer1.0.downsample.1'``,
  ``('blocks_2_1', 'conv_0')`` → ``'blocks.2.1.conv.0'``,
  ``('block1', 'layer_0', 'convShortcut')`` → ``'block1.layer.0.convShortcut'``.
  Only all-digit pieces after an ``_`` are indices; other underscores stay.
  """
  parts = []
  for segment in flax_path:
    pieces = segment.split("_")
    name = pieces[0]
    for piece in pieces[1:]:
      name += ("." if piece.isdigit() else "_") + piece
    parts.append(name)
  return ".".join(parts)


def flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()
             ) -> dict[tuple[str, ...], Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(flatten(value, prefix + (key,)))
    else:
      out[prefix + (key,)] = value
  return out


def unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for path, value in flat.items():
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return out


def _group_by_module(flat: Mapping[tuple[str, ...], Any]
                     ) -> dict[tuple[str, ...], dict[str, Any]]:
  groups: dict[tuple[str, ...], dict[str, Any]] = {}
  for path, value in flat.items():
    groups.setdefault(path[:-1], {})[path[-1]] = value
  return groups


def _slots(abstract: Mapping[str, Any]) -> list[_Slot]:
  """Every flax variable of ``abstract`` with its PyTorch key and transform.

  The module kind is read off the variables a flax module owns, so new
  families need no code here as long as they follow the naming rule.
  """
  params = _group_by_module(flatten(abstract.get("params", {})))
  stats = _group_by_module(flatten(abstract.get("batch_stats", {})))
  unknown = set(abstract) - {"params", "batch_stats"}
  if unknown:
    raise NotImplementedError(f"no PyTorch mapping for variable collections "
                              f"{sorted(unknown)}")
  slots = []
  for module in sorted(set(params) | set(stats)):
    p, s = params.get(module, {}), stats.get(module, {})
    base = torch_module_path(module)

    def slot(torch_name, collection, leaf, shape, to_flax, kind,
             module=module, base=base):
      return _Slot(f"{base}.{torch_name}", collection, module + (leaf,),
                   tuple(int(d) for d in shape), to_flax, kind)

    if set(p) == {"scale", "bias"} and set(s) == {"mean", "var"}:
      slots += [
          slot("weight", "params", "scale", p["scale"].shape, _identity, "bn"),
          slot("bias", "params", "bias", p["bias"].shape, _identity, "bn"),
          slot("running_mean", "batch_stats", "mean", s["mean"].shape,
               _identity, "bn"),
          slot("running_var", "batch_stats", "var", s["var"].shape, _identity,
               "bn"),
      ]
    elif (not s and "kernel" in p and set(p) <= {"kernel", "bias"}
          and len(p["kernel"].shape) in (2, 4)):
      shape = p["kernel"].shape
      if len(shape) == 4:  # HWIO -> OIHW
        kind, to_flax = "conv", _conv_to_flax
        torch_shape = (shape[3], shape[2], shape[0], shape[1])
      else:
        kind, to_flax = "linear", _linear_to_flax
        torch_shape = (shape[1], shape[0])
      slots.append(slot("weight", "params", "kernel", torch_shape, to_flax,
                        kind))
      if "bias" in p:
        slots.append(slot("bias", "params", "bias", p["bias"].shape,
                          _identity, kind))
    else:
      raise NotImplementedError(
          f"no PyTorch mapping for flax module {'/'.join(module)} with params "
          f"{sorted(p)} and batch_stats {sorted(s)}")
  return slots


def abstract_variables(arch: str, num_classes: int | None = None
                       ) -> dict[str, Any]:
  """Shapes of ``models.create(arch, num_classes)``'s variables, no compute.

  Returns the ``{'params': ..., 'batch_stats': ...}`` tree of
  ``jax.ShapeDtypeStruct`` from ``jax.eval_shape`` of ``model.init``.
  """
  import jax
  import jax.numpy as jnp

  from slkd_jax import models

  model = models.create(arch, num_classes)
  size = models.info(arch).image_size
  return jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, size, size, 3), jnp.float32),
      train=False))


# ---------------------------------------------------------------------------
# Reading state_dicts.


def _is_tensor_like(value: Any) -> bool:
  return isinstance(value, np.ndarray) or (
      hasattr(value, "shape") and hasattr(value, "dtype"))


def unwrap_state_dict(checkpoint: Any) -> dict[str, Any]:
  """The flat ``{name: tensor}`` state_dict inside a loaded checkpoint.

  Accepts a raw state_dict, a dict holding it under ``'model'``,
  ``'state_dict'`` or ``'net'`` (nested any number of times), or a whole
  ``nn.Module``; strips ``module.`` (DataParallel) and ``_orig_mod.``
  (torch.compile) prefixes.
  """
  obj = checkpoint
  for _ in range(8):  # bounded: a checkpoint never nests deeper than this
    if hasattr(obj, "state_dict") and callable(obj.state_dict):
      obj = obj.state_dict()
      continue
    if isinstance(obj, Mapping):
      # A nested dict (or module) under a known key is the state_dict; a
      # tensor under such a key would be a parameter of a raw state_dict.
      inner = next((obj[k] for k in _NESTING_KEYS if k in obj
                    and (isinstance(obj[k], Mapping)
                         or hasattr(obj[k], "state_dict"))), None)
      if inner is not None:
        obj = inner
        continue
    break
  if not isinstance(obj, Mapping):
    raise ConversionError(f"expected a state_dict (a mapping of names to tensors), "
                     f"got {type(obj).__name__}")
  if not any(_is_tensor_like(v) for v in obj.values()):
    raise ConversionError(
        "no tensors found in the checkpoint: expected a state_dict or a dict "
        f"holding one under one of {list(_NESTING_KEYS)}; top-level keys: "
        f"{sorted(map(str, obj))[:20]}")
  out = {}
  for key, value in obj.items():
    key = str(key)
    stripped = True
    while stripped:
      stripped = False
      for prefix in _WRAPPER_PREFIXES:
        if key.startswith(prefix):
          key, stripped = key[len(prefix):], True
    if key in out:
      raise ConversionError(f"two tensors map to {key!r} after stripping wrapper "
                       f"prefixes {_WRAPPER_PREFIXES}")
    out[key] = value
  return out


def _to_numpy(value: Any) -> np.ndarray:
  """A torch tensor (any device / float dtype) or array as a numpy array.

  Float tensors keep their precision (float64 stays float64) except
  bfloat16, which numpy lacks and which float32 holds exactly.
  """
  if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch.Tensor
    tensor = value.detach().cpu()
    if tensor.is_floating_point() and tensor.element_size() < 4:
      tensor = tensor.float()
    return tensor.numpy()
  return np.asarray(value)


def _fmt_shape(shape: tuple[int, ...]) -> str:
  return str(tuple(int(d) for d in shape))


def _infer_num_classes(slots: list[_Slot], state_dict: Mapping[str, Any]
                       ) -> int | None:
  """Rows of the classifier's weight, if the state_dict has it; with several
  classifiers (TESKD's backbone and branch ``fc``s), their common width."""
  weights = [s for s in slots
             if s.kind == "linear" and s.torch_key.endswith(".weight")]
  rows = set()
  for slot in weights:
    shape = getattr(state_dict.get(slot.torch_key), "shape", None)
    if shape is None or len(shape) != 2 or int(shape[0]) < 1:
      return None
    rows.add(int(shape[0]))
  return rows.pop() if len(rows) == 1 else None


def canonical_torch_key(key: str) -> str:
  """``key`` with every ``_<digits>`` piece of a module name read as an
  index (``fuse_3.0.weight`` → ``fuse.3.0.weight``): the form
  :func:`torch_module_path` produces, so PyTorch attributes whose *names*
  end in ``_<digit>`` (TESKD's ``fuse_1..3``) still find their slots.
  Keys without such pieces are unchanged."""
  module, _, leaf = key.rpartition(".")
  if not module:
    return key
  return f"{torch_module_path(tuple(module.split('.')))}.{leaf}"


def _canonical_state_dict(state_dict: Mapping[str, Any]
                          ) -> tuple[dict[str, Any], dict[str, str]]:
  """``(state_dict by canonical key, canonical → original key)``."""
  out, original = {}, {}
  for key, value in state_dict.items():
    canon = canonical_torch_key(key)
    if canon in out:
      raise ConversionError(f"the state_dict holds both {original[canon]!r} "
                            f"and {key!r}, which name the same tensor")
    out[canon], original[canon] = value, key
  return out, original


def convert_state_dict(arch: str, state_dict: Mapping[str, Any],
                       num_classes: int | None = None,
                       dtype: Any = np.float32) -> dict[str, Any]:
  """Convert a PyTorch state_dict to flax variables of ``models.create(arch)``.

  Args:
    arch: registry name (``models.available()``), e.g. ``'resnet32x4'``.
    state_dict: PyTorch tensors or numpy arrays keyed by the reference zoo's
      names (docs/method.md §8). A checkpoint dict (``'model'`` /
      ``'state_dict'`` / ``'net'``) and ``module.`` prefixes are unwrapped.
    num_classes: classifier width; inferred from the classifier weight when
      not given.
    dtype: numpy dtype of the returned arrays. float32 (default) for the
      usual float32 / bfloat16 runs; ``np.float64`` keeps float64 tensors
      exact for a float64 run.

  Returns:
    ``{'params': ..., 'batch_stats': ...}``: nested dicts of ``dtype`` numpy
    arrays, ready for ``models.create(arch, num_classes).apply``.

  Raises:
    ValueError: naming every missing tensor, unused tensor and wrongly shaped
      tensor at once.
  """
  from slkd_jax import models

  state_dict, original = _canonical_state_dict(unwrap_state_dict(state_dict))
  default = models.info(arch).default_num_classes
  abstract = abstract_variables(
      arch, default if num_classes is None else num_classes)
  slots = _slots(abstract)
  if num_classes is None:
    inferred = _infer_num_classes(slots, state_dict)
    if inferred is not None and inferred != default:
      num_classes = inferred
      slots = _slots(abstract_variables(arch, num_classes))
    else:
      num_classes = default

  bn_modules = {s.torch_key.rsplit(".", 1)[0] for s in slots if s.kind == "bn"}
  missing, mismatched, not_tensors = [], [], []
  flat: dict[tuple[str, ...], np.ndarray] = {}
  for s in slots:
    if s.torch_key not in state_dict:
      missing.append(f"{s.torch_key} {_fmt_shape(s.torch_shape)}")
      continue
    value = state_dict[s.torch_key]
    if not _is_tensor_like(value):
      not_tensors.append(f"{s.torch_key} ({type(value).__name__})")
      continue
    array = _to_numpy(value)
    if tuple(array.shape) != s.torch_shape:
      mismatched.append(f"{s.torch_key}: expected {_fmt_shape(s.torch_shape)}, "
                        f"got {_fmt_shape(tuple(array.shape))}")
      continue
    # A copy: torch's .numpy() shares memory with the (mutable) tensor.
    flat[(s.collection,) + s.flax_path] = np.array(
        s.to_flax(array), dtype=dtype, order="C", copy=True)
  used = {s.torch_key for s in slots}
  unexpected = []
  for key, value in state_dict.items():
    if key in used:
      continue
    module, _, leaf = key.rpartition(".")
    if leaf == "num_batches_tracked" and module in bn_modules:
      continue  # a training counter, not a variable of the model
    shape = getattr(value, "shape", None)
    unexpected.append(original[key] + (f" {_fmt_shape(tuple(shape))}"
                                       if shape is not None else ""))

  if missing or unexpected or mismatched or not_tensors:
    lines = [f"cannot convert the PyTorch state_dict to {arch!r} "
             f"({num_classes} classes):"]
    for title, items in (("missing keys", missing),
                         ("unexpected keys", unexpected),
                         ("shape mismatches", mismatched),
                         ("not tensors", not_tensors)):
      if items:
        lines.append(f"  {title} ({len(items)}):")
        lines += [f"    {item}" for item in items]
    if len(missing) > len(slots) // 2:
      lines.append(f"  (most keys are missing: is {arch!r} the architecture "
                   f"this checkpoint was trained as?)")
    raise ConversionError("\n".join(lines))
  return unflatten(flat)


def num_classes_of(variables: Mapping[str, Any]) -> int:
  """Output width of the Linear layers (2-D kernels) in ``variables``: one
  classifier, or several of one width (TESKD's backbone and branches)."""
  widths = {int(np.shape(v)[1])
            for path, v in flatten(variables.get("params", {})).items()
            if path[-1] == "kernel" and len(np.shape(v)) == 2}
  if len(widths) != 1:
    raise ConversionError(f"cannot infer num_classes: expected Linear layers "
                          f"of one width, found widths {sorted(widths)}; "
                          f"pass num_classes")
  return widths.pop()


def check_variables(variables: Mapping[str, Any], arch: str,
                     num_classes: int, what: str) -> None:
  """Raise unless ``variables`` has exactly the tree and shapes of the model."""
  expected = {k: tuple(v.shape)
              for k, v in flatten(abstract_variables(arch, num_classes)).items()}
  got = {k: tuple(np.shape(v)) for k, v in flatten(variables).items()}
  problems = [f"missing {'/'.join(k)}" for k in sorted(set(expected) - set(got))]
  problems += [f"unexpected {'/'.join(k)}"
               for k in sorted(set(got) - set(expected))]
  problems += [f"{'/'.join(k)}: expected {_fmt_shape(expected[k])}, got "
               f"{_fmt_shape(got[k])}"
               for k in sorted(set(expected) & set(got)) if expected[k] != got[k]]
  if problems:
    raise ConversionError(f"{what} does not match {arch!r} ({num_classes} classes):\n"
                     + "\n".join(f"  {p}" for p in problems))
