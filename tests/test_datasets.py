"""The built-in datasets, from small made-up files in each dataset's exact original format, served locally."""
import dataclasses
import hashlib
import io
import os
import pickle
import tarfile
import time
import zipfile

import numpy as np
import pytest
import scipy.io
from PIL import Image

from eejax import data, datasets
from eejax.errors import UserError
from http_server import closed_port_url, serve

RNG = np.random.default_rng(0)


def _tar(members: dict[str, bytes]) -> bytes:
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode="w:gz") as t:
    for name, body in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(body)
      t.addfile(info, io.BytesIO(body))
  return buf.getvalue()


def _cifar_batch(images_NxHxWx3, labels_key, labels_N):
  """A batch pickled as the original (Python 2 pickles: bytes keys, data N x 3072 in C, H, W order)."""
  return pickle.dumps({b"batch_label": b"made up", labels_key: [int(x) for x in labels_N],
                       b"data": images_NxHxWx3.transpose(0, 3, 1, 2).reshape(len(labels_N), -1),
                       b"filenames": [b"f%d.png" % i for i in range(len(labels_N))]}, protocol=2)


def make_cifar10():
  """(archive bytes, train images and labels in batch order, test images and labels, class names)."""
  names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
  train = RNG.integers(0, 256, (5, 4, 32, 32, 3), dtype=np.uint8)
  train_labels = RNG.integers(0, 10, (5, 4))
  test, test_labels = RNG.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8), RNG.integers(0, 10, 3)
  members = {f"cifar-10-batches-py/data_batch_{i + 1}": _cifar_batch(train[i], b"labels", train_labels[i])
             for i in range(5)}
  members["cifar-10-batches-py/test_batch"] = _cifar_batch(test, b"labels", test_labels)
  members["cifar-10-batches-py/batches.meta"] = pickle.dumps(
      {b"num_cases_per_batch": 4, b"label_names": [n.encode() for n in names], b"num_vis": 3072}, protocol=2)
  members["cifar-10-batches-py/readme.html"] = b"<html></html>"
  return _tar(members), (train.reshape(-1, 32, 32, 3), train_labels.reshape(-1)), (test, test_labels), names


def make_cifar100():
  fine = [f"fine{i:02d}" for i in range(100)]
  train, test = RNG.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8), RNG.integers(0, 256, (2, 32, 32, 3), np.uint8)
  train_fine, test_fine = np.array([99, 0, 57, 3, 42, 7]), np.array([12, 88])
  def batch(images, labels):
    return pickle.dumps({b"filenames": [b"x"] * len(labels), b"batch_label": b"training batch 1 of 1",
                         b"fine_labels": [int(x) for x in labels], b"coarse_labels": [int(x) // 5 for x in labels],
                         b"data": images.transpose(0, 3, 1, 2).reshape(len(labels), -1)}, protocol=2)
  members = {"cifar-100-python/train": batch(train, train_fine), "cifar-100-python/test": batch(test, test_fine),
             "cifar-100-python/meta": pickle.dumps({b"fine_label_names": [n.encode() for n in fine],
                                                     b"coarse_label_names": [b"c%d" % i for i in range(20)]})}
  return _tar(members), (train, train_fine), (test, test_fine), fine


def make_svhn_mat(n):
  """A .mat as the original: X is 32 x 32 x 3 x N uint8, y is N x 1 with 10 for the digit 0."""
  images = RNG.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
  digits = np.arange(n) % 10  # every digit, 0 included
  buf = io.BytesIO()
  scipy.io.savemat(buf, {"X": images.transpose(1, 2, 3, 0), "y": np.where(digits == 0, 10, digits)[:, None]
                         .astype(np.uint8)})
  return buf.getvalue(), images, digits


def _png(pixels) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, "PNG")
  return buf.getvalue()


def _jpeg(pixels) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, "JPEG", quality=95)
  return buf.getvalue()


def colour(label):  # a flat colour per class, so labels can be read back from the decoded pixels
  return np.full((64, 64, 3), (20 + 40 * label, 200 - 30 * label, 90), np.uint8)


