"""Shared fixtures: small image trees made by the tests themselves."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_CIFAR10 = os.path.join(REPO, "..", "shared", "data", "cifar10")


def make_tree(root, splits=("train", "test"), per_class=(12, 6), classes=("cat", "dog", "ship"), size=16,
              fmt="png", grey_every=0, seed=0):
  """A class-per-folder tree of random images whose mean brightness depends on the class.

  Returns {split: (images_NxHxWx3 uint8 as written, labels_N)} in sorted-file order.
  """
  rng = np.random.default_rng(seed)
  out = {}
  for split, n in zip(splits, per_class):
    images, labels = [], []
    for label, cls in enumerate(sorted(classes)):
      folder = os.path.join(root, split, cls)
      os.makedirs(folder, exist_ok=True)
      for i in range(n):
        base = 40 + 80 * label
        pixels = np.clip(rng.normal(base, 20, (size, size, 3)), 0, 255).astype(np.uint8)
        if grey_every and i % grey_every == 0:
          pixels = np.repeat(pixels[..., :1], 3, axis=-1)
          Image.fromarray(pixels[..., 0], "L").save(os.path.join(folder, f"{i:04d}.{fmt}"))
        else:
          Image.fromarray(pixels).save(os.path.join(folder, f"{i:04d}.{fmt}"))
        images.append(pixels)
        labels.append(label)
    out[split] = (np.stack(images), np.asarray(labels))
  return out


@pytest.fixture
def tiny_tree(tmp_path):
  root = tmp_path / "tree"
  make_tree(str(root), per_class=(32, 8), size=16)
  return str(root)


def run_main(args, env_extra=None, timeout=600):
  """Runs `python -m eejax.main ARGS` from the repository root; returns the CompletedProcess."""
  env = dict(os.environ, PYTHONUNBUFFERED="1", **(env_extra or {}))
  return subprocess.run([sys.executable, "-m", "eejax.main", *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=timeout, check=False)


def smoke_args(tree, workdir, cache_dir, *extra):
  return ["--config", "configs/cifar10.py:smoke", f"--workdir={workdir}", f"--config.data.source=folder:{tree}",
          f"--config.data.cache_dir={cache_dir}", "--config.data.val_size=8", *extra]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  """(root, tree, workdir) of a finished smoke run on a tiny tree, one per test module."""
  root = tmp_path_factory.mktemp("smoke_run")
  tree, workdir = str(root / "tree"), str(root / "w")
  make_tree(tree, per_class=(32, 8), size=16)
  r = run_main(smoke_args(tree, workdir, "", "--config.eval.real_inference=False"))
  assert r.returncode == 0, r.stderr[-2000:]
  return root, tree, workdir
