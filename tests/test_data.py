"""Input pipelines: on-device arrays (CIFAR-100, digits, synthetic), TFDS
CIFAR-100 and ImageNet under ``tfds.testing.mock_data``, the
``cifar-100-python`` reader, helpful errors. No network anywhere."""

import hashlib
import os
import pickle
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from slkd_jax import data, parallel
from slkd_jax.data import arrays, cifar, digits


def _mesh(n_devices=None):
  devices = jax.devices() if n_devices is None else jax.devices()[:n_devices]
  return parallel.make_mesh(devices)


def _host(batch):
  return {k: np.asarray(jax.device_get(v)) for k, v in batch.items()}


def _check_batch(batch, mesh, batch_size, image_shape):
  """Shapes, dtypes and sharding of one batch."""
  assert set(batch) - {"index"} == {"image", "label", "mask"}
  if "index" in batch:
    assert batch["index"].shape == (batch_size,)
    assert batch["index"].dtype == np.int32
  assert batch["image"].shape == (batch_size,) + tuple(image_shape)
  assert batch["image"].dtype == np.float32
  assert batch["label"].shape == (batch_size,)
  assert batch["label"].dtype == np.int32
  assert batch["mask"].shape == (batch_size,)
  assert batch["mask"].dtype == np.bool_
  for v in batch.values():
    assert v.sharding.is_equivalent_to(parallel.batch_sharding(mesh), v.ndim)


def _indexed(n, size=8):
  """``n`` small images whose label is their index (so batches can be traced
  back to examples)."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
  return images, np.arange(n, dtype=np.int32)


# ---------------------------------------------------------------- packaging


def test_import_is_tensorflow_free_and_digits_synthetic_run_without_tf():
  # A fresh interpreter where importing TensorFlow fails: the package imports
  # and the TF-free datasets build and yield.
  code = """
import sys
sys.modules['tensorflow'] = None
sys.modules['tensorflow_datasets'] = None
import jax
from slkd_jax import data, parallel
from slkd_jax.data import arrays, cifar, digits, imagenet, synthetic
mesh = parallel.make_mesh()
for cfg in ({'name': 'digits'},
            {'name': 'synthetic', 'num_train': 10, 'num_test': 5}):
  tr, ev = data.create_datasets(cfg, batch_size=8, eval_batch_size=8,
                                seed=0, mesh=mesh)
  next(tr.epoch(0)); next(iter(ev))