def make_tiny_imagenet():
  wnids = ["n01443537", "n01629819", "n01641577"]
  z = io.BytesIO()
  val_labels = [2, 0, 1, 1]
  with zipfile.ZipFile(z, "w") as f:
    f.writestr("tiny-imagenet-200/wnids.txt", "\n".join(wnids) + "\n")
    f.writestr("tiny-imagenet-200/words.txt", "".join(f"{w}\tthing {i}\n" for i, w in enumerate(wnids)))
    for label, w in enumerate(wnids):
      f.writestr(f"tiny-imagenet-200/train/{w}/{w}_boxes.txt", "")
      for i in range(3):
        f.writestr(f"tiny-imagenet-200/train/{w}/images/{w}_{i}.JPEG", _jpeg(colour(label)))
    rows = []
    for i, label in enumerate(val_labels):
      f.writestr(f"tiny-imagenet-200/val/images/val_{i}.JPEG", _jpeg(colour(label)))
      rows.append(f"val_{i}.JPEG\t{wnids[label]}\t0\t0\t63\t63\n")
    f.writestr("tiny-imagenet-200/val/val_annotations.txt", "".join(rows))
    f.writestr("tiny-imagenet-200/test/images/test_0.JPEG", _jpeg(colour(0)))
  return z.getvalue(), wnids, val_labels


def make_cinic10():
  names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
  members, expected = {}, {}
  for split, n in (("train", 2), ("valid", 1), ("test", 1)):
    images, labels = [], []
    for label, cls in enumerate(names):
      for i in range(n):
        pixels = RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        members[f"{split}/{cls}/cifar10-{split}-{label * 10 + i}.png"] = _png(pixels)
        images.append(pixels)
        labels.append(label)
    expected[split] = (np.stack(images), np.array(labels))
  return _tar(members), expected, names


def published(monkeypatch, name, bodies: dict[str, bytes]):
  """Makes the registry's MD5s those of the made-up files (the URLs stay the real ones)."""
  spec = datasets.BUILTIN[name]
  remotes = tuple(dataclasses.replace(r, md5=hashlib.md5(bodies[r.filename]).hexdigest()) for r in spec.files)
  monkeypatch.setitem(datasets.BUILTIN, name, dataclasses.replace(spec, files=remotes))


def load_served(monkeypatch, tmp_path, name, bodies, **kwargs):
  published(monkeypatch, name, bodies)
  with serve(bodies) as (url, log):
    ds = data.load(name, mirror=url, cache_dir=str(tmp_path / "cache"), val_size=2, **kwargs)
  assert sorted(n for n, _ in log) == sorted(bodies)  # each file fetched once
  return ds


def test_cifar10_from_its_python_archive(tmp_path, monkeypatch):
  body, (train, train_labels), (test, test_labels), names = make_cifar10()
  ds = load_served(monkeypatch, tmp_path, "cifar10", {"cifar-10-python.tar.gz": body})
  assert ds.class_names == tuple(names)
  np.testing.assert_array_equal(ds.test.images_NxHxWx3, test)
  np.testing.assert_array_equal(ds.test.labels_N, test_labels)
  both = np.concatenate([ds.train.images_NxHxWx3, ds.val.images_NxHxWx3])
  both_labels = np.concatenate([ds.train.labels_N, ds.val.labels_N])
  order = np.lexsort(both.reshape(len(both), -1).T)  # same images and labels, in any order
  ref = np.lexsort(train.reshape(len(train), -1).T)
  np.testing.assert_array_equal(both[order], train[ref])
  np.testing.assert_array_equal(both_labels[order], train_labels[ref])
  # Offline: the archive the user already has, as a file or in a folder; the decoded cache is keyed by content.
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "cifar-10-python.tar.gz").write_bytes(body)
  for local in (tmp_path / "mine", tmp_path / "mine" / "cifar-10-python.tar.gz"):
    again = data.load(f"cifar10:{local}", cache_dir="", val_size=2)
    np.testing.assert_array_equal(again.test.images_NxHxWx3, test)


def test_cifar100_keeps_the_fine_labels_in_their_order(tmp_path, monkeypatch):
  body, (train, train_fine), (test, test_fine), fine = make_cifar100()
  ds = load_served(monkeypatch, tmp_path, "cifar100", {"cifar-100-python.tar.gz": body})
  assert ds.class_names == tuple(fine) and ds.num_classes == 100
  np.testing.assert_array_equal(ds.test.images_NxHxWx3, test)
  np.testing.assert_array_equal(ds.test.labels_N, test_fine)
  assert sorted(np.concatenate([ds.train.labels_N, ds.val.labels_N]).tolist()) == sorted(train_fine.tolist())


