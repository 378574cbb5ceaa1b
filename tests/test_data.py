"""Host-side datasets: folder trees, the cache, validation splits, tfds (mocked), errors."""
import os
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from conftest import SHARED_CIFAR10, make_tree
from eejax import data, folders
from eejax.errors import UserError


def test_folder_png_with_greyscale_and_own_valid_split(tmp_path):
  root = str(tmp_path / "t")
  written = make_tree(root, splits=("train", "valid", "test"), per_class=(5, 2, 3), size=20, grey_every=2)
  ds = data.load(f"folder:{root}", cache_dir="")
  assert ds.class_names == ("cat", "dog", "ship")
  assert ds.image_shape == (20, 20, 3)
  assert (len(ds.train), len(ds.val), len(ds.test)) == (15, 6, 9)
  assert ds.val_source == "the dataset's own validation split"
  np.testing.assert_array_equal(ds.train.images_NxHxWx3, written["train"][0])  # PNG is lossless
  np.testing.assert_array_equal(ds.test.labels_N, written["test"][1])
  assert ds.train.labels_N.dtype == np.int32


def test_jpeg_resize_and_carved_validation(tmp_path):
  root = str(tmp_path / "t")
  make_tree(root, per_class=(10, 2), size=24, fmt="jpg")
  ds = data.load(f"folder:{root}", image_size=32, val_size=6, val_seed=3, cache_dir="")
  assert ds.image_shape == (32, 32, 3)
  assert (len(ds.train), len(ds.val)) == (24, 6)
  assert "6 images carved from train (seed 3)" == ds.val_source
  again = data.load(f"folder:{root}", image_size=32, val_size=6, val_seed=3, cache_dir="")
  np.testing.assert_array_equal(ds.val.images_NxHxWx3, again.val.images_NxHxWx3)


def test_carve_validation_is_a_disjoint_partition():
  split = data.Split(np.arange(50, dtype=np.uint8).reshape(50, 1, 1, 1).repeat(3, -1), np.arange(50, dtype=np.int32))
  train, val = data.carve_validation(split, 10, seed=0)
  assert sorted(np.concatenate([train.labels_N, val.labels_N]).tolist()) == list(range(50))
  assert len(val) == 10
  with pytest.raises(UserError, match="val_size=50"):
    data.carve_validation(split, 50, seed=0)


def test_cache_avoids_decoding_and_notices_changes(tmp_path, monkeypatch):
  root, cache = str(tmp_path / "t"), str(tmp_path / "cache")
  make_tree(root, per_class=(4, 2), size=8)
  first = data.load(f"folder:{root}", val_size=2, cache_dir=cache)
  assert len(os.listdir(cache)) == 1

  def no_decode(*args):
    raise AssertionError("decoded although cached")

  monkeypatch.setattr(folders, "decode", no_decode)
  second = data.load(f"folder:{root}", val_size=2, cache_dir=cache)
  np.testing.assert_array_equal(first.train.images_NxHxWx3, second.train.images_NxHxWx3)
  monkeypatch.undo()
  make_tree(root, per_class=(5, 2), size=8, seed=1)  # the tree changes: one more image per class
  third = data.load(f"folder:{root}", val_size=2, cache_dir=cache)
  assert len(third.train) == len(first.train) + 3


def test_corrupt_cache_is_rebuilt(tmp_path):
  root, cache = str(tmp_path / "t"), str(tmp_path / "cache")
  make_tree(root, per_class=(4, 2), size=8)
  first = data.load(f"folder:{root}", val_size=2, cache_dir=cache)
  path = os.path.join(cache, os.listdir(cache)[0])
  with open(path, "wb") as f:
    f.write(b"not an npz")
  second = data.load(f"folder:{root}", val_size=2, cache_dir=cache)
  np.testing.assert_array_equal(first.test.images_NxHxWx3, second.test.images_NxHxWx3)


