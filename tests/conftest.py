"""Shared fixtures: small image trees made by the tests themselves, one compilation cache."""
import atexit
import os
import shutil
import struct
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from PIL import Image
from tensorboardX.proto import event_pb2

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_CIFAR10 = os.path.join(REPO, "..", "shared", "data", "cifar10")

# The suite and every run it starts share one persistent compilation cache (fresh for each session), so the
# same small programs compile once: the tests check what the code computes, not how long XLA takes.
_JAX_CACHE = tempfile.mkdtemp(prefix="eejax-tests-jax-cache-")
atexit.register(shutil.rmtree, _JAX_CACHE, ignore_errors=True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _JAX_CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# XLA:CPU without its backend optimisations compiles these tiny programs about 40% faster; what they compute is
# the same program (the numerics tests compare against independent references with stated tolerances).
os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"), "--xla_backend_optimization_level=0"]))


# A launcher's runs at the least size that still trains every exit (launch/*.py -- ARGS).
TINY_RUN = ["--config.model.width=0.25", "--config.data.max_images=48", "--config.data.val_size=12",
            "--config.train.epochs=1", "--config.train.batch_size=12", "--config.eval.batch_size=24",
            "--config.eval.num_thresholds=10", "--config.checkpoint.every_steps=100"]


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
  if env_extra and "XLA_FLAGS" in env_extra:  # added to the suite's flags, not instead of them
    env["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {env_extra['XLA_FLAGS']}".strip()
  return subprocess.run([sys.executable, "-m", "eejax.main", *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=timeout, check=False)


def smoke_args(tree, workdir, cache_dir, *extra):
  return ["--config", "configs/cifar10.py:smoke", f"--workdir={workdir}", f"--config.data.source=folder:{tree}",
          f"--config.data.cache_dir={cache_dir}", "--config.data.val_size=8", *extra]


@pytest.fixture(scope="session")
def smoke_master(tmp_path_factory):
  """(root, tree, workdir, stdout) of one finished smoke run on a tiny tree (1 device), shared by the session.

  Tests read it through `smoke_run` (a copy per module) or copy it with `copy_run`; never change it.
  """
  root = tmp_path_factory.mktemp("smoke_master")
  tree, workdir = str(root / "tree"), str(root / "w")
  make_tree(tree, per_class=(32, 8), size=16)
  r = run_main(smoke_args(tree, workdir, "", "--config.eval.real_inference=False"))
  assert r.returncode == 0, r.stderr[-2000:]
  return root, tree, workdir, r.stdout


def copy_run(master, dest, own_tree=False):
  """A copy of the master run's workdir in dest/w (with its own copy of the tree in dest/tree when asked)."""
  import json  # pylint: disable=g-import-not-at-top
  _, tree, workdir, _ = master
  shutil.copytree(workdir, os.path.join(dest, "w"))
  if own_tree:
    shutil.copytree(tree, os.path.join(dest, "tree"))
    path = os.path.join(dest, "w", "config.json")
    with open(path, encoding="utf-8") as f:
      config = json.load(f)
    config["data"]["source"] = f"folder:{os.path.join(dest, 'tree')}"
    with open(path, "w", encoding="utf-8") as f:
      json.dump(config, f)
    tree = os.path.join(dest, "tree")
  return tree, os.path.join(dest, "w")


@pytest.fixture(scope="module")
def smoke_run(smoke_master, tmp_path_factory):
  """(root, tree, workdir) of a finished smoke run, a copy of the session's for each test module."""
  root = tmp_path_factory.mktemp("smoke_run")
  tree, workdir = copy_run(smoke_master, str(root))
  return root, tree, workdir


def read_events(folder):
  """Scalars from TensorBoard event files (TFRecord framing: length, crc, payload, crc)."""
  out = []
  for name in os.listdir(folder):
    with open(os.path.join(folder, name), "rb") as f:
      blob = f.read()
    i = 0
    while i < len(blob):
      (length,) = struct.unpack("<Q", blob[i:i + 8])
      event = event_pb2.Event.FromString(blob[i + 12:i + 12 + length])
      i += 12 + length + 4
      out += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
  return out