def test_svhn_reads_the_mat_files_and_ten_means_zero(tmp_path, monkeypatch):
  train_body, _, _ = make_svhn_mat(7)
  test_body, test, test_digits = make_svhn_mat(12)
  bodies = {"train_32x32.mat": train_body, "test_32x32.mat": test_body}
  ds = load_served(monkeypatch, tmp_path, "svhn", bodies)
  assert ds.class_names == tuple("0123456789")
  np.testing.assert_array_equal(ds.test.images_NxHxWx3, test)
  np.testing.assert_array_equal(ds.test.labels_N, test_digits)
  assert 10 not in ds.train.labels_N and len(ds.train) + len(ds.val) == 7


def test_tiny_imagenet_from_its_zip_with_val_as_the_test_split(tmp_path, monkeypatch):
  body, wnids, val_labels = make_tiny_imagenet()
  ds = load_served(monkeypatch, tmp_path, "tiny_imagenet", {"tiny-imagenet-200.zip": body})
  assert ds.class_names == tuple(sorted(wnids)) and ds.image_shape == (64, 64, 3)
  np.testing.assert_array_equal(ds.test.labels_N, val_labels)  # from val_annotations.txt
  for images, labels in ((ds.test.images_NxHxWx3, ds.test.labels_N), (ds.train.images_NxHxWx3, ds.train.labels_N)):
    for image, label in zip(images, labels):  # JPEG: within a few levels of the class's flat colour
      assert np.abs(image.astype(int) - colour(label)).max() <= 3
  assert len(ds.train) + len(ds.val) == 9
  extracted = os.listdir(tmp_path / "cache" / "extracted")
  assert len(extracted) == 1 and "partial" not in extracted[0]


def test_cinic10_from_its_tarball_with_its_own_validation_split(tmp_path, monkeypatch):
  body, expected, names = make_cinic10()
  ds = load_served(monkeypatch, tmp_path, "cinic10", {"CINIC-10.tar.gz": body})
  assert ds.class_names == tuple(names) and ds.val_source == "the dataset's own validation split"
  for split, got in (("train", ds.train), ("valid", ds.val), ("test", ds.test)):
    np.testing.assert_array_equal(got.images_NxHxWx3, expected[split][0])
    np.testing.assert_array_equal(got.labels_N, expected[split][1])


def test_no_network_and_no_archive_is_one_line_naming_both_remedies(tmp_path):
  start = time.perf_counter()
  with pytest.raises(UserError) as e:
    data.load("cifar10", mirror=closed_port_url(), cache_dir=str(tmp_path))
  assert time.perf_counter() - start < 5
  message = str(e.value)
  assert "\n" not in message and "no connection" in message
  assert "--config.data.source=cifar10:/path/to/cifar-10-python.tar.gz" in message
  assert "--config.data.source=folder:PATH" in message
  with pytest.raises(UserError, match=f"^data.source=cifar10:{tmp_path}: {tmp_path}/cifar-10-python.tar.gz not found"):
    data.load(f"cifar10:{tmp_path}", cache_dir="")  # a folder without the file
  gone = tmp_path / "c10.tar.gz"  # a file that is not there: named as given, not as gone/cifar-10-python.tar.gz
  with pytest.raises(UserError, match=f"^data.source=cifar10:{gone}: {gone} not found; give the original"):
    data.load(f"cifar10:{gone}", cache_dir="")
  (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not the archive")
  with pytest.raises(UserError, match="not the published c58f30108f718f92721af3b95e74349a"):
    data.load(f"cifar10:{tmp_path}", cache_dir="")


def test_every_dataset_config_defaults_to_its_built_in_reader():
  from configs import cifar10, cifar100, cinic10, svhn, tiny_imagenet  # pylint: disable=g-import-not-at-top
  for module, name in ((cifar10, "cifar10"), (cifar100, "cifar100"), (svhn, "svhn"),
                       (tiny_imagenet, "tiny_imagenet"), (cinic10, "cinic10")):
    assert module.get_config().data.source == name and name in datasets.BUILTIN