def test_max_images_subsets_every_split(tmp_path):
  root = str(tmp_path / "t")
  make_tree(root, per_class=(10, 10), size=8)
  ds = data.load(f"folder:{root}", max_images=12, val_size=4, cache_dir="", val_seed=3)
  assert (len(ds.train), len(ds.val), len(ds.test)) == (8, 4, 12)
  # Only the chosen files are decoded, and they are the images a seeded subset of everything would keep.
  whole = data.load(f"folder:{root}", val_size=4, cache_dir="", val_seed=3)
  test = data.subset(whole.test, 12, 3)
  np.testing.assert_array_equal(ds.test.images_NxHxWx3, test.images_NxHxWx3)
  np.testing.assert_array_equal(ds.test.labels_N, test.labels_N)
  raw_train = data.Split(*folders.read_tree(root, None)[0]["train"])  # before validation is carved
  want = data.subset(raw_train, 12, 3).images_NxHxWx3
  got = np.concatenate([ds.train.images_NxHxWx3, ds.val.images_NxHxWx3])
  assert sorted(map(bytes, got)) == sorted(map(bytes, want))


def test_folder_errors(tmp_path):
  with pytest.raises(UserError, match="not found or incomplete"):
    data.load(f"folder:{tmp_path}/nothing", cache_dir="")
  root = str(tmp_path / "t")
  make_tree(root, per_class=(2, 1), size=8)
  make_tree(root, splits=("train",), per_class=(1,), size=10, classes=("cat",), seed=5)  # overwrites one image
  with pytest.raises(UserError, match="different sizes.*image_size"):
    data.load(f"folder:{root}", val_size=1, cache_dir="")
  with pytest.raises(UserError, match="expected one of cifar10, cifar100, svhn, tiny_imagenet, cinic10 .*'folder:PATH'"):
    data.load("cifar11", cache_dir="")
  one = str(tmp_path / "one")  # trained to 100% at every exit from the first step, before
  make_tree(one, per_class=(8, 2), size=8, classes=("cat",))
  with pytest.raises(UserError) as e:
    data.load(f"folder:{one}", val_size=2, cache_dir="")
  assert str(e.value) == (f"data.source='folder:{one}' holds 1 class(es) (cat), and a classifier needs two or more; "
                          f"for a class-per-folder tree give the folder whose train/ holds one folder per class")


def test_tfds_mock_data_without_tensorflow():
  with tfds.testing.mock_data(num_examples=20):
    ds = data.load("tfds:cifar10", val_size=5, cache_dir="")
  assert ds.num_classes == 10  # (the mock has no label names)
  assert ds.image_shape == (32, 32, 3)
  assert (len(ds.train), len(ds.val), len(ds.test)) == (15, 5, 20)
  assert ds.train.images_NxHxWx3.dtype == np.uint8


def test_tfds_missing_fails_fast_with_both_remedies(tmp_path):
  start = time.perf_counter()
  with pytest.raises(UserError, match=r"not prepared.*eejax\[tfds\].*folder:PATH"):
    data.load("tfds:cifar10", tfds_data_dir=str(tmp_path), cache_dir="")
  with pytest.raises(UserError, match="(no network access|needs TensorFlow)"):
    data.load("tfds:cifar10", tfds_data_dir=str(tmp_path), cache_dir="", download=True)
  assert time.perf_counter() - start < 30
  with pytest.raises(UserError, match="unknown to tensorflow-datasets"):
    data.load("tfds:no_such_dataset", tfds_data_dir=str(tmp_path), cache_dir="")


@pytest.mark.skipif(not os.path.isdir(SHARED_CIFAR10), reason="../shared/data/cifar10 is absent (a user's clone)")
def test_real_cifar10_tree(tmp_path):
  ds = data.load(f"folder:{SHARED_CIFAR10}", max_images=200, val_size=50, cache_dir=str(tmp_path))
  assert ds.class_names == ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
  assert ds.image_shape == (32, 32, 3)
  assert (len(ds.train), len(ds.val), len(ds.test)) == (150, 50, 200)
  assert 50 < ds.train.images_NxHxWx3.mean() < 200


