"""Import PyTorch teachers (RepDistiller / mdistiller / torchvision zoos).

The CIFAR-100 KD literature distils from the same published PyTorch teachers
(mdistiller's ``cifar_teachers``, torchvision's ImageNet weights); this module
turns such a checkpoint into the flax variables of our model of the same name
and stores it as an orbax checkpoint the trainer can name as its teacher::

  python -m slkd_jax.convert_torch --arch resnet32x4 \\
      --checkpoint cifar_teachers/resnet32x4_vanilla/ckpt_epoch_240.pth \\
      --out teachers/resnet32x4

The mapping is mechanical, not a table per architecture: our parameter paths
are the PyTorch module paths with every numeric segment joined to its parent
by ``_`` (see :mod:`slkd_jax.models.registry`), so each flax module maps back
to exactly one PyTorch module, and the kind of flax module (read off its
variables) says how its tensors translate:

* Conv (4-D ``kernel`` [+ ``bias``]): ``weight`` OIHW → HWIO (grouped and
  depthwise weights ``(O, I/g, k, k)`` become ``(k, k, I/g, O)``);
* Linear (2-D ``kernel`` + ``bias``): ``weight`` ``(out, in)`` → transposed;
* BatchNorm (params ``scale``, ``bias``; batch_stats ``mean``, ``var``):
  ``weight``, ``bias``, ``running_mean``, ``running_var``;
  ``num_batches_tracked`` is ignored.

The mapping is strict: every flax variable must be filled and every PyTorch
tensor used, with the right shape; all violations are reported together.

``torch`` is an optional dependency (``pip install -e ".[torch]"``), imported
only to read ``.pth`` files; :func:`convert_state_dict` also accepts numpy
arrays.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pickle
import shutil
import sys
import warnings
from typing import Any, Callable, Mapping

import numpy as np

from slkd_jax import errors

# Keys under which training scripts nest the state_dict in a checkpoint dict
# (mdistiller / RepDistiller: 'model'; others: 'state_dict', 'net').
_NESTING_KEYS = ("model", "state_dict", "net")
# Prefixes added by wrappers: nn.DataParallel / DistributedDataParallel, and
# torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class ConversionError(errors.ConfigError):
  """A checkpoint cannot be converted or loaded: the message says why and
  how to fix it (a ``ValueError``, as before)."""


METADATA_FILE = "teacher.json"
VARIABLES_DIR = "variables"
_FORMAT = "slkd_jax.teacher"


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


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()
             ) -> dict[tuple[str, ...], Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_flatten(value, prefix + (key,)))
    else:
      out[prefix + (key,)] = value
  return out


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
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
  params = _group_by_module(_flatten(abstract.get("params", {})))
  stats = _group_by_module(_flatten(abstract.get("batch_stats", {})))
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
  return _unflatten(flat)


# ---------------------------------------------------------------------------
# Files.


def _import_torch():
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise errors.MissingDependencyError(
        "reading a PyTorch checkpoint needs torch, an optional extra: "
        "pip install -e '.[torch]' (the CPU build, torch==2.13.0, suffices)"
    ) from e
  return torch


def load_torch_checkpoint(path: str, allow_pickle: bool = True
                          ) -> dict[str, Any]:
  """Read a ``.pth`` file and return its (unwrapped) state_dict.

  Loads with ``torch.load(weights_only=True)`` first. Checkpoints that also
  pickle non-tensor objects (e.g. a numpy ``best_acc``) need the full
  unpickler, which can execute code from the file: with ``allow_pickle`` we
  fall back to it with a warning, otherwise we raise.
  """
  torch = _import_torch()
  hint = ("pass the checkpoint file itself (for mdistiller's release, extract "
          "cifar_teachers.tar and use <name>_vanilla/ckpt_epoch_240.pth)")
  try:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    if not allow_pickle:
      raise ConversionError(
          f"{path} cannot be read with torch.load(weights_only=True) (it "
          f"holds non-tensor objects, or it is not a PyTorch checkpoint). If "
          f"you trust the file, allow the full unpickler (allow_pickle=True; "
          f"drop --weights-only on the command line); else {hint}.") from e
    warnings.warn(
        f"{path} holds objects torch.load(weights_only=True) refuses; "
        f"retrying with weights_only=False, which runs pickled code from the "
        f"file: only do this for checkpoints you trust (allow_pickle=False / "
        f"--weights-only forbids it)", stacklevel=2)
    try:
      checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e2:  # any failure here means: not a checkpoint
      raise ConversionError(f"cannot read {path} as a PyTorch checkpoint "
                       f"({type(e2).__name__}: {e2}); {hint}") from e2
  except (RuntimeError, EOFError, OSError) as e:
    if isinstance(e, FileNotFoundError):
      raise
    raise ConversionError(f"cannot read {path} as a PyTorch checkpoint "
                     f"({type(e).__name__}: {e}); {hint}") from e
  return unwrap_state_dict(checkpoint)


def _num_classes_of(variables: Mapping[str, Any]) -> int:
  """Output width of the Linear layers (2-D kernels) in ``variables``: one
  classifier, or several of one width (TESKD's backbone and branches)."""
  widths = {int(np.shape(v)[1])
            for path, v in _flatten(variables.get("params", {})).items()
            if path[-1] == "kernel" and len(np.shape(v)) == 2}
  if len(widths) != 1:
    raise ConversionError(f"cannot infer num_classes: expected Linear layers "
                          f"of one width, found widths {sorted(widths)}; "
                          f"pass num_classes")
  return widths.pop()


def _check_variables(variables: Mapping[str, Any], arch: str,
                     num_classes: int, what: str) -> None:
  """Raise unless ``variables`` has exactly the tree and shapes of the model."""
  expected = {k: tuple(v.shape)
              for k, v in _flatten(abstract_variables(arch, num_classes)).items()}
  got = {k: tuple(np.shape(v)) for k, v in _flatten(variables).items()}
  problems = [f"missing {'/'.join(k)}" for k in sorted(set(expected) - set(got))]
  problems += [f"unexpected {'/'.join(k)}"
               for k in sorted(set(got) - set(expected))]
  problems += [f"{'/'.join(k)}: expected {_fmt_shape(expected[k])}, got "
               f"{_fmt_shape(got[k])}"
               for k in sorted(set(expected) & set(got)) if expected[k] != got[k]]
  if problems:
    raise ConversionError(f"{what} does not match {arch!r} ({num_classes} classes):\n"
                     + "\n".join(f"  {p}" for p in problems))


def save_teacher(variables: Mapping[str, Any], out_dir: str, arch: str,
                 num_classes: int | None = None, source: str | None = None,
                 overwrite: bool = False) -> str:
  """Write a teacher checkpoint: orbax variables plus a JSON metadata file.

  Layout: ``out_dir/variables/`` (``ocp.StandardCheckpointer``, float32 numpy
  leaves) and ``out_dir/teacher.json`` (``arch``, ``num_classes``,
  ``source``, counts), written last so that its presence marks a complete
  checkpoint. Single-process only (the CLI's use).

  Args:
    variables: ``{'params': ..., 'batch_stats': ...}`` of
      ``models.create(arch, num_classes)``; checked against it.
    out_dir: directory to create.
    arch: registry name.
    num_classes: classifier width; inferred from the classifier if None.
    source: where the weights came from (recorded in the metadata).
    overwrite: replace an existing teacher checkpoint in ``out_dir``.

  Returns:
    The absolute path of ``out_dir``.
  """
  import jax
  import orbax.checkpoint as ocp

  if num_classes is None:
    num_classes = _num_classes_of(variables)
  # Plain nested dicts of host float32 arrays: restores then need no target
  # and come back as numpy whatever the devices.
  variables = _unflatten({k: np.asarray(jax.device_get(v), np.float32)
                          for k, v in _flatten(variables).items()})
  _check_variables(variables, arch, num_classes, "the variables to save")
  out_dir = os.path.abspath(out_dir)
  meta_path = os.path.join(out_dir, METADATA_FILE)
  var_path = os.path.join(out_dir, VARIABLES_DIR)
  if os.path.exists(meta_path) or os.path.exists(var_path):
    if not overwrite:
      raise FileExistsError(f"{out_dir} already holds a teacher checkpoint; "
                            f"pass overwrite=True (--force) to replace it")
    if os.path.exists(meta_path):
      os.remove(meta_path)  # first, so a failed rewrite never looks complete
    shutil.rmtree(var_path, ignore_errors=True)
  os.makedirs(out_dir, exist_ok=True)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(var_path, variables)
    checkpointer.wait_until_finished()
  flat = _flatten(variables)
  meta = {
      "format": _FORMAT,
      "version": 1,
      "arch": arch,
      "num_classes": int(num_classes),
      "source": None if source is None else str(source),
      "num_params": sum(math.prod(v.shape) for k, v in flat.items()
                        if k[0] == "params"),
      "num_batch_stats": sum(math.prod(v.shape) for k, v in flat.items()
                             if k[0] == "batch_stats"),
  }
  with open(meta_path, "w") as f:
    json.dump(meta, f, indent=2)
  return out_dir


def _redo_hint(path: str, arch: str | None) -> str:
  return (f"re-create it with `python -m slkd_jax.convert_torch --arch "
          f"{arch or '<arch>'} --checkpoint <ckpt.pth> --out {path} --force`, "
          f"or set config.teacher.checkpoint to the .pth file itself")


def load_converted(path: str, arch: str | None = None,
                   num_classes: int | None = None, allow_pickle: bool = True
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
  """Host variables of a converted network: our converter's directory or a
  PyTorch file converted on the fly (teachers.load_checkpoint places any
  teacher source on the mesh; this is its PyTorch part).

  Args:
    path: a directory written by :func:`save_teacher` (or the CLI), or a
      PyTorch checkpoint file (``.pth``), converted on the fly.
    arch: the expected architecture; required for PyTorch files, checked
      against the metadata for our checkpoints.
    num_classes: the expected classifier width (checked when given).
    allow_pickle: see :func:`load_torch_checkpoint`.

  Returns:
    ``(variables, meta)``: float32 numpy ``{'params', 'batch_stats'}`` and a
    dict with at least ``arch``, ``num_classes`` and ``source``.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise ConversionError(
        f"teacher checkpoint {path} does not exist; convert a PyTorch teacher "
        f"with `python -m slkd_jax.convert_torch --arch {arch or '<arch>'} "
        f"--checkpoint <ckpt.pth> --out {path}`, or set "
        f"config.teacher.checkpoint to the .pth file itself")

  if os.path.isfile(path):
    if arch is None:
      raise ConversionError(f"{path} is a PyTorch checkpoint: converting it needs "
                       f"the architecture (arch=..., config.teacher.arch)")
    variables = convert_state_dict(
        arch, load_torch_checkpoint(path, allow_pickle), num_classes)
    found = _num_classes_of(variables)
    if num_classes is not None and found != num_classes:
      raise ConversionError(f"{path} has {found} classes, expected {num_classes}")
    flat = _flatten(variables)
    meta = {"format": "pytorch", "arch": arch, "num_classes": found,
            "source": os.path.abspath(path),
            "num_params": sum(math.prod(v.shape) for k, v in flat.items()
                              if k[0] == "params")}
    return variables, meta

  meta_path = os.path.join(path, METADATA_FILE)
  if not os.path.isfile(meta_path):
    raise ConversionError(
        f"{path} is not a teacher checkpoint (no {METADATA_FILE}: missing, or "
        f"an interrupted conversion); {_redo_hint(path, arch)}")
  try:
    with open(meta_path) as f:
      meta = json.load(f)
    saved_arch, saved_classes = meta["arch"], int(meta["num_classes"])
  except (ValueError, KeyError, TypeError) as e:
    raise ConversionError(f"{meta_path} is corrupt ({type(e).__name__}: {e}); "
                     f"{_redo_hint(path, arch)}") from e
  if arch is not None and arch != saved_arch:
    raise ConversionError(f"teacher checkpoint {path} holds a {saved_arch!r}, but "
                     f"the config asks for {arch!r} (config.teacher.arch)")
  if num_classes is not None and num_classes != saved_classes:
    raise ConversionError(f"teacher checkpoint {path} has {saved_classes} classes, "
                     f"but {num_classes} are expected")

  import orbax.checkpoint as ocp

  var_path = os.path.abspath(os.path.join(path, VARIABLES_DIR))
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      restored = checkpointer.restore(var_path)
    variables = _unflatten({k: np.asarray(v, np.float32)
                            for k, v in _flatten(restored).items()})
    _check_variables(variables, saved_arch, saved_classes,
                     f"the teacher checkpoint {path}")
  except Exception as e:  # orbax raises many types for damaged files
    raise ConversionError(f"teacher checkpoint {path} is missing or corrupt "
                     f"({type(e).__name__}: {str(e)[:500]}); "
                     f"{_redo_hint(path, saved_arch)}") from e
  return variables, meta


# ---------------------------------------------------------------------------
# CLI.


def main(argv: list[str] | None = None) -> int:
  """``python -m slkd_jax.convert_torch``: convert a .pth into a teacher dir."""
  parser = argparse.ArgumentParser(
      prog="python -m slkd_jax.convert_torch",
      description="Convert a PyTorch zoo checkpoint (RepDistiller / mdistiller "
                  "/ torchvision) into an orbax teacher checkpoint for "
                  "config.teacher.checkpoint.")
  parser.add_argument("--arch", required=True,
                      help="registry name of the architecture, e.g. resnet32x4")
  parser.add_argument("--checkpoint", required=True,
                      help="PyTorch checkpoint (.pth): a state_dict or a dict "
                           "holding it under 'model' / 'state_dict' / 'net'")
  parser.add_argument("--out", required=True,
                      help="output directory of the teacher checkpoint")
  parser.add_argument("--num-classes", type=int, default=None,
                      help="classifier width (default: from the checkpoint)")
  parser.add_argument("--force", action="store_true",
                      help="replace an existing teacher checkpoint in --out")
  parser.add_argument("--weights-only", action="store_true",
                      help="never fall back to torch.load(weights_only=False)")
  args = parser.parse_args(argv)

  from slkd_jax import models

  if args.arch not in models.available():
    parser.error(f"unknown --arch {args.arch!r}; available: "
                 f"{', '.join(models.available())}")
  try:
    variables, meta = load_converted(args.checkpoint, args.arch,
                                   args.num_classes,
                                   allow_pickle=not args.weights_only)
    out = save_teacher(variables, args.out, args.arch, meta["num_classes"],
                       source=meta["source"], overwrite=args.force)
  except (errors.UserError, FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  flat = _flatten(variables)
  stats = sum(math.prod(v.shape) for k, v in flat.items()
              if k[0] == "batch_stats")
  print(f"converted {args.checkpoint} -> {args.arch} "
        f"({meta['num_classes']} classes): {meta['num_params']:,} parameters, "
        f"{stats:,} BatchNorm statistics")
  print(f"wrote teacher checkpoint {out} "
        f"(set config.teacher.checkpoint={out})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