print('OK')
"""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                       text=True, env=env, timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "OK" in out.stdout


def test_dataset_info_and_unknown_name():
  assert data.dataset_info("cifar100") == (100, 32)
  assert data.dataset_info("imagenet2012") == (1000, 224)
  assert data.dataset_info("digits") == (10, 32)
  assert data.dataset_info("synthetic", {"num_classes": 7,
                                         "image_size": 24}) == (7, 24)
  with pytest.raises(data.DatasetError, match="cifar10x"):
    data.dataset_info("cifar10x")
  with pytest.raises(data.DatasetError, match="cifar10x"):
    data.create_datasets({"name": "cifar10x"}, batch_size=8,
                         eval_batch_size=8, seed=0, mesh=_mesh())


# ------------------------------------------------------ on-device augmentation


def test_crops_stay_inside_padded_image_and_flip_about_half():
  # Each pixel encodes its own coordinates (red = 8·row, green = 8·col, blue =
  # 255), so every output pixel tells where it came from; zero = padding.
  h = w = 32
  yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  one = np.stack([yy * 8, xx * 8, np.full_like(yy, 255)], -1).astype(np.uint8)
  images = np.repeat(one[None], 256, axis=0)
  train = arrays.ArrayTrainData(
      images, np.zeros(256, np.int32), batch_size=256, seed=3, mesh=_mesh(),
      mean=(0, 0, 0), std=(1, 1, 1), augment=arrays.Augment(pad=4, flip=True),
      num_classes=1)
  out = _host(next(train.epoch(0)))["image"]
  pix = np.rint(out * 255).astype(np.int64)
  flips, dys, dxs = 0, set(), set()
  for img in pix:
    real = img[..., 2] == 255
    # Padding is exactly zero in every channel.
    assert np.all(img[~real] == 0)
    ys, xs = np.nonzero(real)
    src_y, src_x = img[ys, xs, 0] // 8, img[ys, xs, 1] // 8
    dy = np.unique(src_y - ys)  # = crop offset - pad, the same everywhere
    assert dy.size == 1 and -4 <= dy[0] <= 4
    if np.unique(src_x - xs).size == 1:  # not flipped: a pure shift
      dx = (src_x - xs)[0]
    else:  # flipped: src_x = (w - 1 - x) + dx
      dx = np.unique(src_x + xs - (w - 1))
      assert dx.size == 1
      dx = dx[0]
      flips += 1
    assert -4 <= dx <= 4
    # The crop covers exactly the overlap of the window with the image.
    assert real.sum() == (h - abs(dy[0])) * (w - abs(dx))
    dys.add(int(dy[0]))
    dxs.add(int(dx))
  assert 0.4 < flips / 256 < 0.6, flips
  assert dys == set(range(-4, 5)) and dxs == set(range(-4, 5))


def test_normalisation_matches_reference_constants():
  assert cifar.MEAN == (0.5071, 0.4867, 0.4408)
  assert cifar.STD == (0.2675, 0.2565, 0.2761)
  mean, std = np.array(cifar.MEAN), np.array(cifar.STD)
  images, labels = _indexed(16, size=32)
  mesh = _mesh()
  ev = arrays.ArrayEvalData(images, labels, batch_size=16, mesh=mesh,
                            mean=cifar.MEAN, std=cifar.STD, num_classes=16)
  got = _host(next(iter(ev)))["image"]
  np.testing.assert_allclose(got, (images / 255.0 - mean) / std, rtol=1e-5,
                             atol=1e-5)
  # Train: white images; every pixel is either white or zero padding, which
  # normalises to -mean/std as in the reference.
  white = np.full((64, 32, 32, 3), 255, np.uint8)
  tr = arrays.ArrayTrainData(white, np.zeros(64, np.int32), batch_size=64,
                             seed=0, mesh=mesh, mean=cifar.MEAN,
                             std=cifar.STD, augment=cifar.AUGMENT,
                             num_classes=100)
  x = _host(next(tr.epoch(0)))["image"].reshape(-1, 3)
  is_white = np.all(np.isclose(x, (1 - mean) / std, atol=1e-5), axis=1)
  is_pad = np.all(np.isclose(x, -mean / std, atol=1e-5), axis=1)
  assert np.all(is_white | is_pad) and is_pad.any()


# ------------------------------------------------------ order and resumption


def test_same_seed_epoch_step_gives_identical_batches_and_exact_resume():
  images, labels = _indexed(100)
  kw = dict(batch_size=16, seed=7, mesh=_mesh(), mean=(0.5,) * 3,
            std=(0.25,) * 3, augment=arrays.Augment(), num_classes=100)
  a = arrays.ArrayTrainData(images, labels, **kw)
  b = arrays.ArrayTrainData(images, labels, **kw)
  first = [_host(x) for x in a.epoch(2)]
  again = [_host(x) for x in b.epoch(2)]
  resumed = [_host(x) for x in b.epoch(2, start_step=4)]
  assert len(first) == 7 and len(resumed) == 3
  for x, y in zip(first, again):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  for x, y in zip(first[4:], resumed):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  other_seed = arrays.ArrayTrainData(images, labels, **dict(kw, seed=8))
  assert not np.array_equal(_host(next(other_seed.epoch(2)))["label"],
                            first[0]["label"])


def test_epochs_differ_and_each_visits_every_example_once():
  images, labels = _indexed(100)
  tr = arrays.ArrayTrainData(
      images, labels, batch_size=16, seed=0, mesh=_mesh(), mean=(0,) * 3,
      std=(1,) * 3, augment=arrays.Augment(), num_classes=100)
  assert tr.steps_per_epoch == 7  # ceil(100 / 16): keeps the partial batch
  seen = []
  for epoch in range(2):
    batches = [_host(b) for b in tr.epoch(epoch)]
    assert all(b["mask"].all() for b in batches[:-1])
    assert batches[-1]["mask"].sum() == 100 - 6 * 16
    visited = np.concatenate([b["label"][b["mask"]] for b in batches])
    np.testing.assert_array_equal(np.sort(visited), np.arange(100))
    seen.append(visited)
  assert not np.array_equal(seen[0], seen[1])
  drop = arrays.ArrayTrainData(
      images, labels, batch_size=16, seed=0, mesh=_mesh(), mean=(0,) * 3,
      std=(1,) * 3, augment=None, num_classes=100, drop_last=True)
  batches = [_host(b) for b in drop.epoch(0)]
  assert drop.steps_per_epoch == len(batches) == 6
  assert all(b["mask"].all() for b in batches)


def test_one_and_eight_devices_give_the_same_batches():
  images, labels = _indexed(40)
  kw = dict(batch_size=16, seed=1, mean=(0.5,) * 3, std=(0.25,) * 3,
            augment=arrays.Augment(), num_classes=40)
  one = arrays.ArrayTrainData(images, labels, mesh=_mesh(1), **kw)
  eight = arrays.ArrayTrainData(images, labels, mesh=_mesh(), **kw)
  for x, y in zip(one.epoch(3), eight.epoch(3)):
    assert len(y["image"].sharding.device_set) == 8
    x, y = _host(x), _host(y)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


@pytest.mark.parametrize("n_devices", [1, 8])
def test_eval_counts_every_example_exactly_once(n_devices):
  images, labels = _indexed(37)
  mesh = _mesh(n_devices)
  ev = arrays.ArrayEvalData(images, labels, batch_size=16, mesh=mesh,
                            mean=(0,) * 3, std=(1,) * 3, num_classes=37)
  assert ev.num_examples == 37 and ev.num_batches == len(ev) == 3
  batches = [_host(b) for b in ev]
  assert len(batches) == 3
  counted = np.concatenate([b["label"][b["mask"]] for b in batches])
  np.testing.assert_array_equal(counted, np.arange(37))  # in order, once
  for b in batches:
    np.testing.assert_allclose(b["image"][b["mask"]],
                               images[b["label"][b["mask"]]] / 255.0,
                               atol=1e-6)


def test_batch_size_must_split_over_devices():
  images, labels = _indexed(20)
  with pytest.raises(ValueError, match="divisible"):
    arrays.ArrayEvalData(images, labels, batch_size=12, mesh=_mesh(),
                         mean=(0,) * 3, std=(1,) * 3, num_classes=20)


# ------------------------------------------------------ digits and synthetic


def test_digits_split_shapes_and_no_flip():
  (x, y), (xt, yt) = digits.load_arrays()
  assert x.shape == (1437, 32, 32, 3) and xt.shape == (360, 32, 32, 3)
  assert x.dtype == np.uint8
  assert np.array_equal(x[..., 0], x[..., 1]) and np.array_equal(
      x[..., 0], x[..., 2])
  assert set(np.unique(y)) == set(range(10))
  counts = np.bincount(yt, minlength=10)
  assert counts.min() >= 35 and counts.max() <= 37  # stratified
  (x2, _), _ = digits.load_arrays.__wrapped__()  # deterministic
  np.testing.assert_array_equal(x, x2)
  mesh = _mesh()
  tr, ev = data.create_datasets({"name": "digits"}, batch_size=32,
                                eval_batch_size=32, seed=0, mesh=mesh)
  assert tr.augment.pad == 4 and not tr.augment.flip
  assert tr.num_classes == 10 and tr.steps_per_epoch == 45
  mean, std = digits.mean_std(x)
  np.testing.assert_allclose(tr.mean, mean)
  np.testing.assert_allclose(tr.std, std)
  _check_batch(next(tr.epoch(0)), mesh, 32, (32, 32, 3))
  assert sum(int(b["mask"].sum()) for b in ev) == 360


def test_digits_arrays_are_pinned():
  # The quickstart's numbers are only reproducible if its data is: the
  # split comes from scikit-learn's StratifiedShuffleSplit, so a release
  # that changed it would silently move every number. Pin the bytes.
  h = hashlib.sha256()
  for a in (*digits.load_arrays()[0], *digits.load_arrays()[1]):
    h.update(np.ascontiguousarray(a).tobytes())
  assert h.hexdigest() == (
      "fec3afddac96e21299752f3c2d19bf16cde4fc28006178d87eef1cbf9ce4bd5a"), (
          "the digits train/test arrays changed (scikit-learn's split or "
          "data?): the quickstart's numbers in README.md no longer apply")


def test_synthetic_any_shape():
  mesh = _mesh()
  cfg = {"name": "synthetic", "image_size": (24, 40), "num_classes": 7,
         "num_train": 50, "num_test": 9}
  tr, ev = data.create_datasets(cfg, batch_size=16, eval_batch_size=8,
                                seed=0, mesh=mesh)
  assert tr.image_shape == (24, 40, 3) and tr.num_classes == 7
  assert tr.steps_per_epoch == 4 and ev.num_batches == 2
  batch = _host(next(tr.epoch(0)))
  _check_batch(next(tr.epoch(0)), mesh, 16, (24, 40, 3))
  assert batch["label"].min() >= 0 and batch["label"].max() < 7
  assert sum(int(b["mask"].sum()) for b in ev) == 9


def test_check_arrays_names_the_problem():
  x = np.zeros((4, 28, 28, 3), np.uint8)
  y = np.zeros(4, np.int64)
  with pytest.raises(data.DatasetError, match=r"\(28, 28, 3\).*\(32, 32, 3\)"):
    arrays.check_arrays(x, y, name="cifar100", split="train",
                        image_shape=(32, 32, 3), num_classes=100)
  x = np.zeros((4, 32, 32, 3), np.uint8)
  with pytest.raises(data.DatasetError, match=r"labels span \[0, 100\]"):
    arrays.check_arrays(x, np.array([0, 1, 2, 100]), name="cifar100",
                        split="train", image_shape=(32, 32, 3),
                        num_classes=100)
  with pytest.raises(data.DatasetError, match="float32; expected uint8"):
    arrays.check_arrays(x.astype(np.float32), y, name="cifar100",
                        split="test", image_shape=(32, 32, 3),
                        num_classes=100)


# ------------------------------------------------------ cifar-100-python


def _write_cifar_python(folder, n_train=20, n_test=11, bad_label=False):
  """Write ``train``/``test`` in the torchvision cifar-100-python format."""
  os.makedirs(folder)
  rng = np.random.default_rng(0)
  out = {}
  for split, n in (("train", n_train), ("test", n_test)):
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    fine = rng.integers(0, 100, n).tolist()
    if bad_label:
      fine[0] = 100
    entry = {
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
        b"batch_label": f"{split} batch".encode(),
        b"fine_labels": fine,
        b"coarse_labels": rng.integers(0, 20, n).tolist(),
        # Rows: 1024 red, 1024 green, 1024 blue values, each row-major.
        b"data": images.transpose(0, 3, 1, 2).reshape(n, 3072),
    }
    with open(os.path.join(folder, split), "wb") as f:
      pickle.dump(entry, f, protocol=2)
    out[split] = (images, np.array(fine))
  return out


def test_cifar_python_folder_reader(tmp_path):
  written = _write_cifar_python(str(tmp_path / "cifar-100-python"))
  for data_dir in (tmp_path, tmp_path / "cifar-100-python"):
    (x, y), (xt, yt) = cifar.load({"source": "cifar-100-python",
                                   "data_dir": str(data_dir)})
    np.testing.assert_array_equal(x, written["train"][0])
    np.testing.assert_array_equal(y, written["train"][1])
    np.testing.assert_array_equal(xt, written["test"][0])
    assert y.dtype == np.int32
  mesh = _mesh()
  tr, ev = data.create_datasets(
      {"name": "cifar100", "source": "cifar-100-python",
       "data_dir": str(tmp_path)}, batch_size=8, eval_batch_size=8, seed=0,
      mesh=mesh)
  assert tr.num_examples == 20 and tr.steps_per_epoch == 3
  assert ev.num_examples == 11 and ev.num_batches == 2
  first = _host(next(iter(ev)))
  np.testing.assert_allclose(
      first["image"],
      (written["test"][0][:8] / 255.0 - np.array(cifar.MEAN)) /
      np.array(cifar.STD), atol=1e-5)


def test_cifar_python_errors(tmp_path):
  with pytest.raises(data.DatasetError) as e:
    cifar.load({"source": "cifar-100-python", "data_dir": str(tmp_path)})
  assert str(tmp_path) in str(e.value) and "cifar-100-python" in str(e.value)
  _write_cifar_python(str(tmp_path / "bad" / "cifar-100-python"),
                      bad_label=True)
  with pytest.raises(data.DatasetError, match=r"train split: labels span"):
    cifar.load({"source": "cifar-100-python",
                "data_dir": str(tmp_path / "bad")})
  with pytest.raises(data.DatasetError, match="source"):
    cifar.load({"source": "torchvision"})


@pytest.mark.parametrize("damage", ["truncated", "garbage", "not_a_dict"])
def test_cifar_python_damaged_pickle_names_the_file(tmp_path, damage):
  # A truncated download, other bytes (pickle reads them as opcodes and
  # fails with e.g. "unregistered extension code") or a pickle of the wrong
  # thing: one line naming the file and saying to re-download/re-extract.
  folder = tmp_path / "cifar-100-python"
  _write_cifar_python(str(folder))
  path = folder / "train"
  if damage == "truncated":
    path.write_bytes(path.read_bytes()[:1000])
  elif damage == "garbage":
    path.write_bytes(bytes(np.random.default_rng(1).integers(
        0, 256, 4096, dtype=np.uint8)))
  else:
    with open(path, "wb") as f:
      pickle.dump([1, 2, 3], f, protocol=2)
  with pytest.raises(data.DatasetError) as e:
    cifar.load({"source": "cifar-100-python", "data_dir": str(tmp_path)})
  msg = str(e.value)
  assert str(path) in msg and cifar.PYTHON_URL in msg
  assert "download" in msg and "re-extract" in msg
  assert "\n" not in msg

  # A file open() refuses (here: a directory) is named the same way.
  with pytest.raises(data.DatasetError, match=r"cannot be read.*re-extract"):
    cifar._load_pickle(str(folder))


def test_empty_data_dir_is_the_tfds_default(tmp_path, monkeypatch):
  # data_dir='' is the default, as None is (TFDS alone would search '.'),
  # and the message names the directory TFDS really searched.
  assert data.resolve_data_dir({"data_dir": ""}) is None
  assert data.resolve_data_dir({"data_dir": "  "}) is None
  assert data.resolve_data_dir({}) is None
  assert data.resolve_data_dir({"data_dir": "~/x"}) == os.path.expanduser(
      "~/x")
  data.import_tfds()
  from tensorflow_datasets.core import constants
  monkeypatch.setattr(constants, "DATA_DIR", str(tmp_path / "default"))
  assert data.tfds_data_dirs(None) == str(tmp_path / "default")
  for data_dir in ("", None):
    with pytest.raises(data.DatasetError) as e:
      cifar.load({"source": "tfds", "data_dir": data_dir})
    msg = str(e.value)
    assert f"data_dir={str(tmp_path / 'default')!r}" in msg
    assert f"could not find data in {tmp_path / 'default'}" in msg
  # The pickle folder has no default: '' asks for data.data_dir, as None.
  with pytest.raises(data.DatasetError, match="Set data.data_dir"):
    cifar.load({"source": "cifar-100-python", "data_dir": ""})


def test_data_settings_are_declared_with_the_pipelines_defaults():
  # Every setting the pipelines read is in base_config() (so the command
  # line can set it on the locked config) with the default they assume.
  from slkd_jax import config as config_lib
  c = config_lib.base_config()
  for key, default in data.SETTINGS.items():
    assert key in c.data, key
    assert c.data[key] == default, key
  c.lock()
  c.data.host_prefetch = 0
  c.data.ram_budget_gb = 1.5
  c.data.num_threads = 3
  # Read as given: 0 stays 0 (no prefetch), None stays automatic.
  assert data.setting(c.data, "host_prefetch") == 0
  assert data.setting(c.data, "ram_budget_gb") == 1.5
  assert data.setting({}, "host_prefetch") == 2
  assert data.setting({"num_threads": None}, "num_threads") is None


def test_imagenet_pipeline_options_follow_the_config(tfds):
  from slkd_jax.data import imagenet
  options = imagenet._options({"ram_budget_gb": 1.5, "num_threads": 3})
  assert options.autotune.ram_budget == int(1.5 * 2**30)
  assert options.threading.private_threadpool_size == 3
  options = imagenet._options({})  # None: tf.data's own choices
  assert options.autotune.ram_budget is None
  assert options.threading.private_threadpool_size is None


# ------------------------------------------------------ TFDS (mocked)


@pytest.fixture(scope="module")
def tfds():
  return data.import_tfds()


def test_missing_tfds_datasets_fail_fast_with_instructions(tmp_path, tfds):
  start = time.perf_counter()
  with pytest.raises(data.DatasetError) as e:
    cifar.load({"source": "tfds", "data_dir": str(tmp_path)})
  msg = str(e.value)
  assert "cifar100" in msg and str(tmp_path) in msg
  assert "tfds build cifar100" in msg
  assert "\n" not in msg  # the command line prints it as one line
  with pytest.raises(data.DatasetError) as e:
    data.create_datasets({"name": "imagenet2012", "data_dir": str(tmp_path)},
                         batch_size=8, eval_batch_size=8, seed=0,
                         mesh=_mesh())
  msg = str(e.value)
  assert "imagenet2012" in msg and str(tmp_path) in msg
  assert "downloads/manual" in msg and "tfds build imagenet2012" in msg
  assert "\n" not in msg  # the command line prints it as one line
  assert time.perf_counter() - start < 15  # no waiting on a network


def test_cifar100_tfds_mock(tmp_path, tfds):
  mesh = _mesh()
  with tfds.testing.mock_data(num_examples=20):
    tr, ev = data.create_datasets(
        {"name": "cifar100", "data_dir": str(tmp_path)}, batch_size=8,
        eval_batch_size=16, seed=0, mesh=mesh)
  assert tr.num_examples == 20 and tr.steps_per_epoch == 3
  assert tr.num_classes == 100 and tr.image_shape == (32, 32, 3)
  batches = list(tr.epoch(0))
  for b in batches:
    _check_batch(b, mesh, 8, (32, 32, 3))
  assert int(batches[-1]["mask"].sum()) == 4
  labels = np.concatenate([_host(b)["label"] for b in batches])
  assert labels.min() >= 0 and labels.max() < 100
  assert ev.num_batches == 2
  assert sum(int(b["mask"].sum()) for b in ev) == 20


def test_imagenet_tfds_mock(tmp_path, tfds):
  mesh = _mesh()
  with tfds.testing.mock_data(num_examples=10):
    tr, ev = data.create_datasets(
        {"name": "imagenet2012", "data_dir": str(tmp_path),
         "shuffle_buffer": 16}, batch_size=8, eval_batch_size=8, seed=0,
        mesh=mesh)
    assert tr.num_examples == 10 and tr.steps_per_epoch == 2
    batches = list(tr.epoch(0))
    for b in batches:
      _check_batch(b, mesh, 8, (224, 224, 3))
    batches = [_host(b) for b in batches]
    resumed = [_host(b) for b in tr.epoch(0, start_step=1)]
    evals = list(ev)
  assert len(batches) == 2 and len(resumed) == 1
  assert batches[1]["mask"].sum() == 2
  for k in batches[1]:
    np.testing.assert_array_equal(batches[1][k], resumed[0][k])
  mean, std = np.array(data.imagenet.MEAN), np.array(data.imagenet.STD)
  real = batches[0]["image"]
  assert real.min() >= (0 - mean.max()) / std.min() - 1e-4
  assert real.max() <= (1 - mean.min()) / std.min() + 1e-4
  # Padding examples are zero pixels, i.e. -mean/std after normalisation.
  pad = batches[1]["image"][~batches[1]["mask"]]
  np.testing.assert_allclose(pad, np.broadcast_to(-mean / std, pad.shape),
                             atol=1e-5)
  assert ev.num_examples == 10 and ev.num_batches == len(evals) == 2
  for b in evals:
    _check_batch(b, mesh, 8, (224, 224, 3))
  assert sum(int(b["mask"].sum()) for b in evals) == 10


def test_imagenet_processes_run_equal_steps_and_count_each_example_once(
    tmp_path, tfds, monkeypatch):
  # Three simulated processes, each reading its own shard (mocked TFDS gives
  # every shard 10 examples): all must yield the same number of local
  # batches, and their masks together count the 30 examples exactly once.
  from slkd_jax.data import imagenet
  mesh = _mesh()
  cfg = {"data_dir": str(tmp_path), "shuffle_buffer": 4}
  real_train = real_eval = 0
  with tfds.testing.mock_data(num_examples=10):
    builder = imagenet._builder(str(tmp_path))
    monkeypatch.setattr(jax, "process_count", lambda: 3)
    for p in range(3):
      monkeypatch.setattr(jax, "process_index", lambda p=p: p)
      tr = imagenet.ImageNetTrainData(builder, cfg, batch_size=24, seed=0,
                                      mesh=mesh)
      ev = imagenet.ImageNetEvalData(builder, cfg, batch_size=24, mesh=mesh)
      assert tr.num_examples == ev.num_examples == 30
      assert tr.local_batch_size == ev.local_batch_size == 8
      assert tr.steps_per_epoch == 2 and ev.num_batches == 2
      train_batches = list(tfds.as_numpy(tr.dataset(0)))
      eval_batches = list(tfds.as_numpy(ev.dataset()))
      assert len(train_batches) == 2 and len(eval_batches) == 2
      for b in train_batches + eval_batches:
        assert b["image"].shape == (8, 224, 224, 3)
        assert b["image"].dtype == np.uint8  # normalised on device
      real_train += sum(int(b["mask"].sum()) for b in train_batches)
      real_eval += sum(int(b["mask"].sum()) for b in eval_batches)
  assert real_train == 30 and real_eval == 30


def test_train_batches_carry_each_examples_dataset_index():
  """``index`` is the epoch order's slice: the label at that index is the
  batch's label, and one epoch's real positions cover every example once."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (37, 8, 8, 3), dtype=np.uint8)
  labels = rng.integers(0, 5, (37,), dtype=np.int32)
  train = arrays.ArrayTrainData(
      images, labels, batch_size=8, seed=3, mesh=_mesh(), mean=(0.5,) * 3,
      std=(0.5,) * 3, augment=None, num_classes=5)
  np.testing.assert_array_equal(train.labels, labels)
  seen = []
  for batch in train.epoch(1):
    host = _host(batch)
    np.testing.assert_array_equal(labels[host["index"]], host["label"])
    seen.extend(host["index"][host["mask"]])
  assert sorted(seen) == list(range(37))