def test_tiny_imagenet_layout(tmp_path, capfd):
  """train/<wnid>/images/*.JPEG; val/images/*.JPEG labelled by val_annotations.txt; val is the test split."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  root = tmp_path / "tin"
  rng = np.random.default_rng(0)
  for wnid in ("n01", "n02"):
    (root / "train" / wnid / "images").mkdir(parents=True)
    for i in range(3):
      Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG")
  (root / "val" / "images").mkdir(parents=True)
  lines = []
  for i, wnid in enumerate(("n02", "n01", "n02")):
    Image.fromarray(np.full((8, 8, 3), 10 * i, np.uint8)).save(root / "val" / "images" / f"val_{i}.JPEG")
    lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t8\t8")
  (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
  ds = data.load(f"folder:{root}", test_split="val", val_size=2, cache_dir="")
  assert ds.class_names == ("n01", "n02")
  assert (len(ds.train), len(ds.val), len(ds.test)) == (4, 2, 3)
  assert ds.test.labels_N.tolist() == [1, 0, 1]
  assert ds.val_source.startswith("2 images carved")
  # Blank lines and Windows line ends are read; a file listed but not there is left out with the usual warning.
  annotations = root / "val" / "val_annotations.txt"
  annotations.write_text("\r\n".join(lines + ["val_9.JPEG\tn01\t0\t0\t8\t8"]) + "\r\n\n")
  ds = data.load(f"folder:{root}", test_split="val", val_size=2, cache_dir="")
  assert ds.test.labels_N.tolist() == [1, 0, 1]
  assert "1 of 4 files under" in capfd.readouterr().err
  for bad, words in ((f"{lines[0]}\nval_1.JPEG n01\n", r"line 2: 'val_1.JPEG n01' is not FILE<TAB>CLASS"),
                     (f"{lines[0]}\nval_1.JPEG\tn07\n", r"line 2: class 'n07' is not in .*/tin/train: a class")):
    annotations.write_text(bad)
    with pytest.raises(UserError, match=f"^{annotations}, {words}"):
      data.load(f"folder:{root}", test_split="val", val_size=2, cache_dir="")


def test_folder_path_under_home(tmp_path, monkeypatch):
  monkeypatch.setenv("HOME", str(tmp_path))
  make_tree(str(tmp_path / "cinic"), splits=("train", "valid", "test"), per_class=(4, 2, 2))
  ds = data.load("folder:~/cinic", cache_dir=None)
  assert (len(ds.train), len(ds.val), len(ds.test)) == (12, 6, 6)


def test_sample_images_reads_only_the_split_asked_for(tmp_path):
  """The evaluation split verifies an export, the training split calibrates an int8 one: each read alone."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  root = str(tmp_path / "t")
  written = make_tree(root, per_class=(4, 2), size=8)
  cfg = ml_collections.ConfigDict({"source": f"folder:{root}", "test_split": "test", "image_size": 0})
  for split in ("test", "train"):  # every file, in sorted order: the exact images written
    np.testing.assert_array_equal(data.sample_images(cfg, 100, split), written[split][0])
  picked = data.sample_images(cfg, 3, "train")  # spread over the sorted files: the first and last class show
  np.testing.assert_array_equal(picked[[0, -1]], written["train"][0][[0, -1]])
  os.rename(os.path.join(root, "train"), os.path.join(root, "gone"))
  np.testing.assert_array_equal(data.sample_images(cfg, 100), written["test"][0])
  with pytest.raises(UserError, match="training split.*tflite_int8"):
    data.sample_images(cfg, 5, "train")


def test_sample_split_labels_images_by_the_runs_class_names(tmp_path):
  import ml_collections  # pylint: disable=g-import-not-at-top
  root = str(tmp_path / "t")
  written = make_tree(root, per_class=(4, 3), size=8)
  cfg = ml_collections.ConfigDict({"source": f"folder:{root}", "test_split": "test", "image_size": 0})
  images, labels = data.sample_split(cfg, 100, "test", ("cat", "dog", "ship"))
  np.testing.assert_array_equal(images, written["test"][0])
  np.testing.assert_array_equal(labels, written["test"][1])
  _, labels = data.sample_split(cfg, 100, "test", ("ship", "dog", "cat"))  # the run's order, not the folders'
  np.testing.assert_array_equal(labels, 2 - written["test"][1])
  assert data.sample_split(cfg, 100, "test", ())[1] is None  # a run that recorded no names
  assert data.sample_split(cfg, 100, "test", ("cat", "dog"))[1] is None  # a folder the run never knew
